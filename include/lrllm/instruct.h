// Instruction data for finetuning and evaluation (docs/design.md, Instruction data): JSONL examples, FinGPT's
// prompt template, and their encoding into sequences whose loss falls on the answer only.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "lrllm/tokenizer.h"

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

// FinGPT's template: "Instruction: {instruction}\nInput: {input}\nAnswer: ".
std::string prompt_of(const Example& e);

// The tokens of the prompt and of an answer after it. GPT-2's BPE joins a space to the word that follows it,
// so the template's final space is encoded as the start of the answer (" positive", one token), as the
// pretrained model saw such text: prompt + answer tokens are the tokens of prompt_of(e) + answer.
std::vector<int> prompt_tokens_of(const Tokenizer& tok, const Example& e);
std::vector<int> answer_tokens_of(const Tokenizer& tok, const std::string& answer);

// A training sequence: targets[i] is the token after tokens[i], or -1 where it carries no loss.
struct Encoded {
  std::vector<int32_t> tokens, targets;
};

// prompt tokens + answer tokens + <|endoftext|>, shifted into inputs and next-token targets. Only the
// positions that predict an answer token or the end-of-text carry a target. The prompt and the answer are
// encoded separately, so the prompt's tokens are exactly those that greedy generation starts from at
// evaluation. When the sequence is longer than seq_len the prompt loses tokens from its left end (the
// instruction's start); throws InputError when the answer and end-of-text do not fit beside at least one
// prompt token.
Encoded encode_example(const Tokenizer& tok, const Example& e, int seq_len);

// Fills a [indices.size(), seq_len] batch: row r holds data[indices[r]], right-padded with token pad and
// target -1. Every sequence must be at most seq_len long (encode_example's guarantee).
void fill_padded(const std::vector<Encoded>& data, const std::vector<std::size_t>& indices, int seq_len,
                 int32_t pad, int32_t* tokens, int32_t* targets);

}  // namespace lrllm
