#!/usr/bin/env bash
# PyTorch reference checks for lrllm: one line per check (`PASS name` / `FAIL name: reason`),
# then a summary line; exit status 0 only if every check passes.
# Usage: tests/reference/run.sh [BUILD_DIR] [--only SUBSTRING] [--keep]   (BUILD_DIR default: build)
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
build="$repo/build"
if [[ $# -gt 0 && "$1" != --* ]]; then build="$(cd "$1" 2>/dev/null && pwd || echo "$1")"; shift; fi
py=/usr/bin/python3   # Debian's python: it has torch, h5py and numpy
if ! "$py" -c 'import torch, h5py, numpy' 2>/dev/null; then
  echo "FAIL reference_setup: $py cannot import torch, h5py and numpy (apt-get install python3-torch python3-h5py)"
  exit 1
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec "$py" "$here/test_reference.py" --build "$build" "$@"
