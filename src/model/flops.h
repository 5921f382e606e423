// Model arithmetic from the config alone (SPEC §2): which blocks are MoE,
// parameter counts, training FLOPs per token, FLOP-matched dense configs.
// Pure functions; the counts equal the numel of the built Transformer (tested).
#pragma once
#include <cstdint>
#include <vector>

#include "core/config.h"

namespace moecpt::model {

// Blocks with an MoE FFN: none for ffn = "dense"; otherwise every moe_every-th
// block, counting from the last of each group (moe_every = 2 → 1, 3, 5, ...,
// the Switch/GShard layout; moe_every = 1 → all).
std::vector<int64_t> moe_layer_indices(const ModelConfig& mc);

struct ParamCounts {
  int64_t total = 0;      // every parameter of the module (head included if untied)
  int64_t active = 0;     // used per token: routed experts counted k of E (router counted)
  int64_t embedding = 0;  // input token embedding V·d (shared with the head when tied)
};
ParamCounts count_params(const ModelConfig& mc);

// Training FLOPs per token (forward + backward = 3 × forward, 2 FLOPs per MAC):
//   6 · (N_active − V·d + V·d)  +  6 · L · seq_len · d
//   └ matmul weights used per token: active non-embedding parameters (norm
//     weights included, negligible) plus the output head V·d, which is a matmul
//     whether or not it is tied to the embedding (the embedding lookup is free);
//   └ attention scores and weighted sum, Kaplan et al. 2020's 2·L·seq·d forward
//     term (QKᵀ and AV over the context, not halved for causality).
int64_t train_flops_per_token(const ModelConfig& mc);

// Dense config with the same FFN FLOPs per token as `moe`: every block gets a
// gated MLP of hidden (S + k)·expert_hidden. With moe_every > 1 the width is the
// average over blocks ((n_moe·(S+k)·h_e + n_dense·ffn_hidden) / L, rounded).
// The router's d·E MACs are not matched (<0.1 % at paper scale).
ModelConfig flop_matched_dense(const ModelConfig& moe);

}  // namespace moecpt::model
