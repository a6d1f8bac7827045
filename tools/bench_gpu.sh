#!/usr/bin/env bash
# The GPU benchmark: lrllm's CUDA backend against PyTorch on the device machine's H100/H200.
#   pretrain: GPT-2 124M shapes (n_layer 12, n_head 12, d_model 768, seq_len 1024, vocab 50257), dense and
#             low-rank at 2.64x smaller linear layers (rank 218, as input/configs/gpt2-124M-lowrank.cfg):
#             tokens/s and MFU of lrllm --device cuda and of PyTorch (bf16 autocast, torch.compile).
#   finetune: GPT-2 1.5B shapes (n_layer 48, n_head 25, d_model 1600): peak GPU memory and tokens/s of lrllm
#             --mode finetune with an NF4 base, LoRA and block recompute, against PyTorch's full bf16
#             finetuning (memory) and bf16 LoRA (speed).
# A run that fails (the CUDA backend refusing an option, out of memory, a timeout) puts its error line in the
# table and the bench goes on. Writes bench-out/gpu.md (and prints it); logs and results in bench-out/gpu-raw/.
#
# Run on the device from the repo root, after packing here (tools/pack-device.sh; carry .device):
#   source .device/env.sh && bash tools/bench_gpu.sh
# A device call lasts 10 minutes at most: BENCH_PARTS=pretrain and BENCH_PARTS=finetune run one part each
# (the report gathers every part whose results are in bench-out/gpu-raw/, so two calls on one warm machine
# give one table). Bring the results back with, e.g., `cp bench-out/gpu.md "$OUT"/ &&
# tar -czf "$OUT"/gpu-raw.tgz -C bench-out gpu-raw` ($OUT takes 8 files at most).
# Knobs (environment): BENCH_PARTS ("pretrain finetune"), BENCH_STEPS (20 pretraining steps), BENCH_BATCH (16),
# BENCH_FT_STEPS (8 finetuning steps), BENCH_FT_BATCH (4), BENCH_LORA_RANK (16), BENCH_COMPRESSION (2.64),
# BENCH_TIMEOUT (300 s per run), BENCH_PEAK_TFLOPS (default from the GPU's name: 989, the H100 SXM's and the
# H200's bf16 dense peak), PYTHON (python3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PARTS=${BENCH_PARTS:-pretrain finetune}
STEPS=${BENCH_STEPS:-20}
BATCH=${BENCH_BATCH:-16}
FT_STEPS=${BENCH_FT_STEPS:-8}
FT_BATCH=${BENCH_FT_BATCH:-4}
LORA_RANK=${BENCH_LORA_RANK:-16}
COMPRESSION=${BENCH_COMPRESSION:-2.64}
TIMEOUT=${BENCH_TIMEOUT:-300}
PY=${PYTHON:-python3}
TORCH_WARMUP=3  # steps out of PyTorch's median: the first ones compile
VOCAB=50257
T=1024
BENCH_OUT=bench-out
RAW=$BENCH_OUT/gpu-raw
CACHE=$BENCH_OUT/gpu-cache  # synthetic inputs, kept for a second call on the same machine

die() {
  echo "bench_gpu: $*" >&2
  exit 1
}

command -v lrllm >/dev/null || die "lrllm is not on PATH: source .device/env.sh (made by tools/pack-device.sh) first"
command -v nvidia-smi >/dev/null || die "nvidia-smi is missing: this is not a GPU machine"
"$PY" -c 'import torch, h5py, numpy; assert torch.cuda.is_available(), "no GPU visible to PyTorch"' ||
  die "$PY needs torch (with a GPU), h5py and numpy"
for part in $PARTS; do
  [[ $part == pretrain || $part == finetune ]] || die "BENCH_PARTS: unknown part '$part' (pretrain, finetune)"
done

gpu=$(nvidia-smi -i 0 --query-gpu=name --format=csv,noheader)
case "$gpu" in
  *H100*PCIe*) peak=756 ;;  # the PCIe card's lower clocks and power
  *H100* | *H200*) peak=989 ;;
  *)
    peak=989
    [[ -n "${BENCH_PEAK_TFLOPS:-}" ]] ||
      echo "bench_gpu: warning: '$gpu' is not an H100/H200; MFU is against $peak TFLOP/s (set BENCH_PEAK_TFLOPS)" >&2
    ;;
esac
PEAK=${BENCH_PEAK_TFLOPS:-$peak}
lrllm_version=$(lrllm --version 2>&1 | sed -n 1p)
echo "bench_gpu: $gpu, peak $PEAK TFLOP/s; $lrllm_version; parts: $PARTS"

mkdir -p "$RAW" "$CACHE"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tokens=$CACHE/tokens.bin
[[ -f "$tokens" ]] || "$PY" tools/bench_report.py synth "$tokens" 4000000 "$VOCAB"

gpu_used() { nvidia-smi -i 0 --query-gpu=memory.used --format=csv,noheader,nounits; }

# run TAG CMD...: runs CMD with its output in $RAW/TAG.log while sampling the GPU's memory in use, and writes
# the most seen above the start to $RAW/TAG.gpumem (MiB); on failure one line to $RAW/TAG.err. Fails as CMD.
run() {
  local tag=$1 rc=0 before sampler line
  shift
  echo "bench_gpu: $tag"
  before=$(gpu_used)
  nvidia-smi -i 0 --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$RAW/$tag.smi" &
  sampler=$!
  timeout "$TIMEOUT" "$@" >"$RAW/$tag.log" 2>&1 || rc=$?
  kill "$sampler" 2>/dev/null || true
  wait "$sampler" 2>/dev/null || true
  awk -v b="$before" '$1 ~ /^[0-9]+$/ && $1 - b > m {m = $1 - b} END {print m + 0}' "$RAW/$tag.smi" >"$RAW/$tag.gpumem"
  rm -f "$RAW/$tag.smi"
  ((rc != 0)) || return 0
  if ((rc == 124)); then
    line="timed out after ${TIMEOUT}s"
  else
    # lrllm's own error line first, then a Python exception's last line, then whatever came last.
    line=$(grep 'lrllm: error' "$RAW/$tag.log" | tail -1 || true)
    [[ -n "$line" ]] || line=$(grep -E '^[A-Za-z_.]*(Error|Exception)\b' "$RAW/$tag.log" | tail -1 || true)
    [[ -n "$line" ]] || line=$(grep -v '^\s*$' "$RAW/$tag.log" | tail -1 || true)
    line="exit $rc: ${line:0:300}"
  fi
  echo "${line//|/\\|}" >"$RAW/$tag.err"
  echo "bench_gpu: $tag failed: $line" >&2
  return "$rc"
}

# lrllm_run TAG RUN_DIR CMD...: run, then the run's rate and memory from its metrics into $RAW/TAG.json.
lrllm_run() {
  local tag=$1 dir=$2 msg
  shift 2
  if run "$tag" "$@" --run.dir "$dir" &&
    ! msg=$("$PY" tools/bench_gpu.py lrllm "$dir" "$RAW/$tag.log" "$RAW/$tag.json" 2>&1); then
    echo "lrllm ran, but its metrics could not be read: ${msg##*$'\n'}" >"$RAW/$tag.err"
  fi
  rm -rf "$dir"  # checkpoints: large and not needed
}

# manifest PART TAG SYSTEM LABEL L H D T V B RANK LORA_RANK STEPS: what bench_gpu.py report reads.
manifest() {
  local part=$1
  shift
  echo "$*" >>"$RAW/$part.manifest"
}

if [[ " $PARTS " == *" pretrain "* ]]; then
  rm -f "$RAW"/pretrain*
  L=12 H=12 D=768
  # Every site low-rank: 16*d*r weights a block against 12*d*d dense, so r = 3d / (4 * compression).
  rank=$(awk -v d=$D -v c="$COMPRESSION" 'BEGIN {printf "%d", 3 * d / (4 * c) + 0.5}')
  for label in dense lowrank; do
    r=0
    lowrank=()
    if [[ $label == lowrank ]]; then
      r=$rank
      lowrank=(--lowrank.rank "$r" --lowrank.targets all)
    fi
    tag=pretrain-$label
    lrllm_run "$tag-lrllm" "$tmp/$tag" lrllm --mode pretrain --device cuda \
      --model.n_layer $L --model.n_head $H --model.d_model $D --model.seq_len $T --model.vocab_size $VOCAB \
      "${lowrank[@]}" --train.batch_size "$BATCH" --train.steps "$STEPS" --train.eval_every 0 \
      --train.eval_batches 1 --checkpoint.every 0 --run.log_every 1 --data.train "$tokens" --data.val "$tokens"
    manifest pretrain "$tag-lrllm" lrllm $label $L $H $D $T $VOCAB "$BATCH" "$r" 0 "$STEPS"
    run "$tag-torch" "$PY" tools/bench_gpu_torch.py --mode pretrain --compile --n_layer $L --n_head $H \
      --d_model $D --seq_len $T --vocab $VOCAB --batch "$BATCH" --rank "$r" --steps "$STEPS" \
      --warmup $TORCH_WARMUP --data "$tokens" --out "$RAW/$tag-torch.json" || true
    manifest pretrain "$tag-torch" torch $label $L $H $D $T $VOCAB "$BATCH" "$r" 0 "$STEPS"
  done
fi

if [[ " $PARTS " == *" finetune "* ]]; then
  rm -f "$RAW"/finetune*
  L=48 H=25 D=1600
  shape=(--model.n_layer "$L" --model.n_head "$H" --model.d_model "$D" --model.seq_len "$T" --model.vocab_size "$VOCAB")
  # The pack carries GPT-2's tokenizer; in a checkout, make data writes it.
  tokenizer=${LRLLM_ROOT:-input/data}/tokenizer
  tasks=$CACHE/tasks.jsonl
  [[ -f "$tasks" ]] || "$PY" tools/bench_gpu.py jsonl "$tasks" 256
  # The base: random weights stored as NF4, which finetuning loads as they are. Export runs on the CPU.
  base=$CACHE/gpt2-1.5B-nf4.h5
  if [[ ! -f "$base" ]] &&
    run finetune-base lrllm --mode export "${shape[@]}" --quant.bits 4 --data.output "$base.tmp"; then
    mv "$base.tmp" "$base"
  fi
  tag=finetune-lrllm
  if [[ -f "$base" ]]; then
    lrllm_run $tag "$tmp/$tag" lrllm --mode finetune --device cuda --model.init "$base" --data.train "$tasks" \
      --data.tokenizer_dir "$tokenizer" --lora.rank "$LORA_RANK" --quant.bits 4 --train.recompute block \
      --train.batch_size "$FT_BATCH" --train.steps "$FT_STEPS" --train.eval_every 0 --train.eval_batches 1 \
      --run.log_every 1
  else
    echo "no base model: $(cat "$RAW/finetune-base.err")" >"$RAW/$tag.err"
  fi
  manifest finetune $tag lrllm lrllm-nf4-lora $L $H $D $T $VOCAB "$FT_BATCH" 0 "$LORA_RANK" "$FT_STEPS"
  for mode in full lora; do
    tag=finetune-torch-$mode
    lora_r=0
    if [[ $mode == lora ]]; then lora_r=$LORA_RANK; fi
    run $tag "$PY" tools/bench_gpu_torch.py --mode $mode --n_layer $L --n_head $H --d_model $D --seq_len $T \
      --vocab $VOCAB --batch "$FT_BATCH" --lora_rank "$LORA_RANK" --steps "$FT_STEPS" --warmup $TORCH_WARMUP \
      --data "$tokens" --out "$RAW/$tag.json" || true
    manifest finetune $tag torch torch-$mode $L $H $D $T $VOCAB "$FT_BATCH" 0 "$lora_r" "$FT_STEPS"
  done
fi

"$PY" tools/bench_gpu.py report "$RAW" "$BENCH_OUT/gpu.md" --gpu "$gpu" --peak "$PEAK" \
  --lrllm-version "$lrllm_version" --torch-warmup $TORCH_WARMUP
