// Running a trained model for analysis: build it from a checkpoint directory
// and stream a validation shard through it in batches, in evaluation mode
// (plain top-k routing for Sinkhorn), never holding the whole corpus in memory.
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/pch.h"
#include "model/transformer.h"

namespace moecpt {
class Shard;
}

namespace moecpt::analysis {

// A model rebuilt from a checkpoint directory (model.safetensors + config.toml,
// src/train/checkpoint.h), in eval() mode on `device`.
struct LoadedModel {
  std::string dir;
  Config cfg;                        // the checkpoint's config.toml
  model::Transformer model{nullptr};
  torch::Device device{torch::kCPU};
  int64_t step = -1;                 // trainer.json "step" when present
  bool is_moe() const { return cfg.model.ffn == "moe"; }
};
// Errors name the directory and the missing/bad file.
LoadedModel load_model(const std::string& checkpoint_dir, const std::string& device = "cpu");

// Which held-out tokens to look at. `dataset` is a name (then the shard is
// <shard_dir>/<name>/val.bin, shard_dir defaulting to the checkpoint's
// data.shard_dir) or a path to a .bin shard.
struct DataOptions {
  std::string shard_dir;       // "" = the (first) checkpoint's data.shard_dir
  int64_t batch_size = 0;      // sequences per forward; 0 = the checkpoint's micro-batch (Sinkhorn's T)
  int64_t seq_len = 0;         // 0 = the checkpoint's model.seq_len
  int64_t max_tokens = 0;      // stop after this many input tokens per dataset (0 = the whole shard)
  std::string device = "cpu";  // cpu | cuda
};
struct ResolvedDataset {
  std::string name;  // "en", or the shard file's parent directory name
  std::string path;  // the val.bin shard
};
ResolvedDataset resolve_dataset(const std::string& dataset, const std::string& shard_dir);

// One batch of windows of the stream: tokens_BT1 int64 [B, seq+1] (inputs are
// columns [0, seq), targets [1, seq]). Windows are consecutive and do not
// overlap (stride seq+1, like the trainer's evaluation); the last batch may
// hold fewer rows; a tail shorter than one window is skipped.
using BatchFn = std::function<void(const torch::Tensor& tokens_BT1)>;
// Streams the shard; returns the number of input tokens looked at (B·seq summed).
int64_t for_each_batch(const Shard& shard, int64_t seq_len, int64_t batch_size, int64_t max_tokens,
                       const BatchFn& fn);

// What one forward of a batch yields.
struct BatchResult {
  double loss_sum = 0;    // Σ next-token cross-entropy over the B·seq targets (nats)
  int64_t tokens = 0;     // B·seq
  torch::Tensor input_ids_T;                  // int64 [B·seq] flattened inputs (for vocabulary stats)
  std::vector<model::RoutingInfo> routing;    // per MoE layer (eval-mode routing)
};
BatchResult forward_batch(LoadedModel& m, const torch::Tensor& tokens_BT1);

// Loss and perplexity of a model on one dataset (streamed).
struct LossResult {
  double loss = 0;  // mean nats/token
  double ppl = 0;   // exp(loss)
  int64_t tokens = 0;
};
LossResult evaluate_loss(LoadedModel& m, const std::string& shard_path, const DataOptions& opt);

// The effective batch size / sequence length for a model under `opt`.
int64_t effective_batch_size(const LoadedModel& m, const DataOptions& opt);
int64_t effective_seq_len(const LoadedModel& m, const DataOptions& opt);

}  // namespace moecpt::analysis
