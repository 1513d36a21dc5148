#!/usr/bin/env bash
# Parity report + benchmarks on a CUDA machine, in about 5 minutes, with no network.
#
#   bash benchmarks/gpu.sh [OUT_DIR]        # OUT_DIR defaults to benchmarks/results
#
# Uses only what the machine has (python3 with jax[cuda], torch, flax, optax), the repo put on
# PYTHONPATH, nothing downloaded. diffusers is optional: when WHEELS (default: the repo's .whl/)
# holds wheels (diffusers and importlib_metadata, carried as the device tool's README says),
# they are installed with pip --no-index into a temporary folder put on PYTHONPATH; without
# diffusers the parity report skips its diffusers rows and the benchmark its diffusers rows,
# each naming why. Every stage has its own time limit and writes what it has when stopped: the
# parity table goes to the log as it runs (its JSON at the end), each benchmark JSON is
# rewritten after every group, and the Markdown/PNG are rendered from whatever JSON exists.
# Stages:
#   0. wheels from WHEELS, if any (pip --no-index --target a temporary folder)    ~5 s
#   1. environment (nvidia-smi, versions)                                          ~10 s
#   2. jax-ddpm parity --device cuda --json                   <= PARITY_S (120 s)
#   3. benchmark: unet2d-digits + unet2d-cifar10 (jax_ddpm vs diffusers), then digits + chapter
#      (vs torch_ref); torch.compile off, 5 timed steps, 2 timed chains     <= the rest - 40 s
#      (the JSON keeps every finished group if the limit stops it)
#   4. train steps with torch.compile (digits, unet2d-digits), if >= 40 s are left
# Total budget TOTAL_S (default 290 s). Exit status: 0 when every stage finished, else the
# first failing stage's status (the later stages still run).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="$(mkdir -p "${1:-$REPO/benchmarks/results}" && cd "${1:-$REPO/benchmarks/results}" && pwd)"
TOTAL_S="${TOTAL_S:-290}"
PARITY_S="${PARITY_S:-120}"
WHEELS="${WHEELS:-$REPO/.whl}"
PY="${PYTHON:-python3}"
STAMP="$(date -u +%Y%m%d-%H%M%S)"
LOG="$OUT_DIR/gpu-$STAMP.log"
START=$(date +%s)
MARK="$(mktemp)"   # files newer than this were written by this run

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # JAX and torch share the GPU
cd "$REPO"

left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }
say() { echo "[gpu.sh $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
status=0
note_fail() { local rc=$1 what=$2; say "$what exited with status $rc"; [ "$status" -ne 0 ] || status=$rc; }

# Runs "$@" for at most $1 seconds: SIGINT first (Python stops and keeps its files), SIGKILL 15 s later.
limited() {
  local secs=$1; shift
  if [ "$secs" -lt 5 ]; then say "skipped (no time left): $*"; return 124; fi
  timeout --signal=INT --kill-after=15 "$secs" "$@"
}
min() { [ "$1" -lt "$2" ] && echo "$1" || echo "$2"; }

say "repo $REPO, results in $OUT_DIR, budget ${TOTAL_S}s"
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
shopt -u nullglob
if [ "${#wheels[@]}" -gt 0 ]; then
  SITE="$(mktemp -d)/site"
  say "wheels: installing ${#wheels[@]} from $WHEELS into $SITE (pip --no-index)"
  set +e
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "${wheels[@]}" >>"$LOG" 2>&1
  rc=$?; set -e
  if [ "$rc" -eq 0 ]; then export PYTHONPATH="$PYTHONPATH:$SITE"; else note_fail "$rc" "wheel install"; fi
else
  say "wheels: none in $WHEELS (without diffusers on the machine, its rows are not run, each saying why)"
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv || true
  "$PY" - <<'EOF' || true
import importlib.metadata as md, sys
print("python", sys.version.split()[0])
for name in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "torch", "numpy",
             "diffusers"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
import jax, torch
print("jax devices", jax.devices(), "| torch cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
} >>"$LOG" 2>&1

say "parity: jax-ddpm parity --device cuda (limit ${PARITY_S}s)"
set +e
limited "$(min "$PARITY_S" "$(left)")" \
  "$PY" -m jax_ddpm.cli parity --device cuda --json "$OUT_DIR/parity-cuda-$STAMP.json" \
  >"$OUT_DIR/parity-cuda-$STAMP.md" 2>>"$LOG"
rc=$?; set -e
[ "$rc" -eq 0 ] && say "parity: all checks passed" \
  || note_fail "$rc" "parity (1 = a check failed, 124/130 = time limit)"

LIMIT=$(( $(left) - 40 ))
say "benchmark: unet2d sizes vs diffusers, then digits + chapter vs torch_ref, torch.compile off (limit ${LIMIT}s)"
set +e
limited "$LIMIT" "$PY" -m benchmarks --device cuda --sizes unet2d-digits,unet2d-cifar10,digits,chapter \
  --torch-compile off --reps 5 --sample-reps 2 --out "$OUT_DIR" --tag gpu 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}; set -e
[ "$rc" -eq 0 ] || note_fail "$rc" "benchmark"

if [ "$(left)" -ge 40 ]; then
  say "benchmark: digits + unet2d-digits train steps with torch.compile (limit $(( $(left) - 10 ))s)"
  set +e
  limited "$(( $(left) - 10 ))" "$PY" -m benchmarks --device cuda --sizes digits,unet2d-digits --tasks train \
    --torch-compile on --out "$OUT_DIR" --tag gpu-compile 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}; set -e
  [ "$rc" -eq 0 ] || note_fail "$rc" "benchmark with torch.compile"
else
  say "skipped the torch.compile benchmark: $(left)s left"
fi

# Markdown + PNG for every JSON of this run that has none (a stage stopped by its limit).
for j in "$OUT_DIR"/bench-cuda-*.json; do
  if [ -e "$j" ] && [ "$j" -nt "$MARK" ] && [ ! -e "${j%.json}.md" ]; then
    "$PY" -m benchmarks --render "$j" >>"$LOG" 2>&1 || true
  fi
done
rm -f "$MARK"
say "done, status $status; files:"
ls -l "$OUT_DIR" | grep -E "$STAMP|bench-cuda" | tee -a "$LOG" || true
exit "$status"
