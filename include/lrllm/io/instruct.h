// Instruction data for finetuning and evaluation (docs/design.md, Instruction data): JSONL examples, the
// prompt templates, their encoding into sequences whose loss falls on the answer only, and their batches.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "lrllm/core/config.h"
#include "lrllm/io/data.h"
#include "lrllm/io/tokenizer.h"

namespace lrllm {

// One object of the JSONL layout that FinGPT's and Alpaca's data sets share.
struct Example {
  std::string instruction, input, output;
};

// Reads one example a line: an object with string fields instruction and output, and optionally input
// (missing means ""); other fields are ignored and blank lines skipped. Throws InputError "PATH:LINE: ..."
// for a line that is not JSON, not an object, lacks instruction or output, or has a non-string one of the
// three; InputError naming the file when it cannot be read or holds no example.
std::vector<Example> read_jsonl(const std::string& path);

// The prompt templates (data.template): FinGPT's, "Instruction: {instruction}\nInput: {input}\nAnswer: ",
// and Stanford Alpaca's ("Below is an instruction that describes a task ... ### Response:\n", its shorter
// form when the input is empty). A finetuned model's file records its template (/config prompt_template).

std::string prompt_of(const Example& e, PromptTemplate t);

// The tokens of the prompt and of an answer after it. GPT-2's BPE joins a space to the word that follows it,
// so a template's final space is encoded as the start of the answer (" positive", one token), as the
// pretrained model saw such text: prompt + answer tokens are the tokens of prompt_of(e, t) + answer.
std::vector<int> prompt_tokens_of(const Tokenizer& tok, const Example& e, PromptTemplate t);
std::vector<int> answer_tokens_of(const Tokenizer& tok, const std::string& answer, PromptTemplate t);

// A training sequence: targets[i] is the token after tokens[i], or -1 where it carries no loss.
struct Encoded {
  std::vector<int32_t> tokens, targets;
  std::vector<int32_t> positions;  // packed rows (pack_examples) only: each token's position in its example
};

// prompt tokens + answer tokens + <|endoftext|>, shifted into inputs and next-token targets. Only the
// positions that predict an answer token or the end-of-text carry a target. The prompt and the answer are
// encoded separately, so the prompt's tokens are exactly those that greedy generation starts from at
// evaluation. When the sequence is longer than seq_len the prompt loses tokens from its left end (the
// instruction's start); throws InputError when the answer and end-of-text do not fit beside at least one
// prompt token.
Encoded encode_example(const Tokenizer& tok, const Example& e, int seq_len, PromptTemplate t);

// Rows of whole examples, each row at most seq_len tokens: examples in the given order, each appended to
// the current row while it fits, else starting the next (every example is at most seq_len, encode_example's
// guarantee). A row's positions restart at 0 with each example, so attention stays inside it.
std::vector<Encoded> pack_examples(const std::vector<Encoded>& examples, int seq_len);

// Fills `out` with rows data[indices[r]], right-padded with token pad and target -1 (position 0) to the
// longest of them, or to pad_to when it is > 0. Rows with positions (packed) keep them. Every row must be at
// most seq_len long.
void fill_padded(const std::vector<Encoded>& data, const std::vector<std::size_t>& indices, int seq_len,
                 int pad_to, int32_t pad, Batch& out);

}  // namespace lrllm
