#!/usr/bin/env node
// The reference side of tests/tokenizer/compare.sh: encodes with the npm package gpt-3-encoder, a port
// of OpenAI's GPT-2 encoder, or with llama-tokenizer-js (Llama-2's tokenizer), whichever PACKAGE_DIR holds.
//
// usage: node reference.js PACKAGE_DIR strings FILE
//          FILE holds one JSON string a line; prints each one's token ids as a JSON array, a line each
//          (Llama: encode(text) with its defaults, so <s> first).
//        node reference.js PACKAGE_DIR corpus DOC_DIR TOKEN_FILE
//          checks that TOKEN_FILE (llm.c format) holds, for each file of DOC_DIR in name order, the
//          document as lrllm writes it: <|endoftext|> and the file's tokens (GPT-2), or the reference's
//          encode(text), which starts with <s> (Llama); prints a summary, or the first mismatch and exits 1.
'use strict';

const fs = require('fs');
const path = require('path');
const { pathToFileURL } = require('url');

const TOKEN_FILE_MAGIC = 20240520;
const TOKEN_FILE_VERSION = 1;
const HEADER_BYTES = 256 * 4;

function usage() {
  console.error('usage: node reference.js PACKAGE_DIR strings FILE | corpus DOC_DIR TOKEN_FILE');
  process.exit(2);
}

// gpt-3-encoder's encode() grows its result with Array.concat per pre-token, quadratic in the text's
// length, so long documents are encoded in pieces. A piece may end only where a non-space character is
// followed by a space and a letter: the pre-tokenization pattern has no look-behind, and no alternative
// can match across that point (a match holding the non-space character cannot take the space, and the
// space begins ` ?\p{L}+`), so the pieces' pre-tokens are exactly the whole text's.
const PIECE_BREAK = /(?<=\S) (?=\p{L})/gu;
const PIECE_CHARS = 2000;

function encodeLong(encode, text) {
  const ids = [];
  const append = (piece) => {
    for (const id of encode(piece)) ids.push(id);
  };
  let start = 0;
  for (const m of text.matchAll(PIECE_BREAK)) {
    if (m.index - start >= PIECE_CHARS) {
      append(text.slice(start, m.index));
      start = m.index;
    }
  }
  append(text.slice(start));
  return ids;
}

function strings(encode, file) {
  const lines = fs.readFileSync(file, 'utf8').split('\n');
  if (lines[lines.length - 1] === '') lines.pop();
  const out = lines.map((line, i) => {
    let text;
    try {
      text = JSON.parse(line);
    } catch (e) {
      throw new Error(`${file}:${i + 1}: not a JSON string: ${e.message}`);
    }
    if (typeof text !== 'string') throw new Error(`${file}:${i + 1}: not a JSON string`);
    return JSON.stringify(encode(text));
  });
  process.stdout.write(out.map((line) => line + '\n').join(''));
}

function corpus({ document, decode }, docDir, tokenFile) {
  const buf = fs.readFileSync(tokenFile);
  if (buf.length < HEADER_BYTES) throw new Error(`${tokenFile}: shorter than the header`);
  const [magic, version, count] = [0, 4, 8].map((offset) => buf.readInt32LE(offset));
  if (magic !== TOKEN_FILE_MAGIC || version !== TOKEN_FILE_VERSION)
    throw new Error(`${tokenFile}: bad header (magic ${magic}, version ${version})`);
  if (buf.length !== HEADER_BYTES + 2 * count)
    throw new Error(`${tokenFile}: ${buf.length} bytes, but the header counts ${count} tokens`);
  const tokenAt = (i) => buf.readUInt16LE(HEADER_BYTES + 2 * i);

  // Byte order of the names, as lrllm sorts them.
  const names = fs
    .readdirSync(docDir, { withFileTypes: true })
    .filter((entry) => entry.isFile())
    .map((entry) => entry.name)
    .sort((a, b) => Buffer.compare(Buffer.from(a), Buffer.from(b)));
  let cursor = 0;
  for (const name of names) {
    const text = fs.readFileSync(path.join(docDir, name), 'utf8');
    const expected = document(text);
    for (let i = 0; i < expected.length; ++i) {
      const at = cursor + i;
      if (at >= count || tokenAt(at) !== expected[i]) {
        const got = [];
        for (let k = at; k < Math.min(count, at + 8); ++k) got.push(tokenAt(k));
        console.log(
          `first mismatch at token ${at}, token ${i} of document ${name}:\n` +
            `  reference ${JSON.stringify(expected.slice(i, i + 8))}\n` +
            `  lrllm     ${JSON.stringify(got)}\n` +
            `  text near ${JSON.stringify(decode(expected.slice(Math.max(1, i - 8), i + 8)))}`,
        );
        process.exit(1);
      }
    }
    cursor += expected.length;
  }
  if (cursor !== count) {
    console.log(`${tokenFile} holds ${count} tokens, but the documents of ${docDir} make ${cursor}`);
    process.exit(1);
  }
  console.log(`${tokenFile}: ${names.length} documents, ${count} tokens equal`);
}

// gpt-3-encoder's Encoder.js is the package itself (index.js only re-exports it); it has no dependencies.
function gpt2(packageDir) {
  const encoder = require(path.join(packageDir, 'Encoder.js'));
  const eot = JSON.parse(fs.readFileSync(path.join(packageDir, 'encoder.json'), 'utf8'))['<|endoftext|>'];
  return {
    encode: encoder.encode,
    document: (text) => [eot, ...encodeLong(encoder.encode, text)],
    decode: encoder.decode,
  };
}

// llama-tokenizer-js is an ES module whose default export is the Llama-2 tokenizer.
async function llama(file) {
  const tokenizer = (await import(pathToFileURL(file).href)).default;
  const BOS = 1;
  return {
    encode: (text) => tokenizer.encode(text),
    // The reference gives empty text no tokens at all, where lrllm still starts the document with <s>.
    document: (text) => (text.length === 0 ? [BOS] : tokenizer.encode(text)),
    decode: (ids) => tokenizer.decode(ids, false, false),
  };
}

async function main() {
  const args = process.argv.slice(2);
  if (args.length < 2) usage();
  const packageDir = path.resolve(args[0]);
  const llamaFile = path.join(packageDir, 'llama-tokenizer.js');
  const reference = fs.existsSync(llamaFile) ? await llama(llamaFile) : gpt2(packageDir);
  if (args[1] === 'strings' && args.length === 3) strings(reference.encode, args[2]);
  else if (args[1] === 'corpus' && args.length === 4) corpus(reference, args[2], args[3]);
  else usage();
}

main().catch((e) => {
  console.error(`reference.js: ${e.stack}`);
  process.exit(1);
});
