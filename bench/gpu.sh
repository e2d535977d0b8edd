#!/usr/bin/env bash
# The device check, one command: on a CUDA machine, from the repository root,
#   bash bench/gpu.sh              installs the carried wheels (.whl/, from bench/fetch_wheels.sh)
#                                  and lmaczs into a target folder, runs the CUDA tests
#                                  (-m requires_cuda, and the Triton kernel tests on the GPU), then
#                                  the GPU benchmark (bench/gpu.py); all in <= 8 minutes
#   bash bench/gpu.sh --dry-run    on any machine: the benchmark on the CPU at tiny sizes (seconds),
#                                  nothing installed, no tests
# Writes into $OUT (default ./gpu-check): gpu.json, gpu.md, tests.log, install.log.
# Exit: 0 all ran (figures and failures are in gpu.json); 3 the install failed; else the benchmark's.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check}
PY=${PYTHON:-python3}
TOTAL_S=${TOTAL_S:-480}          # the whole check, install and tests included
mkdir -p "$OUT"
start=$(date +%s)
if [ "${1:-}" = "--dry-run" ]; then
  exec "$PY" bench/gpu.py --dry-run --out "$OUT" --budget-s 300
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
site=/tmp/lmaczs-site
{
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
  fi &&
  # lmaczs itself: export/ and kernels/ install inside lmaczs_cli (package-dir), so run it installed
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target "$site" .
} > "$OUT/install.log" 2>&1 || { echo "install failed: see $OUT/install.log" >&2; tail -20 "$OUT/install.log" >&2; exit 3; }
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import lmaczs_cli.export, torch, triton, soundfile, soxr; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')" | tee -a "$OUT/install.log"
# -P: the installed lmaczs_cli, not the source folder in the working directory
timeout 200 "$PY" -P -m pytest -q -x -p no:cacheprovider -m requires_cuda tests/test_gpu.py > "$OUT/tests.log" 2>&1
echo "requires_cuda tests (tests/test_gpu.py): exit $?" | tee -a "$OUT/tests.log"
timeout 90 "$PY" -P -m pytest -q -x -p no:cacheprovider tests/test_kernels.py >> "$OUT/tests.log" 2>&1
echo "Triton kernel tests on the GPU (tests/test_kernels.py): exit $?" | tee -a "$OUT/tests.log"
left=$(( TOTAL_S - ($(date +%s) - start) - 15 ))
"$PY" bench/gpu.py --out "$OUT" --budget-s "$left"
