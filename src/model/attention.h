// Causal multi-head self-attention with rotary position embeddings (RoPE,
// rotate-half layout as in Llama). The attention kernel itself is
// compat::causal_attention (fused on LibTorch 2.x, spelled out on 1.13).
#pragma once
#include "core/pch.h"

namespace moecpt::model {

// cos/sin of the rotation angles t·θ^(-2i/Dh), shape [T, Dh/2]. Computed once per
// forward by the Transformer and shared by all blocks.
struct RotaryTables {
  torch::Tensor cos_TR, sin_TR;  // R = Dh/2
};
RotaryTables rotary_tables(int64_t T, int64_t head_dim, double theta, const torch::Device& device);
// x: [B, H, T, Dh]; rotates the pairs (x[..., i], x[..., i + Dh/2]).
torch::Tensor apply_rotary(const torch::Tensor& x_BHTd, const RotaryTables& rope);

class AttentionImpl : public torch::nn::Module {
 public:
  // qkv ~ N(0, init_std); out (the residual-out projection) ~ N(0, out_std).
  AttentionImpl(int64_t d_model, int64_t n_heads, double init_std, double out_std);
  torch::Tensor forward(const torch::Tensor& x_BTD, const RotaryTables& rope);
  int64_t head_dim() const { return head_dim_; }

  torch::nn::Linear qkv{nullptr};  // [3D, D], no bias: q, k, v stacked
  torch::nn::Linear out{nullptr};  // [D, D], no bias

 private:
  int64_t n_heads_, head_dim_;
};
TORCH_MODULE(Attention);

}  // namespace moecpt::model
