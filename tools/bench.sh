#!/usr/bin/env bash
# `make bench`: lrllm against PyTorch on the CPU, side by side, for two shapes: GPT-2 dense and low-rank, and
# Llama; then finetuning memory, parallel training, generation with and without the KV cache, and export sizes.
# Usage: tools/bench.sh [BUILD_DIR]   (default build). Writes the table to bench-out/bench.md.
# Knobs (environment): BENCH_STEPS (default 10 steps per run), BENCH_THREADS (default 2), BENCH_SHAPES
# (a subset of the labels below, space-separated), BENCH_TIMEOUT (seconds per run, default 300).
# BENCH_CORETYPE: which OpenBLAS kernels PyTorch gets: auto (default: lrllm's), none (as installed), or a name
# (then for every run). BENCH_LLAMA (opt-in, default none): Llama-2 shapes whose finetuning memory to measure,
# "7b" or "7b 13b" (tools/bench_llama.py; minutes a step on two cores, 3.6 GB of disk for the 7B file, `make
# bench-llama` runs only these).
set -euo pipefail

BUILD=${1:-build}
cd "$(dirname "$0")/.."
PY=/usr/bin/python3  # Debian's python: it has torch, h5py and numpy
OUT=bench-out
STEPS=${BENCH_STEPS:-10}
THREADS=${BENCH_THREADS:-2}
TIMEOUT=${BENCH_TIMEOUT:-300}
VOCAB=50257

# label n_layer n_head d_model seq_len batch
SHAPES=(
  "L4-d256-T128-B8 4 4 256 128 8"
  "L6-d384-T256-B4 6 6 384 256 4"
)

for exe in "$BUILD/lrllm" "$BUILD/tools/bench_sgemm"; do
  [[ -x "$exe" ]] || { echo "bench: $exe is missing; run make first" >&2; exit 1; }
done
if ! "$PY" -c 'import torch, h5py, numpy' 2>/dev/null; then
  echo "bench: $PY lacks torch, h5py or numpy (make deps installs them)" >&2
  exit 1
fi

mkdir -p "$OUT"
rm -rf "$OUT/raw"
mkdir -p "$OUT/raw"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

export OMP_NUM_THREADS=$THREADS OPENBLAS_NUM_THREADS=$THREADS
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

data=input/data/pretrain_train.bin
if [[ ! -f "$data" ]]; then
  echo "bench: no $data (make data writes it); using synthetic tokens"
  data="$tmp/synthetic.bin"
  "$PY" tools/bench_report.py synth "$data" 2000000 "$VOCAB"
fi

busy=$(pgrep -f 'cc1plus|/make |build/lrllm|tests/unit' | grep -v "^$$\$" || true)
if [[ -n "$busy" ]]; then
  echo "bench: warning: other heavy processes are running; timings may be noisy:" >&2
  ps -o pid=,args= -p $(echo "$busy" | tr '\n' ' ') 2>/dev/null | cut -c1-120 >&2 || true
fi

cpu=$("$PY" -c 'import sys; sys.path.insert(0, "tools"); from bench_report import cpu_name; print(cpu_name())')
echo "bench: $cpu, $THREADS threads, $STEPS steps per run, data $data"

# OpenBLAS picks its kernels at load time from the CPU model, and on a model it does not know falls back to generic
# SSE3 ones several times slower than the CPU allows. lrllm (and bench_sgemm, which measures what lrllm gets)
# replace that fallback themselves; PyTorch's OpenBLAS does not, so by default PyTorch runs here with the kernels
# lrllm uses (BENCH_CORETYPE=none: PyTorch as installed; BENCH_CORETYPE=NAME, or OPENBLAS_CORETYPE: that set
# for every run).
case "${BENCH_CORETYPE:-auto}" in
  auto | none) ;;
  *) [[ -n "${OPENBLAS_CORETYPE:-}" ]] || export OPENBLAS_CORETYPE=$BENCH_CORETYPE ;;
esac

# sgemm yardstick: a large square product and each shape's biggest GEMM (B*T rows x vocab x d, as the tied
# lm_head forward computes it), with lrllm's kernels; plus the square with OpenBLAS's own choice when it differs.
sgemm_args=()
for s in "${SHAPES[@]}"; do
  read -r label L H D T B <<<"$s"
  sgemm_args+=(--shape "cls-$label" $((B * T)) "$VOCAB" "$D" 0 1)
done
echo "bench: measuring sgemm"
"$BUILD/tools/bench_sgemm" --threads "$THREADS" "${sgemm_args[@]}" >"$OUT/raw/sgemm.txt"
core=$(awk '$1 == "openblas" {print $2}' "$OUT/raw/sgemm.txt")
native_core=$(env -u OPENBLAS_CORETYPE "$BUILD/tools/bench_sgemm" --as-installed --square 0 | awk '{print $2}')
torch_env=()
if [[ "$native_core" != "$core" ]]; then
  env -u OPENBLAS_CORETYPE "$BUILD/tools/bench_sgemm" --as-installed --threads "$THREADS" |
    sed -e 's/^openblas /openblas-native /' -e 's/^sgemm square /sgemm-native square /' >>"$OUT/raw/sgemm.txt"
  if [[ -z "${OPENBLAS_CORETYPE:-}" && "${BENCH_CORETYPE:-auto}" == auto ]]; then
    torch_env=(env OPENBLAS_CORETYPE="$core")
    note="OpenBLAS as installed picks $native_core kernels on this CPU; lrllm replaces them with $core, and"
    note+=" PyTorch runs with OPENBLAS_CORETYPE=$core to match (BENCH_CORETYPE=none: PyTorch as installed)"
  else
    note="OpenBLAS as installed picks $native_core kernels on this CPU; lrllm uses $core, PyTorch"
    note+=" ${OPENBLAS_CORETYPE:-$native_core}"
  fi
else
  note="lrllm and PyTorch both use OpenBLAS's $core kernels"
fi
echo "bench: $note"
echo "$note" >"$OUT/raw/coretype.txt"

# Busy CPU time of the whole machine and of this shell's finished children, in clock ticks: a run's share of the
# machine's busy time tells whether other processes competed for the cores meanwhile (timings then mean little).
HZ=$(getconf CLK_TCK)
machine_ticks() { awk '$1 == "cpu" {print $2 + $3 + $4 + $7 + $8 + $9; exit}' /proc/stat; }
own_ticks() { sed 's/.*) //' "/proc/$$/stat" | awk '{print $14 + $15}'; }
# watched FILE CMD...: runs CMD and writes to FILE how many cores other processes kept busy meanwhile.
watched() {
  local file=$1 m0 o0 t0 rc=0
  shift
  m0=$(machine_ticks) o0=$(own_ticks) t0=$(date +%s.%N)
  "$@" || rc=$?
  awk -v m="$(($(machine_ticks) - m0))" -v o="$(($(own_ticks) - o0))" -v hz="$HZ" -v t0="$t0" -v t1="$(date +%s.%N)" \
    'BEGIN {x = (m - o) / hz / (t1 - t0); printf "%.2f\n", x < 0 ? 0 : x}' >"$file"
  return $rc
}

manifest="$OUT/raw/manifest.txt"
: >"$manifest"
for s in "${SHAPES[@]}"; do
  read -r label L H D T B <<<"$s"
  if [[ -n "${BENCH_SHAPES:-}" && " $BENCH_SHAPES " != *" $label "* ]]; then continue; fi
  # Llama at the same width: half as many key/value heads, SwiGLU width 8d/3 (rounded to 16) as Llama's own.
  for kind in dense lowrank llama; do
    rank=0
    lr_opts=()
    arch_opts=()
    torch_arch=()
    if [[ $kind == lowrank ]]; then
      rank=$((D / 4))
      lr_opts=(--lowrank.rank "$rank" --lowrank.targets all)
    elif [[ $kind == llama ]]; then
      ff=$(((8 * D / 3 + 15) / 16 * 16))
      arch_opts=(--model.arch llama --model.n_kv_head $((H / 2)) --model.d_ff "$ff")
      torch_arch=(--arch llama --n_kv_head $((H / 2)) --d_ff "$ff")
    fi
    tag="$label-$kind"
    run_dir="$tmp/run-$tag"
    echo "bench: $tag: lrllm"
    if ! watched "$OUT/raw/$tag-lrllm.other" timeout "$TIMEOUT" "$BUILD/lrllm" --mode pretrain --device cpu \
      --model.n_layer "$L" --model.n_head "$H" --model.d_model "$D" --model.seq_len "$T" \
      --model.vocab_size "$VOCAB" --train.batch_size "$B" --train.steps "$STEPS" --train.eval_every 0 \
      --train.eval_batches 1 --checkpoint.every 0 \
      --run.dir "$run_dir" --data.train "$data" --data.val "$data" "${lr_opts[@]}" "${arch_opts[@]}" >"$OUT/raw/$tag-lrllm.log" 2>&1; then
      echo "bench: lrllm failed on $tag; see $OUT/raw/$tag-lrllm.log" >&2
      tail -3 "$OUT/raw/$tag-lrllm.log" >&2
      exit 1
    fi
    "$PY" tools/bench_report.py lrllm-metrics "$run_dir/metrics.h5" >"$OUT/raw/$tag-lrllm.json"
    rm -rf "$run_dir"  # checkpoints are large and not needed
    echo "bench: $tag: pytorch"
    if ! watched "$OUT/raw/$tag-torch.other" "${torch_env[@]}" timeout "$TIMEOUT" "$PY" tools/bench_torch.py \
      --n_layer "$L" --n_head "$H" --d_model "$D" --seq_len "$T" --vocab "$VOCAB" --batch "$B" --rank "$rank" \
      --steps "$STEPS" --threads "$THREADS" --data "$data" "${torch_arch[@]}" \
      >"$OUT/raw/$tag-torch.json" 2>"$OUT/raw/$tag-torch.err"; then
      echo "bench: PyTorch failed on $tag; see $OUT/raw/$tag-torch.err" >&2
      tail -3 "$OUT/raw/$tag-torch.err" >&2
      exit 1
    fi
    echo "$label $kind $L $H $D $T $B $rank $VOCAB" >>"$manifest"
  done
done

"$PY" tools/bench_report.py report "$OUT" --threads "$THREADS" --steps "$STEPS"

# Finetuning memory (docs/design.md, Purpose: the paper's 6.3x): full finetuning against LoRA over a
# quantized base.
"$PY" tools/bench_finetune.py "$BUILD"

# Llama-2 finetuning memory (opt-in, BENCH_LLAMA): NF4 + LoRA r16 + recompute at rows of 512 tokens, over
# random weights exported a tensor at a time; writes bench-out/llama-SIZE.md.
for size in ${BENCH_LLAMA:-}; do
  "$PY" tools/bench_llama.py "$BUILD" --size "$size"
done

# Parallel training: data-parallel scaling against PyTorch DDP, the pipeline bubble, tensor-parallel traffic.
"$PY" tools/bench_parallel.py "$BUILD"

# Generation: tokens/s with and without the key/value cache, GPT-2 and Llama.
bash tools/bench_generate.sh "$BUILD"

# Inference files (the paper's bar: under 0.59 GB): exports of GPT-2 124M and 1.5B shapes with random weights,
# dense and low-rank (rank at 2.64x compression), float32 and NF4. Random weights are written a tensor at a time
# (memory: about one tensor); the dense 1.5B files are left out for their 6 GB of disk.
{
  echo "| model | float32 MB | NF4 MB |"
  echo "|---|---|---|"
  for cfg in gpt2-124M gpt2-124M-lowrank gpt2-1.5B-lowrank; do
    row="| $cfg |"
    for bits in 0 4; do
      "$BUILD/lrllm" --mode export --config "input/configs/$cfg.cfg" --quant.bits "$bits" \
        --data.output "$tmp/export.h5" >"$tmp/export.log"
      row="$row $(stat -c %s "$tmp/export.h5" | awk '{printf "%.1f", $1 / 1e6}') |"
      rm -f "$tmp/export.h5"
    done
    echo "$row"
  done
} | { echo "Exports of random weights, written on $cpu (sizes do not depend on it)"; echo; cat; } | tee "$OUT/export.md"

# Hugging Face import and export at full size (tools/bench_hf.py): GPT-2 1.5B by default; BENCH_HF_SHAPES
# adds llama2-7B (a 13.5 GB BF16 folder and a 27 GB imported file on disk).
# shellcheck disable=SC2086
"$PY" tools/bench_hf.py "$BUILD" ${BENCH_HF_SHAPES:-gpt2-1.5B}
