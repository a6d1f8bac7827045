// FinGPT's answer-to-label mapping and the task metrics against hand-computed values.
#include <gtest/gtest.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "lrllm/core/common.h"
#include "lrllm/io/instruct.h"
#include "lrllm/modes/scoring.h"
#include "test_util.h"

namespace lrllm {
namespace {

using Labels = std::vector<std::string>;

TEST(Scoring, SentimentFollowsFinGptRule) {
  const Labels labels = {"negative", "neutral", "positive"};
  EXPECT_EQ(label_of("positive", labels), "positive");
  EXPECT_EQ(label_of("The sentiment is Positive.", labels), "positive");
  // FinGPT looks for the substring only, so a negated label still counts as that label.
  EXPECT_EQ(label_of("not positive", labels), "positive");
  EXPECT_EQ(label_of("NEGATIVE", labels), "negative");
  // "positive" is checked before "negative".
  EXPECT_EQ(label_of("negative, or maybe positive", labels), "positive");
  EXPECT_EQ(label_of("neutral", labels), "neutral");
  // Anything else falls back to neutral, as in FinGPT.
  EXPECT_EQ(label_of("I cannot tell", labels), "neutral");
  EXPECT_EQ(label_of("", labels), "neutral");
  // The rule applies to the set in any order and spelling, and answers with the given spelling.
  EXPECT_EQ(label_of("very positive", {"Positive", "Negative", "Neutral"}), "Positive");
  EXPECT_EQ(label_of("no idea", {"Positive", "Negative", "Neutral"}), "Neutral");
}

TEST(Scoring, OtherLabelSetsTakeFirstLabelFound) {
  EXPECT_EQ(label_of("spam", {"ham", "spam"}), "spam");
  EXPECT_EQ(label_of("It is HAM.", {"ham", "spam"}), "ham");
  EXPECT_EQ(label_of("spam or ham", {"ham", "spam"}), "ham");
  EXPECT_EQ(label_of("spam or ham", {"spam", "ham"}), "spam");
  EXPECT_EQ(label_of("Learned", {"government", "learned", "news"}), "learned");
  // No label in the answer: "", which is never a gold label.
  EXPECT_EQ(label_of("I am not sure", {"ham", "spam"}), "");
  EXPECT_EQ(label_of("", {"ham", "spam"}), "");
  // Two of the three sentiment labels are not the sentiment set: no neutral fallback.
  EXPECT_EQ(label_of("unclear", {"negative", "positive"}), "");
}

// Ten examples, labels in the order negative, neutral, positive; one answer named no label ("").
// Confusion matrix, rows gold, columns predicted:
//               neg  neu  pos  none | gold count
//     negative   2    0    1    0   |  3
//     neutral    1    3    0    0   |  4
//     positive   0    1    1    1   |  3
//     predicted  3    4    2    1
// accuracy = (2 + 3 + 1) / 10 = 0.6
// F1 = 2TP / (predicted + gold):
//     negative: P = 2/3, R = 2/3, F1 = 4/6 = 2/3
//     neutral:  P = 3/4, R = 3/4, F1 = 6/8 = 3/4
//     positive: P = 1/2, R = 1/3, F1 = 2/5
// macro F1    = (2/3 + 3/4 + 2/5) / 3 = (40 + 45 + 24) / 180 = 109/180
// weighted F1 = (3 * 2/3 + 4 * 3/4 + 3 * 2/5) / 10 = (2 + 3 + 1.2) / 10 = 0.62
TEST(Scoring, HandComputedConfusionMatrix) {
  const Labels gold = {"negative", "negative", "negative", "neutral",  "neutral",
                       "neutral",  "neutral",  "positive", "positive", "positive"};
  const Labels pred = {"negative", "negative", "positive", "neutral", "neutral",
                       "neutral",  "negative", "positive", "neutral", ""};
  const Scores s = score(gold, pred, {"negative", "neutral", "positive"});
  EXPECT_EQ(s.n, 10u);
  EXPECT_DOUBLE_EQ(s.accuracy, 0.6);
  EXPECT_DOUBLE_EQ(s.f1_macro, 109.0 / 180.0);
  EXPECT_DOUBLE_EQ(s.f1_weighted, 0.62);
}

// Gold a a b b, predicted a a a a; c is in the label set but never gold nor predicted, b never predicted.
//     a: TP 2, predicted 4, gold 2: F1 = 4/6 = 2/3
//     b: TP 0 (precision 0/0, recall 0): F1 = 0;  c: no TP, no predictions, no support: F1 = 0
// accuracy 2/4; macro F1 = (2/3 + 0 + 0) / 3 = 2/9; weighted F1 = (2 * 2/3 + 2 * 0 + 0 * 0) / 4 = 1/3
TEST(Scoring, LabelsNeverPredictedScoreZero) {
  const Scores s = score({"a", "a", "b", "b"}, {"a", "a", "a", "a"}, {"a", "b", "c"});
  EXPECT_DOUBLE_EQ(s.accuracy, 0.5);
  EXPECT_DOUBLE_EQ(s.f1_macro, 2.0 / 9.0);
  EXPECT_DOUBLE_EQ(s.f1_weighted, 1.0 / 3.0);
}

TEST(Scoring, PerfectAndAllWrong) {
  const Labels labels = {"ham", "spam"};
  const Labels gold = {"ham", "spam", "spam", "ham", "ham"};
  const Scores perfect = score(gold, gold, labels);
  EXPECT_DOUBLE_EQ(perfect.accuracy, 1.0);
  EXPECT_DOUBLE_EQ(perfect.f1_macro, 1.0);
  EXPECT_DOUBLE_EQ(perfect.f1_weighted, 1.0);

  const Scores wrong = score(gold, {"spam", "ham", "", "spam", ""}, labels);
  EXPECT_EQ(wrong.n, 5u);
  EXPECT_DOUBLE_EQ(wrong.accuracy, 0.0);
  EXPECT_DOUBLE_EQ(wrong.f1_macro, 0.0);
  EXPECT_DOUBLE_EQ(wrong.f1_weighted, 0.0);

  EXPECT_THROW(score(gold, {"ham"}, labels), std::invalid_argument);
  EXPECT_THROW(score({}, {}, labels), std::invalid_argument);
  EXPECT_THROW(score({"eggs"}, {"ham"}, labels), std::invalid_argument);
}

TEST(Scoring, LabelSetAndCheck) {
  const std::vector<Example> train = {{"i", "", "spam"}, {"i", "", "ham"}, {"i", "x", "spam"}};
  const Labels labels = label_set(train);
  EXPECT_EQ(labels, (Labels{"ham", "spam"}));
  EXPECT_NO_THROW(check_labels(train, labels, "train.jsonl"));
  const std::vector<Example> test = {{"i", "", "ham"}, {"i", "", "eggs"}};
  test::expect_input_error([&] { check_labels(test, labels, "test.jsonl"); },
                           "test.jsonl: example 2 has output \"eggs\", which is not one of the task's labels "
                           "ham/spam");
}

}  // namespace
}  // namespace lrllm
