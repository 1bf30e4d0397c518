#!/usr/bin/env bash
# On a machine with a GPU (JAX with CUDA installed in the venv), in under 8 minutes: SAC updates/s of
# the 4.4M / 17M / 109M humanoid-run models, dense and masked, 1 vs 8 vmapped seeds, and the pixel
# encoder, as JSON (default gpu_check.json). `--tiny` runs the same program on tiny shapes, e.g. on a CPU.
#   bash scripts/gpu_check.sh [--out FILE] [--tiny] [--seconds S]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
test -x "$PY" || PY=python3
exec timeout 480 "$PY" benchmarks/gpu_check.py "$@"
