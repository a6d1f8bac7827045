// GPT-2 (pre-LayerNorm, learned positions, tanh-GELU, causal attention, lm_head tied to wte) whose four
// linear layers per block are each dense or low-rank, optionally with LoRA adapters over a frozen (and
// possibly quantized) base. Forward and backward are explicit.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "lrllm/backend/backend.h"
#include "lrllm/core/config.h"
#include "lrllm/model/architecture.h"
#include "lrllm/model/batch.h"
#include "lrllm/model/linear.h"
#include "lrllm/model/params.h"
#include "lrllm/model/quant.h"

namespace lrllm {

// A frozen tensor held in quantized storage: a linear layer's W, A or B, or the tied wte.
struct QuantizedEntry {
  std::string name;            // its float tensor's path under /model, e.g. "h.0/attn/qkv/W" or "wte"
  std::vector<int64_t> shape;  // the shape the model expects
  QuantizedTensor tensor;
};

struct MemoryBytes {
  std::size_t params = 0;            // all parameter storage: the three below
  std::size_t params_trainable = 0;  // float32, with gradients
  std::size_t params_frozen = 0;     // float32, frozen
  std::size_t params_quantized = 0;  // int8/NF4 codes and scales of frozen weights
  std::size_t grads = 0, optimizer = 0, activations = 0;
};

// The part of the model one rank holds (docs/design.md, Parallel layouts): the blocks [first_layer,
// end_layer) of its pipeline stage and, under tensor parallelism, its slice of each of them (qkv and fc
// column-parallel, attn proj and mlp proj row-parallel, heads split). The first stage embeds; the last holds
// ln_f and its own copy of the tied wte for the lm_head. The default is the whole model.
struct ModelShard {
  int first_layer = 0;
  int end_layer = -1;  // -1: n_layer
  int tp_part = 0, tp = 1;
  const TensorReducer* tp_group = nullptr;
};

class Model {
 public:
  Model(const ModelConfig& cfg, Backend& backend, bool recompute, const ModelShard& shard = {});
  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const ModelConfig& config() const { return cfg_; }
  // The trainable tensors (every tensor when pretraining; the adapters when finetuning): params(), grads()
  // and the optimizer's moments share this layout.
  const ParamTable& table() const { return table_; }
  // The frozen float tensors, in frozen().
  const ParamTable& frozen_table() const { return frozen_table_; }
  Backend& backend() { return be_; }
  float* params() { return params_; }
  // Allocated (zeroed) on first use: evaluation, generation and export never need gradients.
  float* grads();
  const float* params() const { return params_; }
  float* frozen() { return frozen_; }
  Linear& layer(int block, LinearSite site);
  // The frozen tensors held quantized (filled before use, e.g. by load_weights), and one by name (nullptr
  // when that tensor is not quantized).
  std::deque<QuantizedEntry>& quantized_tensors() { return quantized_; }
  QuantizedTensor* find_quantized(const std::string& name);

  // GPT-2 initialisation (normal 0.02, residual projections scaled by 1/sqrt(2 n_layer)) of every float
  // tensor, LoRA's lora_A uniform in +-1/sqrt(in) and lora_B zero; deterministic in the seed and
  // independent of the order tensors are registered in.
  void init_random(uint64_t seed);
  // The same for the trainable table only: the adapters of a model whose frozen base is loaded from a file.
  void init_adapters(uint64_t seed);
  void zero_grads();

  // One micro-batch through the whole model: its rows of T <= seq_len tokens (targets < 0 are ignored).
  // Returns the mean loss over valid targets. With grad_scale != 0 also runs backward and accumulates
  // grad_scale * d(mean loss)/d(param) into grads().
  double forward_backward(const Batch& batch, float grad_scale);
  // The same for B full rows: tokens and targets [B, seq_len] on the host.
  double forward_backward(const int32_t* tokens, const int32_t* targets, int B, float grad_scale);

  // The pieces of forward_backward() for a pipeline stage, on activation slot `slot` (a micro-batch in
  // flight; reserve first): B rows of T <= seq_len tokens, host tokens, targets and positions (Batch's
  // layout; positions may be null). forward: the first stage embeds tokens, later ones read
  // stage_input(slot); the last stage returns the loss summed over valid targets / normalizer and, with
  // grad_scale != 0, leaves grad_scale times its gradient in stage_grad(slot) (other stages return 0).
  // backward: from stage_grad(slot), which it turns into the gradient of the stage's input; the first stage
  // finishes with the embeddings' gradients.
  double forward(int slot, const int32_t* tokens, const int32_t* targets, const int32_t* positions, int B,
                 int T, float grad_scale, int normalizer);
  void backward(int slot);
  float* stage_input(int slot);
  const float* stage_output(int slot);
  float* stage_grad(int slot);
  // Activations for `slots` micro-batches of B sequences in flight, of at most row_len() tokens each.
  void reserve(int B, int slots = 1);
  // Rows of at most T <= seq_len tokens from now on, before anything is reserved: finetuning's shorter
  // --model.seq_len, so that activations are sized by the rows that run (Llama-2 7B's seq_len 4096 would
  // reserve 8x a 512-token row's). seq_len otherwise.
  void limit_rows(int T);
  int row_len() const { return row_len_; }
  bool first_stage() const { return first_layer_ == 0; }
  bool last_stage() const { return end_layer_ == cfg_.n_layer; }
  int first_layer() const { return first_layer_; }
  int end_layer() const { return end_layer_; }
  // Called with each block's index as soon as its gradients are final in backward (set for the step's last
  // micro-batch: data parallelism starts averaging them while backward goes on); empty: none.
  void set_block_grads_hook(std::function<void(int)> hook) { block_grads_hook_ = std::move(hook); }
  // Offsets [begin, end) of block l's tensors in the trainable table.
  std::pair<std::size_t, std::size_t> block_range(int l) const;
  TensorRef wte() const { return wte_; }

  // Valid targets (>= 0) among N, checking every id against the vocabulary. Throws InputError.
  int count_valid(const int32_t* tokens, const int32_t* targets, int N) const;

  // The next-token logits [vocab] at `position` of one sequence of seq_len tokens (host memory; positions
  // after `position` do not matter: attention is causal). For generation.
  void logits_at(const int32_t* tokens, int position, float* out);
  // Incremental decoding of one sequence with a key/value cache (generation): decode runs n new tokens (host
  // memory) at positions cached() .. cached() + n - 1, attending over the cached ones, keeps their keys and
  // values, and writes the next-token logits [vocab] after the last of them. The block math is the full
  // forward's, so the logits are logits_at's to rounding. cached() + n must not pass seq_len; reset_cache
  // starts a new sequence.
  void decode(const int32_t* tokens, int n, float* out);
  int cached() const { return cached_; }
  void reset_cache() { cached_ = 0; }

  // Training mode turns LoRA dropout on (evaluation and generation run without it). Each micro-batch's masks
  // come from a seed the training loop sets, so a resumed or recomputed pass draws the same ones.
  void set_training(bool training) { training_ = training; }
  void set_dropout_seed(uint64_t seed) { dropout_seed_ = seed; }

  // The full model's parameters (whatever this rank holds).
  ParamCounts param_counts() const;
  // This rank's bytes of parameters and gradients, and of the activations reserved (see reserve).
  MemoryBytes memory() const;

 private:
  struct Norm {
    TensorRef w, b;
  };
  // One block's tensors, as its architecture lists them (architecture.h).
  struct Block {
    std::vector<Norm> norms;    // in the order the block applies them
    std::vector<Linear> sites;  // indexed by LinearSite
    const Linear& site(LinearSite s) const { return sites[static_cast<int>(s)]; }
  };

  struct Acts;
  // What one micro-batch in flight keeps.
  struct Slot {
    std::vector<float*> resid;  // x entering each local block; the last: the stage's output
    std::vector<Acts*> acts;    // per local block (one shared set under recomputation, in slot 0)
    float* dresid = nullptr;    // the gradient flowing back through the stage
    int32_t* tokens = nullptr;
    std::vector<int32_t> host_tokens;  // with trainable tokens: their rows' gradients are gathered by token
    int B = 0, T = 0;                  // the micro-batch in this slot: B rows of T tokens
    int32_t* positions_buffer = nullptr;
    const int32_t* positions = nullptr;  // positions_buffer when the rows are packed, else null
    int past = -1;                       // decoding (one row): the cached positions before its tokens
  };
  void init_tables(uint64_t seed, bool frozen_too);
  // out[B, T, C] = wte[tokens] + wpe: tokens on the device, and on the host for a quantized wte, whose rows
  // are dequantized as the tokens pick them.
  // With trainable tokens, their deltas are added to their rows.
  void embed(float* out, const Slot& s, const int32_t* host_tokens);
  void embed_base(float* out, const Slot& s, const int32_t* host_tokens);
  // The tied lm_head: logits[N, V] = x[N, C] wte^T, and dx[N, C] = dlogits[N, V] wte.
  void lm_head(float* logits, const float* x, int N);
  void lm_head_input_grad(float* dx, const float* dlogits, int N);
  // Accumulates the trainable weights' gradients from dlogits[N, V] and x[N, C]: wte's when it trains in
  // full, the trainable tokens' deltas.
  void lm_head_weight_grad(const float* dlogits, const float* x, int N);
  void block_forward(int l, Acts& a, const float* x, float* x_out, const Slot& s);
  void block_backward(int l, Acts& a, const float* x, float* dresid, const Slot& s);
  // targets [N] on the host.
  double classifier(const float* x, const int32_t* host_targets, float* dx, int N, float grad_scale,
                    int normalizer);
  Acts& acts_for(int slot, int l);
  // The LoRA dropout mask of block l's site for this micro-batch (written into the block's activations), or
  // nullptr when dropout is off.
  const float* lora_mask(int l, int site, Acts& a, int in, int N);
  WeightBuffers buffers() const { return {params_, grads_, frozen_}; }
  LinearScratch linear_scratch() const {
    return {scratch_rank_, tile_, tile_floats_, scratch_lora_x_, scratch_act_};
  }
  const float* at(TensorRef r) const { return (r.frozen ? frozen_ : params_) + r.offset; }
  // The gradient of a LayerNorm tensor r, or when r is frozen one of two discarded [d_model] sinks (the
  // primitive always produces both gradients).
  float* grad_or_sink(TensorRef r, int slot) const {
    return r.frozen ? sink_ + static_cast<std::size_t>(slot) * cfg_.d_model : grads_ + r.offset;
  }

  // The residual stream's norm (LayerNorm or RMSNorm, as the architecture has) of N rows: out, and mean
  // (unused by RMSNorm) and rstd for backward; backward accumulates into dx and the norm's gradients.
  void norm_forward(float* out, float* mean, float* rstd, const float* x, const Norm& n, int N);
  void norm_backward(float* dx, const Norm& n, const float* dout, const float* x, const float* mean,
                     const float* rstd, int N);
  void gpt2_block_forward(int l, Acts& a, const float* x, float* x_out, const Slot& s);
  void gpt2_block_backward(int l, Acts& a, const float* x, float* dresid, const Slot& s);
  void llama_block_forward(int l, Acts& a, const float* x, float* x_out, const Slot& s);
  void llama_block_backward(int l, Acts& a, const float* x, float* dresid, const Slot& s);
  // Block l's causal attention over a.qkv into a.attn: over the slot's rows, or when decoding over the
  // key/value cache, which it extends.
  void attend(int l, Acts& a, const Slot& s);
  // The next-token logits [vocab] on the host from the final residual row x of the last stage.
  void head_logits(const float* x, float* out);
  // Rotary embeddings of the q and k heads in a [N, qkv width] buffer, or (backward) their transpose.
  void rotate_qk(float* qkv, const Slot& s, bool backward);
  // The position table, or null where the architecture has none.
  const float* position_table() const { return arch_.position_embedding.empty() ? nullptr : at(wpe_); }

  ModelConfig cfg_;
  Backend& be_;
  bool recompute_;
  int row_len_;  // the longest row a micro-batch may have (limit_rows)
  int first_layer_ = 0, end_layer_ = 0;
  int tp_ = 1;  // attention heads and the MLP's width are split tp ways
  Architecture arch_;
  ParamTable table_;
  ParamTable frozen_table_;
  TensorRef wte_, wpe_;
  TensorRef head_;  // the lm_head's weight on the last stage: the tied wte, or an untied lm_head
  Norm lnf_;
  TensorRef wte_delta_;             // [k, C]: the trainable tokens' deltas, in the trainable table
  std::vector<int32_t> delta_row_;  // [vocab]: a token's row in wte_delta_, or -1
  std::vector<Block> blocks_;
  float* params_ = nullptr;
  float* grads_ = nullptr;
  float* frozen_ = nullptr;
  float* sink_ = nullptr;                 // [d_model] x 2: LayerNorm gradients of a frozen model, discarded
  std::deque<QuantizedEntry> quantized_;  // a deque: layers keep pointers to its elements
  QuantizedTensor* wte_q_ = nullptr;
  QuantizedTensor* head_q_ = nullptr;  // the lm_head's weight when quantized: wte_q_ when tied
  float* tile_ = nullptr;
  int32_t* tile_ids_ = nullptr;  // 0, 1, 2, ...: token ids of the embedding rows dequantized into the tile
  std::size_t tile_floats_ = 0;
  // decode's cache, allocated on first use: per local block [seq_len, 2 * kv width], each row its position's
  // k (after the rotary embedding) then v, this rank's kv heads only.
  std::vector<float*> kv_cache_;
  int cached_ = 0;

  // Activation storage for the current micro-batch size and slots.
  int acts_batch_ = 0;
  std::vector<Slot> slots_;
  std::vector<Acts*> all_acts_;
  std::function<void(int)> block_grads_hook_;
  float* lnf_out_ = nullptr;
  float* lnf_mean_ = nullptr;
  float* lnf_rstd_ = nullptr;
  float* logits_ = nullptr;  // one chunk of rows
  float* losses_ = nullptr;
  float* head_rows_ = nullptr;       // [N, C]: the final LayerNorm's rows that have a target, gathered
  int32_t* head_targets_ = nullptr;  // [N]: their targets
  // Block scratch, [N, width] (widths of this rank's tensor-parallel slice):
  float* residual_branch_ = nullptr;  // [N, C]: a residual branch's output before it is added (forward); the
                                      // gradient at a LayerNorm's output or at attention's output (backward);
                                      // the classifier's input gradient before ln_f
  float* ln1_out_grad_ = nullptr;     // [N, C]: the gradient at ln_1's output; the block output that
                                      // recomputation rebuilds and discards
  float* qkv_grad_ = nullptr;         // [N, 3C]: the gradient at qkv's output
  float* mlp_hidden_grad_ = nullptr;  // [N, F]: the gradient at GELU's output
  float* fc_out_grad_ = nullptr;      // [N, F]: the gradient at fc's output
  float* scratch_rank_ = nullptr;
  float* scratch_lora_x_ = nullptr;  // [N, max(C, F)], with LoRA dropout
  float* scratch_act_ = nullptr;     // [N, max rank], with lowrank.activation silu
  bool training_ = false;
  uint64_t dropout_seed_ = 0;
  std::vector<void*> act_allocs_;
  std::size_t act_bytes_ = 0;
  int max_rank_ = 0;  // the widest low-rank or LoRA intermediate
};

// The values Model::init_random gives the full tensor `name` of a model of n_layer blocks, by its role:
// GPT-2's normal 0.02 (residual projections 0.02 / sqrt(2 n_layer), low-rank factors scaled so that their
// product has that std), norm gains 1, shifts and biases 0, lora_A uniform in +-1/sqrt(in), lora_B and deltas
// 0. Drawn from a seed derived from the seed and the name, so a tensor's values depend on nothing else: a
// model file written a tensor at a time (--mode export of random weights) holds what a built model would.
// product_std_fan > 0 (lowrank.init product_std): a factor's site's in + out, for CoLA's per-factor std.
std::vector<float> init_values(uint64_t seed, const std::string& name, TensorRole role,
                               const std::vector<int64_t>& full_shape, int n_layer,
                               int64_t product_std_fan = 0);

// lora.modules_to_save: comma-separated patterns over the base's LayerNorms, biases and embeddings ("ln_f",
// "h.*/ln_1", "h.0/mlp/fc/b", "wte"), '*' matching within one path component; a pattern names a tensor or a
// module above it. Those tensors of a frozen base train in full beside the adapters (PEFT's modules_to_save).
bool trains_beside_adapters(const ModelConfig& cfg, const std::string& tensor_name);
// A pattern that names none of them, or names a quantized wte, is an InputError.
void validate_saved_modules(const ModelConfig& cfg);

// The rows with a target (>= 0) among N, as runs [begin, end) of consecutive rows.
std::vector<std::pair<int, int>> target_runs(const int32_t* targets, int N);

// The trainable tokens' delta tensor: trained, checkpointed and resumed like the adapters.
inline constexpr const char* kTokenDeltaName = "trainable_tokens/delta";

// The classifier runs on chunks of rows so that only one [rows, vocab] logits buffer exists: at most
// kClassifierMaxRows rows and kClassifierBudgetBytes of logits, N split into equal chunks. Larger chunks run
// the lm_head GEMMs faster and update the wte gradient fewer times; 256 rows run within a few percent of 512
// at half the buffer (51 MB for GPT-2's vocabulary). The chunk depends only on N and the vocabulary, never on
// recomputation: OpenBLAS's result for a row depends on the GEMM's row count on some CPUs (AMD's AVX2
// kernels), so paths that must give identical bits must issue identical GEMMs (docs/design.md, Determinism).
inline constexpr int kClassifierMaxRows = 256;
inline constexpr std::size_t kClassifierBudgetBytes = std::size_t{128} << 20;
// The most rows one chunk may have, and the rows per chunk for N rows (never more than the limit or N).
int classifier_row_limit(int vocab_size);
int classifier_chunk_rows(int N, int vocab_size);

}  // namespace lrllm
