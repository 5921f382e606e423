// Hugging Face interoperability (docs/interop.md): export a moecpt checkpoint
// as a `transformers` model directory, import such a directory as a moecpt
// checkpoint (to continue pre-training someone else's model), and sparse
// upcycling (a dense FFN copied into every expert of a new MoE).
//
// Architectures (chosen by export_hf's arch = "auto"):
//   dense                                             → LlamaForCausalLM   ("llama")
//   MoE, no shared experts, every block MoE, k ≥ 2,
//     gates renormalised to sum 1                     → MixtralForCausalLM ("mixtral")
//   any other top-k-softmax MoE (shared experts,
//     k = 1 / un-normalised gates, moe_every > 1)     → Qwen2MoeForCausalLM ("qwen2_moe")
// Refused with one error naming the reason: LayerNorm, the aux-loss-free (bias)
// router, Sinkhorn with k = 1 (sigmoid gate). Every accepted export computes the
// same logits as moecpt in evaluation mode (tested against an independent
// Python reference, tests/hf_reference.py).
//
// This header is torch-free so the CLI files stay cheap to compile.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace moecpt::hf {

struct ExportOptions {
  std::string arch = "auto";   // auto | llama | mixtral | qwen2_moe
  std::string tokenizer;       // sentencepiece model to copy ("" = data.tokenizer of the checkpoint's
                               // config, skipped with a note when that file does not exist)
};

struct ExportReport {
  std::string arch;                 // llama | mixtral | qwen2_moe
  int64_t tensors = 0;              // tensors written to model.safetensors
  bool tokenizer_copied = false;
  std::vector<std::string> notes;   // mismatches worth telling the user (training-only behaviour, ...)
};

// Export `checkpoint_dir` (model.safetensors + config.toml) to `out_dir`:
// model.safetensors, config.json, generation_config.json, and when a tokenizer
// is available tokenizer.model + tokenizer_config.json + special_tokens_map.json.
// `out_dir` is written atomically (built in <out_dir>.tmp, then renamed).
ExportReport export_hf(const std::string& checkpoint_dir, const std::string& out_dir,
                       const ExportOptions& opts = {});

// The architecture export_hf would use for this checkpoint config (config.toml
// text), or throws moecpt::Error with the reason it cannot be exported.
std::string choose_arch(const std::string& config_toml_path, const std::string& requested = "auto");

struct ImportOptions {
  std::string base_config;               // TOML for the non-model sections (run, data, optim, ...); "" = defaults
  std::vector<std::string> overrides;    // "section.key=value", applied last (like `train --set`)
  // Sparse upcycling (dense source only): E > 0 turns every FFN into an MoE of
  // E copies of it. Router ~ N(0, router_init_std), seeded by `seed`.
  int64_t upcycle_experts = 0;
  int64_t top_k = 2;
  bool renormalize = true;               // gates sum to 1 → the upcycled model equals the dense one
  double router_init_std = 0.02;
  int64_t seed = 0;
};

struct ImportReport {
  std::string arch;            // model_type of the source
  std::string ffn;             // dense | moe (of the result)
  int64_t n_experts = 0, top_k = 0, n_shared_experts = 0;
  bool upcycled = false;
  bool tokenizer_copied = false;
  std::vector<std::string> notes;
};

// Import a Hugging Face directory (config.json + model.safetensors or a
// sharded model.safetensors.index.json) as a moecpt checkpoint directory
// (model.safetensors, config.toml, trainer.json; no optimizer state) that
// `train.init_from` accepts. Refuses what moecpt cannot represent exactly
// (grouped-query attention, RoPE scaling, biases, non-zero Qwen2-MoE shared
// gates, ...) with one error naming the field.
ImportReport import_hf(const std::string& hf_dir, const std::string& out_dir, const ImportOptions& opts = {});

}  // namespace moecpt::hf
