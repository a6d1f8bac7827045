#!/usr/bin/env bash
# Generation speed with and without the key/value cache (part of `make bench`; runs alone too): greedy
# `--mode generate` of GPT-2 and Llama models of one small shape with random weights, tokens/s as lrllm
# reports it. Usage: tools/bench_generate.sh [BUILD_DIR] (default build). Writes bench-out/generate.md.
# Knobs (environment): BENCH_THREADS (default 2), BENCH_NEW_TOKENS (default 200).
set -euo pipefail

BUILD=${1:-build}
cd "$(dirname "$0")/.."
PY=/usr/bin/python3
OUT=bench-out
THREADS=${BENCH_THREADS:-2}
NEW=${BENCH_NEW_TOKENS:-200}
# n_layer n_head d_model seq_len; Llama with 2 kv heads (grouped-query attention)
L=4 H=4 D=256 T=256 KV=2
VOCAB=50257
PROMPT="Shares of the bank rose after the report"

[[ -x "$BUILD/lrllm" ]] || { echo "bench_generate: $BUILD/lrllm is missing; run make first" >&2; exit 1; }
mkdir -p "$OUT"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export OMP_NUM_THREADS=$THREADS OPENBLAS_NUM_THREADS=$THREADS
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

# Zero steps write the initial weights as a checkpoint; the training data only has to exist.
data="$tmp/tokens.bin"
"$PY" tools/bench_report.py synth "$data" 100000 "$VOCAB"
cpu=$("$PY" -c 'import sys; sys.path.insert(0, "tools"); from bench_report import cpu_name; print(cpu_name())')
echo "bench_generate: $cpu, $THREADS threads, $NEW new tokens"

# Cores other processes kept busy during a run (as bench.sh's `watched`): the machine's busy clock ticks less
# this shell's children's, over the wall time. Timings mean little where it is high.
HZ=$(getconf CLK_TCK)
machine_ticks() { awk '$1 == "cpu" {print $2 + $3 + $4 + $7 + $8 + $9; exit}' /proc/stat; }
own_ticks() { sed 's/.*) //' "/proc/$$/stat" | awk '{print $14 + $15}'; }

rows=()
for arch in gpt2 llama; do
  arch_opts=(--model.arch "$arch")
  [[ $arch == llama ]] && arch_opts+=(--model.n_kv_head "$KV")
  "$BUILD/lrllm" --mode pretrain --device cpu "${arch_opts[@]}" --model.n_layer "$L" --model.n_head "$H" \
    --model.d_model "$D" --model.seq_len "$T" --model.vocab_size "$VOCAB" --train.steps 0 --train.eval_every 0 \
    --data.train "$data" --run.dir "$tmp/$arch" >"$tmp/$arch-pretrain.log" 2>&1 ||
    { echo "bench_generate: pretrain of $arch failed:" >&2; tail -3 "$tmp/$arch-pretrain.log" >&2; exit 1; }
  rate=()
  others=()
  for cache in true false; do
    echo "bench_generate: $arch, kv_cache $cache"
    m0=$(machine_ticks) o0=$(own_ticks) t0=$(date +%s.%N)
    "$BUILD/lrllm" --mode generate --device cpu --model.init "$tmp/$arch/ckpt_000000.h5" \
      --generate.prompt "$PROMPT" --generate.max_new_tokens "$NEW" --generate.kv_cache "$cache" \
      >"$tmp/$arch-$cache.out" 2>"$tmp/$arch-$cache.err" ||
      { echo "bench_generate: generate failed:" >&2; tail -3 "$tmp/$arch-$cache.err" >&2; exit 1; }
    others+=("$(awk -v m="$(($(machine_ticks) - m0))" -v o="$(($(own_ticks) - o0))" -v hz="$HZ" -v t0="$t0" \
      -v t1="$(date +%s.%N)" 'BEGIN {x = (m - o) / hz / (t1 - t0); printf "%.2f", x < 0 ? 0 : x}')")
    line=$(grep '^generated ' "$tmp/$arch-$cache.err")
    rate+=("$(sed -E 's/.*\(([0-9.]+) tokens\/s\).*/\1/' <<<"$line")")
    count=$(awk '{print $2}' <<<"$line")
  done
  same=$(cmp -s "$tmp/$arch-true.out" "$tmp/$arch-false.out" && echo yes || echo NO)
  label=$arch
  [[ $arch == llama ]] && label="llama ($KV kv heads)"
  speedup=$(awk -v a="${rate[0]}" -v b="${rate[1]}" 'BEGIN {printf "%.1fx", a / b}')
  rows+=("| $label | $count | ${rate[0]} | ${rate[1]} | $speedup | $same | ${others[0]} / ${others[1]} |")
done

{
  echo "Greedy generation on $cpu, $THREADS threads: L$L d$D H$H seq_len $T, vocab $VOCAB, random weights,"
  echo "a $(wc -w <<<"$PROMPT")-word prompt, up to $NEW new tokens"
  echo
  echo "| model | tokens | KV cache tok/s | no cache tok/s | speedup | same text | other processes' cores (cache / none) |"
  echo "|---|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
} | tee "$OUT/generate.md"
