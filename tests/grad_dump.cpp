// Test tool for the PyTorch reference check: loss and every gradient of one batch, written to HDF5.
// Usage: grad_dump --init CKPT.h5 --data TOKENS.bin --batch B --out OUT.h5 [--segments L1,L2,...]
// The batch is the first B sequences of the token file (sequence i starts at token i * seq_len). With
// --segments each row packs examples of those lengths, then one of the rest of the row: positions restart
// at each, and attention stays inside it.
#include <cstdio>
#include <cstdlib>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "lrllm/backend/backend.h"
#include "lrllm/core/common.h"
#include "lrllm/io/checkpoint.h"
#include "lrllm/io/data.h"
#include "lrllm/io/hdf5.h"
#include "lrllm/model/model.h"

int main(int argc, char** argv) {
  std::map<std::string, std::string> args;
  for (int i = 1; i + 1 < argc; i += 2) args[argv[i]] = argv[i + 1];
  for (const char* key : {"--init", "--data", "--batch", "--out"}) {
    if (!args.count(key)) {
      std::fprintf(stderr, "usage: grad_dump --init CKPT.h5 --data TOKENS.bin --batch B --out OUT.h5\n");
      return 2;
    }
  }
  try {
    const int B = std::stoi(args["--batch"]);
    const lrllm::ModelConfig mc = lrllm::read_model_config(args["--init"]);
    auto backend = lrllm::make_cpu_backend();
    lrllm::Model model(mc, *backend, false);
    lrllm::load_weights(args["--init"], model);
    const lrllm::TokenStream file(args["--data"]);
    lrllm::Batcher batcher(file, mc.seq_len, false, 0);
    lrllm::Batch batch;
    batcher.fill(0, B, batch);
    if (args.count("--segments")) {
      std::vector<int32_t> row;
      std::stringstream list(args["--segments"]);
      for (std::string len; std::getline(list, len, ',');)
        for (int p = 0; p < std::stoi(len); ++p) row.push_back(p);
      for (int p = 0; row.size() < static_cast<std::size_t>(mc.seq_len); ++p) row.push_back(p);
      if (row.size() != static_cast<std::size_t>(mc.seq_len))
        throw std::runtime_error("segments exceed seq_len");
      for (int b = 0; b < B; ++b) batch.positions.insert(batch.positions.end(), row.begin(), row.end());
    }
    model.zero_grads();
    const double loss = model.forward_backward(batch, 1.0f);
    lrllm::H5File out = lrllm::H5File::create(args["--out"]);
    out.set_attr("/", "loss", loss);
    for (const lrllm::TensorInfo& t : model.table().tensors())
      out.write("/grads/" + t.name, model.grads() + t.offset, t.shape);
    out.close();
    std::printf("loss %.9f\n", loss);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "grad_dump: %s\n", e.what());
    return 1;
  }
  return 0;
}
