// Model shapes shared by the model-level tests.
#pragma once
#include <string>

#include "core/config.h"

namespace moecpt::testing {

// A model small enough for double-precision gradient checks: V 64, d 16,
// 2 layers of 2 heads, dense h 24; ffn = "moe": E 4, k 2, 1 shared expert of width 8.
inline ModelConfig tiny_model_config(const std::string& ffn) {
  ModelConfig mc;
  mc.vocab_size = 64;
  mc.d_model = 16;
  mc.n_layers = 2;
  mc.n_heads = 2;
  mc.seq_len = 12;
  mc.ffn_hidden = 24;
  mc.ffn = ffn;
  if (ffn == "moe") {
    mc.n_experts = 4;
    mc.n_shared_experts = 1;
    mc.top_k = 2;
    mc.expert_hidden = 8;
  }
  return mc;
}

}  // namespace moecpt::testing
