#include "model/flops.h"

#include <cmath>

namespace moecpt::model {

std::vector<int64_t> moe_layer_indices(const ModelConfig& mc) {
  std::vector<int64_t> layers;
  if (mc.ffn != "moe") return layers;
  for (int64_t l = 0; l < mc.n_layers; ++l) {
    if (l % mc.moe_every == mc.moe_every - 1) layers.push_back(l);
  }
  return layers;
}

namespace {
int64_t gated_mlp_params(int64_t d, int64_t hidden) { return 3 * d * hidden; }  // w1, w3, w2
int64_t norm_params(const ModelConfig& mc) { return mc.norm == "layernorm" ? 2 * mc.d_model : mc.d_model; }
}  // namespace

ParamCounts count_params(const ModelConfig& mc) {
  const int64_t d = mc.d_model;
  const int64_t n_moe = int64_t(moe_layer_indices(mc).size());
  const int64_t n_dense = mc.n_layers - n_moe;

  const int64_t attention = 4 * d * d;  // qkv + out
  const int64_t block_common = attention + 2 * norm_params(mc);
  const int64_t dense_ffn = gated_mlp_params(d, mc.ffn_hidden);
  const int64_t expert = gated_mlp_params(d, mc.expert_hidden);
  const int64_t router = d * mc.n_experts;
  const int64_t shared = gated_mlp_params(d, mc.n_shared_experts * mc.expert_hidden);
  const int64_t moe_total = router + shared + mc.n_experts * expert;
  const int64_t moe_active = router + shared + mc.top_k * expert;

  ParamCounts c;
  c.embedding = mc.vocab_size * d;
  const int64_t outside_blocks = c.embedding + norm_params(mc) + (mc.tie_embeddings ? 0 : mc.vocab_size * d);
  const int64_t blocks_common = mc.n_layers * block_common + n_dense * dense_ffn;
  c.total = outside_blocks + blocks_common + n_moe * moe_total;
  c.active = outside_blocks + blocks_common + n_moe * moe_active;
  return c;
}

int64_t train_flops_per_token(const ModelConfig& mc) {
  const auto c = count_params(mc);
  const int64_t head = mc.vocab_size * mc.d_model;
  const int64_t matmul_params = c.active - c.embedding + (mc.tie_embeddings ? head : 0);
  return 6 * matmul_params + 6 * mc.n_layers * mc.seq_len * mc.d_model;
}

ModelConfig flop_matched_dense(const ModelConfig& moe) {
  const int64_t n_moe = int64_t(moe_layer_indices(moe).size());
  const int64_t n_dense = moe.n_layers - n_moe;
  const int64_t moe_width = (moe.n_shared_experts + moe.top_k) * moe.expert_hidden;
  ModelConfig dense = moe;
  dense.ffn = "dense";
  dense.ffn_hidden = int64_t(std::llround(double(n_moe * moe_width + n_dense * moe.ffn_hidden) /
                                          double(moe.n_layers)));
  dense.n_experts = 0;
  dense.n_shared_experts = 0;
  dense.top_k = 1;
  dense.expert_hidden = 0;
  dense.moe_every = 1;
  return dense;
}

}  // namespace moecpt::model
