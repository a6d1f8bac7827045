#!/usr/bin/env bash
# Checks one of lrllm's tokenizers token for token against its reference, an npm package:
# gpt-3-encoder for GPT-2 (the default), llama-tokenizer-js for Llama-2 (second argument llama).
#  1. the strings of hard_strings.txt (one JSON string a line), encoded by reference.js and by
#     BUILD_DIR/tests/tokenizer_dump, must give identical id lists;
#  2. the token files of input/data/corpus/{train,val}, written by `lrllm --mode tokenize`, must hold
#     exactly reference.js's encodings of the documents, each after its delimiter (which also checks the
#     token file writer). GPT-2: input/data/pretrain_{train,val}.bin, each document after <|endoftext|>.
#     Llama: written here, each document after <s>; the reference needs minutes for all of train, so
#     train is checked on every Nth document in name order, N = $LRLLM_LLAMA_TRAIN_EVERY (default 8; 1
#     checks all), and val whole.
# Needs `make data` to have run. Prints a PASS or FAIL line per check (the protocol of tests/run.sh) and
# exits 0 only when everything is equal.
# usage: tests/tokenizer/compare.sh [BUILD_DIR] [gpt2|llama]   (default build gpt2; run from anywhere)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
build=${1:-build}
kind=${2:-gpt2}
dump=$build/tests/tokenizer_dump
reference=tests/tokenizer/reference.js
strings=tests/tokenizer/hard_strings.txt
data=input/data
case $kind in
  gpt2)
    package=$data/npm/gpt-3-encoder
    tokenizer=${LRLLM_TOKENIZER_DIR:-$data/tokenizer}
    needs=("$package/Encoder.js" "$tokenizer/encoder.json" "$data/pretrain_train.bin" "$data/pretrain_val.bin")
    ;;
  llama)
    package=$data/npm/llama-tokenizer-js
    tokenizer=$data/tokenizer-llama
    needs=("$build/lrllm" "$package/llama-tokenizer.js" "$tokenizer/tokenizer.json" "$data/corpus/train")
    every=${LRLLM_LLAMA_TRAIN_EVERY:-8}
    [[ $every =~ ^[1-9][0-9]*$ ]] || { echo "compare: LRLLM_LLAMA_TRAIN_EVERY must be a positive integer" >&2; exit 2; }
    ;;
  *)
    echo "usage: tests/tokenizer/compare.sh [BUILD_DIR] [gpt2|llama]" >&2
    exit 2
    ;;
esac

for need in "$dump" "${needs[@]}"; do
  if [[ ! -e $need ]]; then
    echo "compare: $need is missing (run make and make data)" >&2
    exit 2
  fi
done

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
status=0

if ! node "$reference" "$package" strings "$strings" >"$tmp/reference.txt" ||
  ! "$dump" "$tokenizer" strings "$strings" >"$tmp/lrllm.txt"; then
  echo "FAIL $strings: an encoder stopped with an error"
  exit 1
fi
# Lines hold no tabs (JSON arrays), so paste lines the outputs up (a missing line shows as an empty
# field); awk reads to the end so that paste never dies of SIGPIPE under pipefail.
first=$(paste "$tmp/reference.txt" "$tmp/lrllm.txt" | awk -F'\t' '!found && $1 != $2 { print NR; found = 1 }')
count=$(wc -l <"$strings")
if [[ -n $first ]]; then
  echo "FAIL $kind $strings line $first: $(sed -n "${first}p" "$strings")"
  echo "  reference $(sed -n "${first}p" "$tmp/reference.txt")"
  echo "  lrllm     $(sed -n "${first}p" "$tmp/lrllm.txt")"
  status=1
else
  tokens=$(awk '$0 != "[]" { n += gsub(/,/, ",") + 1 } END { print n + 0 }' "$tmp/reference.txt")
  echo "PASS $kind $strings: $count strings, $tokens tokens equal"
fi

# Writes the token file that lrllm makes of the documents of $1 to $2 (Llama only: GPT-2's are made by
# `make data`).
tokenize() {
  "$build/lrllm" --mode tokenize --data.tokenizer_dir "$tokenizer" --data.input "$1" --data.output "$2" >/dev/null
}

for split in train val; do
  docs=$data/corpus/$split
  bin=$data/pretrain_$split.bin
  what=$docs
  if [[ $kind == llama ]]; then
    bin=$tmp/llama_$split.bin
    if [[ $split == train && $every -gt 1 ]]; then
      # The share is copied, not linked: reference.js lists regular files only.
      mkdir "$tmp/train_share"
      find "$docs" -maxdepth 1 -type f -printf '%f\n' | LC_ALL=C sort | awk -v n="$every" 'NR % n == 1' |
        while read -r name; do cp "$docs/$name" "$tmp/train_share/"; done
      what="every ${every}th document of $docs"
      docs=$tmp/train_share
    fi
    if ! tokenize "$docs" "$bin"; then
      echo "FAIL $kind $what: lrllm --mode tokenize stopped with an error"
      status=1
      continue
    fi
  fi
  if node "$reference" "$package" corpus "$docs" "$bin" >"$tmp/corpus.txt"; then
    echo "PASS $kind $what: $(cat "$tmp/corpus.txt")"
  else
    echo "FAIL $kind $what: $bin differs from the reference:"
    cat "$tmp/corpus.txt"
    status=1
  fi
done
exit $status
