#include "lrllm/modes/scoring.h"

#include <algorithm>
#include <cctype>
#include <set>
#include <stdexcept>

#include "lrllm/core/common.h"

namespace lrllm {
namespace {

std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

bool contains(const std::string& haystack_lower, const std::string& needle) {
  return haystack_lower.find(lower(needle)) != std::string::npos;
}

std::string join(const std::vector<std::string>& items, const char* sep) {
  std::string out;
  for (std::size_t i = 0; i < items.size(); ++i) out += (i ? sep : "") + items[i];
  return out;
}

}  // namespace

std::vector<std::string> label_set(const std::vector<Example>& examples) {
  std::set<std::string> labels;
  for (const Example& e : examples) labels.insert(e.output);
  return {labels.begin(), labels.end()};
}

void check_labels(const std::vector<Example>& examples, const std::vector<std::string>& labels,
                  const std::string& path) {
  for (std::size_t i = 0; i < examples.size(); ++i) {
    if (std::find(labels.begin(), labels.end(), examples[i].output) == labels.end()) {
      throw InputError(path + ": example " + std::to_string(i + 1) + " has output \"" + examples[i].output +
                       "\", which is not one of the task's labels " + join(labels, "/"));
    }
  }
}

std::string label_of(const std::string& answer, const std::vector<std::string>& labels) {
  const std::string text = lower(answer);
  std::vector<std::string> sorted_lower;
  for (const std::string& l : labels) sorted_lower.push_back(lower(l));
  std::sort(sorted_lower.begin(), sorted_lower.end());
  if (sorted_lower == std::vector<std::string>{"negative", "neutral", "positive"}) {
    // FinGPT's order of checks, and its fallback: an answer naming neither polarity counts as neutral.
    const char* picked = contains(text, "positive")   ? "positive"
                         : contains(text, "negative") ? "negative"
                                                      : "neutral";
    for (const std::string& l : labels) {
      if (lower(l) == picked) return l;
    }
  }
  for (const std::string& l : labels) {
    if (contains(text, l)) return l;
  }
  return "";
}

Scores score(const std::vector<std::string>& gold, const std::vector<std::string>& predicted,
             const std::vector<std::string>& labels) {
  if (gold.size() != predicted.size() || gold.empty()) {
    throw std::invalid_argument("score: gold and predicted must be equally long and non-empty");
  }
  const std::size_t k = labels.size();
  std::vector<double> true_pos(k, 0), gold_count(k, 0), pred_count(k, 0);
  const auto index = [&](const std::string& label) {
    return static_cast<std::size_t>(std::find(labels.begin(), labels.end(), label) - labels.begin());
  };
  std::size_t correct = 0;
  for (std::size_t i = 0; i < gold.size(); ++i) {
    const std::size_t g = index(gold[i]), p = index(predicted[i]);
    if (g == k) throw std::invalid_argument("score: gold label \"" + gold[i] + "\" is not in the label set");
    gold_count[g] += 1;
    if (p < k) pred_count[p] += 1;
    if (g == p) {
      true_pos[g] += 1;
      ++correct;
    }
  }
  Scores s{};
  s.n = gold.size();
  s.accuracy = static_cast<double>(correct) / static_cast<double>(s.n);
  for (std::size_t l = 0; l < k; ++l) {
    // F1 = 2TP / (2TP + FP + FN) = 2TP / (predicted + gold), which is 0 exactly when precision and recall
    // are both 0 (TP = 0), scikit-learn's zero_division=0.
    const double denom = pred_count[l] + gold_count[l];
    const double f1 = true_pos[l] > 0 ? 2 * true_pos[l] / denom : 0.0;
    s.f1_macro += f1 / static_cast<double>(k);
    s.f1_weighted += f1 * gold_count[l] / static_cast<double>(s.n);
  }
  return s;
}

}  // namespace lrllm
