#include "model/attention.h"

#include "core/error.h"
#include "model/causal_attention.h"
#include "model/rotary_qkv.h"
#include "model/threaded_linear.h"
#include "model/torch_compat.h"

namespace moecpt::model {

RotaryTables rotary_tables(int64_t T, int64_t head_dim, double theta, const torch::Device& device) {
  auto opts = torch::TensorOptions().dtype(torch::kFloat32).device(device);
  auto inv_freq_R = torch::pow(theta, -torch::arange(0, head_dim, 2, opts) / double(head_dim));
  auto angles_TR = torch::outer(torch::arange(T, opts), inv_freq_R);
  return {torch::cos(angles_TR), torch::sin(angles_TR)};
}

torch::Tensor apply_rotary(const torch::Tensor& x_BHTd, const RotaryTables& rope) {
  const int64_t half = x_BHTd.size(-1) / 2;
  auto x1 = x_BHTd.narrow(-1, 0, half), x2 = x_BHTd.narrow(-1, half, half);
  auto cos = rope.cos_TR.to(x_BHTd.scalar_type()), sin = rope.sin_TR.to(x_BHTd.scalar_type());
  return torch::cat({x1 * cos - x2 * sin, x1 * sin + x2 * cos}, -1);
}

AttentionImpl::AttentionImpl(int64_t d_model, int64_t n_heads, double init_std, double out_std)
    : n_heads_(n_heads), head_dim_(d_model / n_heads) {
  if (d_model % n_heads != 0 || head_dim_ % 2 != 0) {
    throw Error("model: d_model (" + std::to_string(d_model) + ") / n_heads (" +
                std::to_string(n_heads) + ") must be an even integer for RoPE");
  }
  qkv_layout_requested();  // a bad MOECPT_QKV_LAYOUT stops the run here, on any device
  qkv = register_module("qkv", torch::nn::Linear(torch::nn::LinearOptions(d_model, 3 * d_model).bias(false)));
  out = register_module("out", torch::nn::Linear(torch::nn::LinearOptions(d_model, d_model).bias(false)));
  torch::NoGradGuard no_grad;
  qkv->weight.normal_(0.0, init_std);
  out->weight.normal_(0.0, out_std);
}

torch::Tensor AttentionImpl::forward(const torch::Tensor& x_BTD, const RotaryTables& rope) {
  const int64_t B = x_BTD.size(0), T = x_BTD.size(1), D = x_BTD.size(2);
  auto qkv_BTC = threaded_linear(x_BTD, qkv->weight);
  // q, k rotated, v; all [B, H, T, Dh] (model/rotary_qkv.h)
  const auto [q, k, v] = fused_rotary_enabled()
                             ? rotary_qkv(qkv_BTC, n_heads_, rope, qkv_layout_for(qkv_BTC.device()))
                             : rotary_qkv_composite(qkv_BTC, n_heads_, rope);
  // LibTorch 1.13 has no fused attention: on the CPU (not under autocast) our
  // threaded Function (model/causal_attention.h), elsewhere compat's.
  const bool threaded = !MOECPT_TORCH_AT_LEAST(2, 0) && q.is_cpu() && !compat::autocast_enabled(q.device());
  auto y_BHTd = threaded ? causal_attention_threaded(q, k, v) : compat::causal_attention(q, k, v);
  return threaded_linear(y_BHTd.transpose(1, 2).reshape({B, T, D}), out->weight);
}

}  // namespace moecpt::model
