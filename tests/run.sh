#!/usr/bin/env bash
# make test: runs every suite that needs no GPU and ends with one line "N passed, N failed".
# Each suite's own output is shown; a suite that dies without reporting counts as one failure.
set -uo pipefail
build=${1:-build}
cd "$(dirname "$0")/.."
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
python=/usr/bin/python3
# Under the sanitizers any finding ends the process with an error (lrllm itself turns leak checking off:
# see src/main.cpp).
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
passed=0
failed=0
log=$(mktemp)
trap 'rm -f "$log"' EXIT

# Runs a suite whose output has PASS/FAIL lines (or GoogleTest's summary) and adds its counts.
suite() {
  local name=$1
  shift
  echo "== $name"
  "$@" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  local p f
  if grep -q '^\[==========\]' "$log"; then
    p=$(sed -nE 's/^\[  PASSED  \] ([0-9]+) tests?.*/\1/p' "$log" | tail -1)
    f=$(sed -nE 's/^\[  FAILED  \] ([0-9]+) tests?, listed below.*/\1/p' "$log" | tail -1)
  else
    p=$(grep -c '^PASS ' "$log")
    f=$(grep -c '^FAIL ' "$log")
  fi
  p=${p:-0}
  f=${f:-0}
  if [[ $rc -ne 0 && $f -eq 0 ]]; then
    echo "FAIL $name: exited $rc without reporting a failed test"
    f=1
  fi
  if [[ $rc -eq 0 && $p -eq 0 && $f -eq 0 ]]; then
    echo "FAIL $name: ran no test"
    f=1
  fi
  passed=$((passed + p))
  failed=$((failed + f))
}

suite "unit tests (GoogleTest)" env LRLLM_TOKENIZER_DIR=input/data/tokenizer OMP_NUM_THREADS=2 \
  "$build/tests/unit"
suite "integration (lrllm under mpirun)" "$python" tests/integration/test_cli.py "$build"
suite "Hugging Face folders (import, export --export.format hf)" "$python" tests/integration/test_hf.py "$build"
suite "parallel layouts (tp, pp, dp, ZeRO)" "$python" tests/integration/test_parallel.py "$build"
suite "fuzzed bad input (seeded)" "$python" tests/integration/test_fuzz.py "$build"
suite "Slurm jobs (sbatch, requeue, resume)" bash tests/slurm/run.sh "$build"
suite "report tool (tools/report.py)" "$python" tests/integration/test_report.py "$build"
suite "PyTorch reference" bash tests/reference/run.sh "$build"
suite "tokenizer against gpt-3-encoder" bash tests/tokenizer/compare.sh "$build"
suite "Llama tokenizer against llama-tokenizer-js" bash tests/tokenizer/compare.sh "$build" llama
# The GPU tests are built wherever the CUDA backend is, and run where a GPU is visible (also: make test-gpu).
if [[ -x "$build/tests/gpu" ]]; then
  if nvidia-smi -L >/dev/null 2>&1; then
    suite "CUDA backend against the CPU backend" "$build/tests/gpu"
  else
    echo "== CUDA backend: $build/tests/gpu is built; no GPU is visible here, so its tests do not run"
  fi
fi

echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
