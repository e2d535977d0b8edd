#!/usr/bin/env bash
# Download the wheels of bench/gpu_wheels.txt for the GPU machine (CPython 3.12, x86-64 Linux)
# into .whl/ (git-ignored), without dependencies, and check they stay under 50 MiB together.
#   bash bench/fetch_wheels.sh            (from the repository root, on a machine with pip and a network)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
grep -v '^\s*#' bench/gpu_wheels.txt | grep -v '^\s*$' | while read -r req; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "$req"
done
size=$(du -sm .whl | cut -f1)
echo "$(ls .whl/*.whl | wc -l) wheels, ${size} MiB in .whl/"
if [ "$size" -ge 50 ]; then
  echo "over the 50 MiB the device check may carry: trim bench/gpu_wheels.txt" >&2
  exit 1
fi
