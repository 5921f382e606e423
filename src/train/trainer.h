// One training phase: pre-training from scratch, or continual pre-training
// from a checkpoint (train.init_from). The loop, top to bottom:
//   batch → forward → LM loss + aux + z → backward → clip → set lr → AdamW step
//   → router bias update → metrics line → (eval) → (checkpoint)
#pragma once
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/config.h"

namespace moecpt {

struct EvalResult {
  double loss = 0;        // mean next-token cross-entropy (nats/token)
  int64_t tokens = 0;     // tokens scored
  std::vector<double> mri;  // per MoE layer, inference-mode routing
};

struct PhaseSummary {
  int64_t steps = 0;
  int64_t tokens = 0;
  double seconds = 0;
  double final_train_loss = 0;
  std::map<std::string, EvalResult> initial_eval;  // before the first step
  std::map<std::string, EvalResult> final_eval;
};

struct TrainOptions {
  bool resume = false;  // continue from <out_dir>/checkpoints/last if present
  bool quiet = false;
};

// Runs the phase described by `cfg`; writes <out_dir>/{config.toml,
// metrics.jsonl, summary.json, checkpoints/{last,final}}. Returns the summary.
PhaseSummary train(const Config& cfg, const TrainOptions& opts = {});

// Ask a running train() to stop after the current step (SIGINT/SIGTERM).
void request_stop();

}  // namespace moecpt
