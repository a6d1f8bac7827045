// Instruction data: the JSONL reader and its errors, FinGPT's prompt, and the encoding that puts the loss on
// the answer only. Uses the real GPT-2 vocabulary from $LRLLM_TOKENIZER_DIR, by default input/data/tokenizer
// (made by `make data`); without it these tests fail rather than skip.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "lrllm/core/common.h"
#include "lrllm/io/instruct.h"
#include "lrllm/io/tokenizer.h"
#include "test_util.h"

namespace lrllm {
namespace {

constexpr PromptTemplate kFinGpt = PromptTemplate::fingpt;

std::string tokenizer_dir() {
  const char* dir = std::getenv("LRLLM_TOKENIZER_DIR");
  return dir && *dir ? dir : "input/data/tokenizer";
}

// Loaded once. Every test that needs it throws, and so fails, when the files are missing.
const Tokenizer& gpt2() {
  static std::string error;
  static const std::unique_ptr<Tokenizer> tok = []() -> std::unique_ptr<Tokenizer> {
    try {
      return std::make_unique<Tokenizer>(
          Tokenizer::load(tokenizer_dir() + "/encoder.json", tokenizer_dir() + "/vocab.bpe"));
    } catch (const std::exception& e) {
      error = "cannot load the GPT-2 tokenizer from " + tokenizer_dir() + " (" + e.what() +
              "); run `make data` or set LRLLM_TOKENIZER_DIR";
      return nullptr;
    }
  }();
  if (!tok) throw std::runtime_error(error);
  return *tok;
}

std::string write(const test::TempDir& dir, const std::string& name, const std::string& text) {
  const std::string path = dir.file(name);
  std::ofstream(path, std::ios::binary) << text;
  return path;
}

std::vector<int32_t> encode32(const std::string& text) {
  const std::vector<int> ids = gpt2().encode(text);
  return {ids.begin(), ids.end()};
}

TEST(Instruct, ReadsJsonlWithOptionalInputAndBlankLines) {
  test::TempDir dir;
  const std::string path = write(dir, "ok.jsonl",
                                 "{\"instruction\": \"Classify.\", \"input\": \"Prices rose.\", \"output\": "
                                 "\"positive\"}\n"
                                 "\n  \r\n"
                                 "{\"output\": \"ham\", \"instruction\": \"Spam?\", \"extra\": 3}\r\n"
                                 "{\"instruction\": \"Q\\u00e9\", \"input\": \"a\\nb\", \"output\": \"\"}");
  const std::vector<Example> ex = read_jsonl(path);
  ASSERT_EQ(ex.size(), 3u);
  EXPECT_EQ(ex[0].instruction, "Classify.");
  EXPECT_EQ(ex[0].input, "Prices rose.");
  EXPECT_EQ(ex[0].output, "positive");
  EXPECT_EQ(ex[1].instruction, "Spam?");
  EXPECT_EQ(ex[1].input, "");
  EXPECT_EQ(ex[1].output, "ham");
  EXPECT_EQ(ex[2].instruction, "Q\xc3\xa9");
  EXPECT_EQ(ex[2].input, "a\nb");
  EXPECT_EQ(ex[2].output, "");
}

TEST(Instruct, BadLinesNameFileAndLine) {
  test::TempDir dir;
  const std::string good = "{\"instruction\": \"i\", \"output\": \"o\"}\n";
  const struct {
    const char* name;
    std::string text;
    const char* what;
  } cases[] = {
      {"notjson.jsonl", good + "\n{\"instruction\": \"i\", \"output\": }\n", ":3: not valid JSON"},
      {"truncated.jsonl", good + "{\"instruction\": \"i\"", ":2: not valid JSON"},
      {"array.jsonl", good + "[\"i\", \"o\"]\n", ":2: expected a JSON object"},
      {"nooutput.jsonl", good + good + "{\"instruction\": \"i\", \"input\": \"x\"}\n",
       ":3: missing field \"output\""},
      {"noinstruction.jsonl", "{\"output\": \"o\"}\n", ":1: missing field \"instruction\""},
      {"numoutput.jsonl", "{\"instruction\": \"i\", \"output\": 1}\n", ":1: field \"output\" is a number"},
      {"nullinput.jsonl", "{\"instruction\": \"i\", \"input\": null, \"output\": \"o\"}\n",
       ":1: field \"input\" is a null"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    const std::string path = write(dir, c.name, c.text);
    test::expect_input_error([&] { read_jsonl(path); }, path + c.what);
  }
  const std::string empty = write(dir, "empty.jsonl", "\n\n");
  test::expect_input_error([&] { read_jsonl(empty); }, empty + ": no examples");
  test::expect_input_error([&] { read_jsonl(dir.file("missing.jsonl")); }, dir.file("missing.jsonl"));
}

TEST(Instruct, PromptIsFinGptTemplate) {
  EXPECT_EQ(prompt_of({"What is the sentiment?", "Sales fell.", "negative"}, PromptTemplate::fingpt),
            "Instruction: What is the sentiment?\nInput: Sales fell.\nAnswer: ");
  EXPECT_EQ(prompt_of({"Say hi.", "", "hi"}, PromptTemplate::fingpt),
            "Instruction: Say hi.\nInput: \nAnswer: ");
}

TEST(Instruct, LossOnlyOnAnswerAndEndOfText) {
  const Tokenizer& tok = gpt2();
  const Example e{"What is the sentiment of this news?", "Profits rose sharply.", "positive"};
  const std::vector<int> p = prompt_tokens_of(tok, e, kFinGpt), a = answer_tokens_of(tok, e.output, kFinGpt);
  const std::vector<int32_t> prompt(p.begin(), p.end()), answer(a.begin(), a.end());
  std::vector<int32_t> full = prompt;
  full.insert(full.end(), answer.begin(), answer.end());
  // The text is the template's, tokenized as GPT-2 would the whole: "Answer:" then " positive".
  EXPECT_EQ(full, encode32(prompt_of(e, kFinGpt) + e.output));
  EXPECT_EQ(answer.size(), 1u);
  full.push_back(tok.eot());

  const Encoded enc = encode_example(tok, e, 64, kFinGpt);
  ASSERT_EQ(enc.tokens.size(), full.size() - 1);
  ASSERT_EQ(enc.targets.size(), enc.tokens.size());
  EXPECT_EQ(enc.tokens, std::vector<int32_t>(full.begin(), full.end() - 1));
  for (std::size_t i = 0; i < enc.tokens.size(); ++i) {
    // Position i predicts full[i + 1]: only when that token is an answer token or the end-of-text.
    if (i + 1 < prompt.size()) {
      EXPECT_EQ(enc.targets[i], -1) << "prompt position " << i;
    } else {
      EXPECT_EQ(enc.targets[i], full[i + 1]) << "answer position " << i;
    }
  }
  EXPECT_EQ(enc.targets.back(), tok.eot());
  EXPECT_EQ(static_cast<std::size_t>(
                std::count_if(enc.targets.begin(), enc.targets.end(), [](int32_t t) { return t >= 0; })),
            answer.size() + 1);
}

// The masked loss property: what the prompt says changes no target, so it cannot change which terms the
// loss sums; only the answer's targets are live, and they are the same for any prompt.
TEST(Instruct, PromptContentDoesNotChangeTargets) {
  const Tokenizer& tok = gpt2();
  const Encoded a =
      encode_example(tok, {"Classify the message.", "Cheap pills now!!!", "spam"}, 128, kFinGpt);
  const Encoded b = encode_example(
      tok, {"Tell me the class of this email please.", "Meeting at 3pm.", "spam"}, 128, kFinGpt);
  const auto live = [](const Encoded& enc) {
    std::vector<int32_t> t;
    for (int32_t x : enc.targets) {
      if (x >= 0) t.push_back(x);
    }
    return t;
  };
  EXPECT_NE(a.tokens.size(), b.tokens.size());
  EXPECT_EQ(live(a), live(b));
  std::vector<int32_t> expected = encode32(" spam");
  expected.push_back(tok.eot());
  EXPECT_EQ(live(a), expected);
}

TEST(Instruct, TruncatesPromptFromTheLeft) {
  const Tokenizer& tok = gpt2();
  const Example e{"A long instruction that will not fit in a short window at all, so it is cut.",
                  "Input text.", "neutral"};
  const Encoded whole = encode_example(tok, e, 1024, kFinGpt);
  const std::vector<int32_t> answer = encode32(" " + e.output);
  const int seq_len = 10;
  const Encoded cut = encode_example(tok, e, seq_len, kFinGpt);
  ASSERT_EQ(cut.tokens.size(), static_cast<std::size_t>(seq_len));
  // The tail of the whole sequence: the prompt's last tokens, then the answer.
  EXPECT_EQ(cut.tokens, std::vector<int32_t>(whole.tokens.end() - seq_len, whole.tokens.end()));
  EXPECT_EQ(cut.targets, std::vector<int32_t>(whole.targets.end() - seq_len, whole.targets.end()));
  EXPECT_EQ(cut.tokens.back(), answer.back());

  // Exactly enough room: one prompt token, then the answer; the end-of-text is only a target.
  const int tight = static_cast<int>(answer.size()) + 1;
  const Encoded min = encode_example(tok, e, tight, kFinGpt);
  ASSERT_EQ(min.tokens.size(), answer.size() + 1);
  EXPECT_EQ(min.tokens[0], whole.tokens[whole.tokens.size() - answer.size() - 1]);
  EXPECT_EQ(min.targets[0], answer[0]);
  EXPECT_EQ(min.targets.back(), tok.eot());

  const Example long_answer{"i", "", "one two three four five six seven eight nine ten eleven twelve"};
  test::expect_input_error([&] { encode_example(tok, long_answer, 8, kFinGpt); }, "does not fit seq_len 8");
  const std::size_t long_len = encode32(" " + long_answer.output).size();
  EXPECT_NO_THROW(encode_example(tok, long_answer, static_cast<int>(long_len) + 1, kFinGpt));
  test::expect_input_error([&] { encode_example(tok, long_answer, static_cast<int>(long_len), kFinGpt); },
                           "does not fit");
}

TEST(Instruct, FillPaddedToTheLongestRowOrToAFixedLength) {
  const std::vector<Encoded> data = {
      {{1, 2, 3}, {-1, 3, 4}, {}},
      {{5, 6, 7, 8, 9}, {-1, -1, -1, 9, 10}, {}},
      {{11}, {12}, {}},
  };
  const int seq_len = 6, pad = 50256;
  Batch batch;
  fill_padded(data, {2, 0}, seq_len, 0, pad, batch);
  EXPECT_EQ(batch.rows, 2);
  EXPECT_EQ(batch.T, 3) << "the longest of the rows picked, not seq_len";
  EXPECT_EQ(batch.tokens, (std::vector<int32_t>{11, pad, pad, 1, 2, 3}));
  EXPECT_EQ(batch.targets, (std::vector<int32_t>{12, -1, -1, -1, 3, 4}));
  EXPECT_TRUE(batch.positions.empty());
  EXPECT_EQ(batch.real_tokens, 4);

  fill_padded(data, {2, 0, 1}, seq_len, seq_len, pad, batch);
  EXPECT_EQ(batch.T, seq_len);
  EXPECT_EQ(batch.tokens,
            (std::vector<int32_t>{11, pad, pad, pad, pad, pad, 1, 2, 3, pad, pad, pad, 5, 6, 7, 8, 9, pad}));
  EXPECT_EQ(batch.targets,
            (std::vector<int32_t>{12, -1, -1, -1, -1, -1, -1, 3, 4, -1, -1, -1, -1, -1, -1, 9, 10, -1}));
  EXPECT_EQ(batch.real_tokens, 9);
  EXPECT_THROW(fill_padded(data, {1}, 4, 0, pad, batch), std::invalid_argument);
}

TEST(Instruct, PackingKeepsExamplesWholeInOrderWithTheirOwnPositions) {
  const std::vector<Encoded> data = {
      {{1, 2, 3}, {-1, 3, 4}, {}},
      {{5, 6}, {6, 7}, {}},
      {{8, 9, 10, 11}, {-1, -1, 11, 12}, {}},
      {{13}, {14}, {}},
  };
  const std::vector<Encoded> rows = pack_examples(data, 6);
  ASSERT_EQ(rows.size(), 2u) << "3 + 2 fit in 6; 4 does not fit beside them; 4 + 1 do";
  EXPECT_EQ(rows[0].tokens, (std::vector<int32_t>{1, 2, 3, 5, 6}));
  EXPECT_EQ(rows[0].targets, (std::vector<int32_t>{-1, 3, 4, 6, 7}));
  EXPECT_EQ(rows[0].positions, (std::vector<int32_t>{0, 1, 2, 0, 1}));
  EXPECT_EQ(rows[1].tokens, (std::vector<int32_t>{8, 9, 10, 11, 13}));
  EXPECT_EQ(rows[1].positions, (std::vector<int32_t>{0, 1, 2, 3, 0}));

  const int pad = 50256;
  Batch batch;
  fill_padded(rows, {0, 1}, 6, 0, pad, batch);
  EXPECT_EQ(batch.T, 5);
  EXPECT_EQ(batch.positions, (std::vector<int32_t>{0, 1, 2, 0, 1, 0, 1, 2, 3, 0}));
  EXPECT_EQ(batch.real_tokens, 10);
  fill_padded(rows, {0}, 6, 6, pad, batch);
  EXPECT_EQ(batch.positions, (std::vector<int32_t>{0, 1, 2, 0, 1, 0})) << "padding sits at position 0";
  EXPECT_EQ(batch.targets.back(), -1);
  EXPECT_THROW(pack_examples(data, 3), std::invalid_argument);
}

TEST(Instruct, AlpacaTemplateAndItsAnswerTokens) {
  const Example with_input{"Classify the sentiment.", "Sales fell.", "negative"};
  EXPECT_EQ(prompt_of(with_input, PromptTemplate::alpaca),
            "Below is an instruction that describes a task, paired with an input that provides further "
            "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
            "Classify the sentiment.\n\n### Input:\nSales fell.\n\n### Response:\n");
  EXPECT_EQ(
      prompt_of({"Say hi.", "", "hi"}, PromptTemplate::alpaca),
      "Below is an instruction that describes a task. Write a response that appropriately completes the "
      "request.\n\n### Instruction:\nSay hi.\n\n### Response:\n");
  // The prompt ends in a newline, so the answer is its own word without a leading space, and the tokens of
  // prompt + answer are the tokens of the whole text.
  const Tokenizer& tok = gpt2();
  std::vector<int> full = prompt_tokens_of(tok, with_input, PromptTemplate::alpaca);
  const std::vector<int> answer = answer_tokens_of(tok, with_input.output, PromptTemplate::alpaca);
  EXPECT_EQ(answer, tok.encode("negative"));
  full.insert(full.end(), answer.begin(), answer.end());
  EXPECT_EQ(full, tok.encode(prompt_of(with_input, PromptTemplate::alpaca) + with_input.output));
}

TEST(Instruct, TemplateNamesAndChoice) {
  for (PromptTemplate t : {PromptTemplate::fingpt, PromptTemplate::alpaca})
    EXPECT_EQ(parse_prompt_template(template_name(t)), t);
  EXPECT_FALSE(is_prompt_template("vicuna"));
  test::expect_input_error([] { parse_prompt_template("vicuna"); }, "'vicuna' is not fingpt or alpaca");
  EXPECT_EQ(choose_template("", ""), PromptTemplate::fingpt);
  EXPECT_EQ(choose_template("", "alpaca"), PromptTemplate::alpaca) << "the model file's";
  EXPECT_EQ(choose_template("fingpt", "alpaca"), PromptTemplate::fingpt) << "the option over the file";
}

}  // namespace
}  // namespace lrllm
