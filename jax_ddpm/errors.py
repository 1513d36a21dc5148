"""Error text for people: one line, bounded length (the CLI prints it after ``error:``)."""
from __future__ import annotations

ONE_LINE_LIMIT = 200


def one_line(e: BaseException | str, limit: int = ONE_LINE_LIMIT) -> str:
    """``str(e)`` on one line (whitespace runs collapsed), cut to ``limit`` characters with ``...``.

    An exception with an empty message gives its type's name.
    """
    text = " ".join(str(e).split()) or (type(e).__name__ if isinstance(e, BaseException) else "")
    return text if len(text) <= limit else text[:limit - 3] + "..."


__all__ = ["ONE_LINE_LIMIT", "one_line"]
