#!/usr/bin/env bash
# Checks lrllm's tokenizer token for token against the reference, the npm package gpt-3-encoder:
#  1. the strings of hard_strings.txt (one JSON string a line), encoded by reference.js and by
#     BUILD_DIR/tests/tokenizer_dump, must give identical id lists;
#  2. input/data/pretrain_{train,val}.bin, written by `lrllm --mode tokenize`, must hold exactly
#     reference.js's encodings of the documents of input/data/corpus/{train,val}, each after <|endoftext|>
#     (which also checks the token file writer).
# Needs `make data` to have run. Prints a PASS or FAIL line per check (the protocol of tests/run.sh) and
# exits 0 only when everything is equal.
# usage: tests/tokenizer/compare.sh [BUILD_DIR]   (default build; run from anywhere)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
build=${1:-build}
dump=$build/tests/tokenizer_dump
reference=tests/tokenizer/reference.js
strings=tests/tokenizer/hard_strings.txt
package=input/data/npm/gpt-3-encoder
tokenizer=${LRLLM_TOKENIZER_DIR:-input/data/tokenizer}
data=input/data

for need in "$dump" "$package/Encoder.js" "$tokenizer/encoder.json" "$data/pretrain_train.bin" "$data/pretrain_val.bin"; do
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
  echo "FAIL $strings line $first: $(sed -n "${first}p" "$strings")"
  echo "  reference $(sed -n "${first}p" "$tmp/reference.txt")"
  echo "  lrllm     $(sed -n "${first}p" "$tmp/lrllm.txt")"
  status=1
else
  tokens=$(awk '$0 != "[]" { n += gsub(/,/, ",") + 1 } END { print n + 0 }' "$tmp/reference.txt")
  echo "PASS $strings: $count strings, $tokens tokens equal"
fi

for split in train val; do
  if node "$reference" "$package" corpus "$data/corpus/$split" "$data/pretrain_$split.bin" >"$tmp/corpus.txt"; then
    echo "PASS $(cat "$tmp/corpus.txt")"
  else
    echo "FAIL $data/pretrain_$split.bin differs from the reference:"
    cat "$tmp/corpus.txt"
    status=1
  fi
done
exit $status
