// FinGPT's evaluation protocol (docs/design.md, Evaluation protocol) after generation: mapping an answer to a
// label, and accuracy, macro F1 and weighted F1 over a task.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "lrllm/io/instruct.h"

namespace lrllm {

// A task's label set: the distinct outputs of its examples, sorted.
std::vector<std::string> label_set(const std::vector<Example>& examples);

// Throws InputError "PATH: example N has output "x", which is not one of the task's labels a/b/c" for the
// first example (numbered from 1) whose output is not in labels.
void check_labels(const std::vector<Example>& examples, const std::vector<std::string>& labels,
                  const std::string& path);

// The label an answer names. For the sentiment set {negative, neutral, positive} (in any order), FinGPT's
// rule: "positive" anywhere in the answer gives positive, else "negative" gives negative, else neutral — so
// "not positive" is positive, as FinGPT scores it. For any other set: the first label, in the given order,
// that occurs in the answer, else "" (a prediction that is always wrong). Matching ignores ASCII case; the
// label is returned as spelled in labels.
std::string label_of(const std::string& answer, const std::vector<std::string>& labels);

struct Scores {
  double accuracy, f1_macro, f1_weighted;
  std::size_t n;
};

// Scores predictions against gold labels, like scikit-learn's accuracy_score and f1_score(labels=labels,
// average="macro" / "weighted", zero_division=0): macro F1 is the plain mean of the per-label F1 over
// labels, weighted F1 their mean weighted by each label's gold count, and a label's F1 is 0 when its
// precision and recall are both 0. A prediction outside labels (such as "") is simply wrong. gold and
// predicted must be equally long and non-empty, and every gold label one of labels (std::invalid_argument).
Scores score(const std::vector<std::string>& gold, const std::vector<std::string>& predicted,
             const std::vector<std::string>& labels);

}  // namespace lrllm
