"""One writer per work folder: :class:`WorkdirLock`, an exclusive ``flock`` on
``WORKDIR/.jax-ddpm.lock`` (docs/cli.md, "Guarantees").

``train`` and the imports (``convert --from-*``) hold it while they write; the kernel drops it
when the process ends, however it ends (SIGKILL too), so it is never stale. A second writer is
refused in one line naming the PID that holds it (read from ``/proc/locks``, else from what the
holder wrote into the file). ``app.workdir`` re-exports the class (its old import path).
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket

from .checks import LOCK_NAME, ConfigError
from .console import warning


def lock_path(workdir: str) -> str:
    """``WORKDIR/.jax-ddpm.lock`` (``RunFiles.lock``)."""
    return os.path.join(workdir, LOCK_NAME)


def _lock_holder(path: str, fd: int) -> str | None:
    """The PID holding the flock on ``path``: from /proc/locks (Linux), else what the holder wrote."""
    try:
        st = os.fstat(fd)
        want = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 6 or parts[1] != "FLOCK" or parts[1] == "->":
                    continue
                major, minor, inode = parts[5].split(":")
                if (int(major, 16), int(minor, 16), int(inode)) == want and parts[4].isdigit():
                    return parts[4]
    except (OSError, ValueError):
        pass
    try:
        with open(path) as f:
            words = f.read().split()
        return words[0] if words and words[0].isdigit() else None
    except OSError:
        return None


class WorkdirLock:
    """An exclusive ``flock`` on ``WORKDIR/.jax-ddpm.lock``, held while this process writes the folder.

    The kernel drops it when the process ends, however it ends (SIGKILL too), so it is never
    stale; the file itself stays (it is the folder's, empty or holding the last writer's PID).
    :meth:`acquire` writes nothing into the file: :meth:`record_owner` does, once every
    check has passed (so a refused run changes nothing there).
    """

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = lock_path(workdir)
        self.fd: int | None = None

    def acquire(self) -> "WorkdirLock":
        """Takes the lock (creating the folder and the lock file if needed).

        Raises:
          ConfigError: another process holds it ("... (PID n) is writing to it").
        """
        os.makedirs(self.workdir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):  # no flock on this filesystem
                os.close(fd)
                warning(f"--workdir {self.workdir}: cannot lock it ({e.strerror}); make sure no other jax-ddpm "
                        "process writes to it")
                return self
            holder = _lock_holder(self.path, fd)
            os.close(fd)
            who = f"another jax-ddpm process (PID {holder})" if holder else "another jax-ddpm process"
            raise ConfigError(f"--workdir {self.workdir}: {who} is writing to it (it holds {self.path}); wait for "
                              "it to finish or stop it, or use another --workdir") from None
        self.fd = fd
        return self

    def record_owner(self) -> None:
        """Writes ``PID hostname`` into the lock file (for the message of a refused second writer)."""
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


__all__ = ["WorkdirLock", "lock_path"]
