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
  std::vector<std::vector<double>> loads;  // per MoE layer: share of routed slots per expert
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
  bool resume = false;  // continue from the newest <out_dir>/checkpoints/step-N
  int64_t stop_after = 0;  // > 0: behave as if interrupted once this step is done (time-sliced jobs, tests)
};

// Runs the phase described by `cfg`; writes <out_dir>/{config.toml,
// metrics.jsonl, summary.json, checkpoints/{step-N (last keep_last), pre_anneal,
// final}}. Returns the summary.
PhaseSummary train(const Config& cfg, const TrainOptions& opts = {});

// Newest step checkpoint (checkpoints/step-NNNNNNNN) of a run, or "" if none.
std::string latest_checkpoint(const std::string& out_dir);

// Ask a running train() to stop after the current step (SIGINT/SIGTERM).
void request_stop();

}  // namespace moecpt
