// lrllm's side of tests/tokenizer/compare.sh: prints the token ids of each string in FILE (one JSON string
// a line) as a JSON array a line, the format of reference.js, and fails on a string that does not decode
// back to itself. With a tokenizer that has a sequence start (Llama's <s>) each non-empty string's ids
// begin with it, as the reference's encode(text) gives them.
//
// usage: tokenizer_dump TOKENIZER_DIR strings FILE
#include <cstdio>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>

#include "lrllm/core/common.h"
#include "lrllm/io/tokenizer.h"

int main(int argc, char** argv) {
  if (argc != 4 || std::string(argv[2]) != "strings") {
    std::fprintf(stderr, "usage: tokenizer_dump TOKENIZER_DIR strings FILE\n");
    return 2;
  }
  try {
    const std::string dir = argv[1], file = argv[3];
    const auto tok = lrllm::Tokenizer::load_dir(dir);
    std::ifstream in(file, std::ios::binary);
    if (!in) throw lrllm::InputError("cannot open '" + file + "'");
    std::string line;
    for (int line_no = 1; std::getline(in, line); ++line_no) {
      std::string text;
      try {
        text = nlohmann::json::parse(line).get<std::string>();
      } catch (const nlohmann::json::exception& e) {
        throw lrllm::InputError(file + ":" + std::to_string(line_no) + ": not a JSON string: " + e.what());
      }
      std::vector<int> ids = tok.encode(text);
      if (tok.bos() >= 0 && !text.empty()) ids.insert(ids.begin(), tok.bos());
      // Llama's encode maps U+2581 "▁" like a space, so such a string decodes with spaces there.
      if (tok.decode(ids) != text && !(tok.bos() >= 0 && text.find("\u2581") != std::string::npos))
        throw lrllm::RuntimeError(file + ":" + std::to_string(line_no) + ": decode(encode(s)) != s");
      std::cout << nlohmann::json(ids).dump() << '\n';
    }
    std::cout.flush();
    return std::cout ? 0 : 1;
  } catch (const lrllm::InputError& e) {
    std::fprintf(stderr, "tokenizer_dump: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tokenizer_dump: %s\n", e.what());
    return 1;
  }
}
