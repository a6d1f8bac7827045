// PEFT LoRA adapter folders (docs/design.md, PEFT adapters): adapter_config.json and
// adapter_model.safetensors as PEFT's save_pretrained writes them, in and out of lrllm's adapters on its
// fused sites. The modules and their rows come from the architecture's mapping (io/hf_model.h).
#pragma once

#include <functional>
#include <map>
#include <string>
#include <vector>

#include "lrllm/core/config.h"
#include "lrllm/io/safetensors.h"

namespace lrllm {

// A --lora.init that names a folder: a PEFT adapter folder, where a file is lrllm's adapter file.
bool is_peft_folder(const std::string& path);

// The model of a PEFT folder's adapters over base (a model file without adapters): base's shape, each site's
// LoRA rank and lora_alpha. InputError (one line naming the file) for anything lrllm cannot represent
// exactly: DoRA, rsLoRA, modules_to_save, alpha_pattern, a target module lrllm has no site for, a
// fan_in_fan_out other than the architecture's, a tensor of the wrong shape, a missing or extra tensor, or a
// recorded lrllm base checksum that is not base's.
ModelConfig peft_adapters_over(const std::string& dir, const ModelConfig& base);

// lrllm's adapter tensors (h.N/SITE/lora_A [R, in], lora_B [out, R]) of the folder, for the model
// peft_adapters_over described.
std::map<std::string, std::vector<float>> read_peft_adapters(const std::string& dir, const ModelConfig& m);

// Writes adapter_config.json and adapter_model.safetensors into dir (which exists) from the adapters of a
// model m; tensor(name) gives an lrllm tensor by its name under /model. base is written as
// base_model_name_or_path and, with base_checksum, into the safetensors metadata.
void write_peft_adapters(const std::string& dir, const ModelConfig& m,
                         const std::function<std::vector<float>(const std::string&)>& tensor,
                         SafetensorsDtype dtype, const std::string& base, const std::string& base_checksum,
                         double dropout);

}  // namespace lrllm
