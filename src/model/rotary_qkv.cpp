#include "model/rotary_qkv.h"

#include <cstdlib>

#include "core/error.h"
#include "model/cuda_kernels.h"
#include "model/torch_compat.h"

namespace moecpt::model {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// out = R x for x, out: [B, T, H, Dh] (any strides), c, s: [T, 1, Dh/2]. With
// sign = −1 it is Rᵀ x (the backward): the sine terms change sign.
void rotate_into(const torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& c, const torch::Tensor& s,
                 double sign) {
  // CUDA (fp32/bf16): one kernel reads x and writes out once (model/cuda_kernels.h).
  if (use_cuda_kernels(x) && x.stride(-1) == 1 && out.stride(-1) == 1 && c.is_contiguous() && s.is_contiguous())
    return cuda_rotate_pairs(out, x, c, s, sign > 0 ? 1 : -1);
  const int64_t n = x.size(-1) / 2;
  auto x1 = x.narrow(-1, 0, n), x2 = x.narrow(-1, n, n);
  auto o1 = out.narrow(-1, 0, n), o2 = out.narrow(-1, n, n);
  at::mul_out(o1, x1, c);
  o1.addcmul_(x2, s, -sign);
  at::mul_out(o2, x2, c);
  o2.addcmul_(x1, s, sign);
}

class RotaryQKV : public torch::autograd::Function<RotaryQKV> {
 public:
  static variable_list forward(AutogradContext* ctx, const torch::Tensor& qkv_BTC, const torch::Tensor& cos_TR,
                               const torch::Tensor& sin_TR, int64_t n_heads, bool seq_major) {
    compat::NoAutocast no_autocast;  // dtypes are explicit here
    const int64_t B = qkv_BTC.size(0), T = qkv_BTC.size(1), Dh = qkv_BTC.size(2) / (3 * n_heads);
    auto x = qkv_BTC.view({B, T, 3, n_heads, Dh});
    auto c = cos_TR.to(qkv_BTC.scalar_type()).view({T, 1, Dh / 2});
    auto s = sin_TR.to(qkv_BTC.scalar_type()).view({T, 1, Dh / 2});
    auto rotated = [&](int64_t which) {  // written as [B, T, H, Dh], returned as [B, H, T, Dh]
      if (seq_major) {
        auto out = torch::empty({B, T, n_heads, Dh}, qkv_BTC.options());
        rotate_into(out, x.select(2, which), c, s, +1.0);
        return out.transpose(1, 2);
      }
      auto out = torch::empty({B, n_heads, T, Dh}, qkv_BTC.options());
      rotate_into(out.transpose(1, 2), x.select(2, which), c, s, +1.0);
      return out;
    };
    auto q = rotated(0), k = rotated(1);
    auto v = x.select(2, 2).transpose(1, 2);
    ctx->save_for_backward({c, s});
    ctx->saved_data["B"] = B;
    return {q, k, v};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    compat::NoAutocast no_autocast;
    const auto saved = ctx->get_saved_variables();
    const auto &c = saved[0], &s = saved[1];
    const int64_t B = ctx->saved_data["B"].toInt();
    torch::Tensor like;
    for (const auto& g : grads)
      if (g.defined()) like = g;
    if (!like.defined()) return {torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
    const int64_t H = like.size(1), T = like.size(2), Dh = like.size(3);
    auto dx = torch::empty({B, T, 3, H, Dh}, like.options().dtype(c.scalar_type()));
    for (int64_t which = 0; which < 3; ++which) {
      auto slot = dx.select(2, which);
      const auto& g = grads[size_t(which)];
      if (!g.defined())
        slot.zero_();
      else if (which == 2)
        slot.copy_(g.transpose(1, 2));
      else
        rotate_into(slot, g.transpose(1, 2), c, s, -1.0);
    }
    return {dx.view({B, T, 3 * H * Dh}), torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

void check_shapes(const torch::Tensor& qkv, int64_t n_heads, const RotaryTables& rope) {
  if (qkv.dim() != 3 || n_heads < 1 || qkv.size(2) % (3 * n_heads) != 0 || (qkv.size(2) / (3 * n_heads)) % 2 != 0)
    throw Error("rotary_qkv: qkv must be [B, T, 3·H·Dh] with an even head size Dh; got " +
                std::to_string(qkv.dim()) + "-d, last size " + std::to_string(qkv.dim() ? qkv.size(-1) : 0) +
                ", " + std::to_string(n_heads) + " heads");
  const int64_t T = qkv.size(1), R = qkv.size(2) / (6 * n_heads);
  if (rope.cos_TR.sizes() != torch::IntArrayRef{T, R} || rope.sin_TR.sizes() != torch::IntArrayRef{T, R})
    throw Error("rotary_qkv: rotary tables must be [" + std::to_string(T) + ", " + std::to_string(R) + "]");
}

}  // namespace

RotatedQKV rotary_qkv(const torch::Tensor& qkv_BTC, int64_t n_heads, const RotaryTables& rope, QKVLayout layout) {
  check_shapes(qkv_BTC, n_heads, rope);
  auto out = RotaryQKV::apply(qkv_BTC.contiguous(), rope.cos_TR, rope.sin_TR, n_heads, layout == QKVLayout::kSeqMajor);
  return {out[0], out[1], out[2]};
}

QKVLayout parse_qkv_layout(const char* value) {
  const std::string v = value ? value : "";
  if (v.empty() || v == "head_major") return QKVLayout::kHeadMajor;
  if (v == "seq_major") return QKVLayout::kSeqMajor;
  throw Error("MOECPT_QKV_LAYOUT='" + v + "': expected head_major (the default) or seq_major");
}

QKVLayout qkv_layout_requested() {
  static const QKVLayout chosen = parse_qkv_layout(std::getenv("MOECPT_QKV_LAYOUT"));
  return chosen;
}

QKVLayout qkv_layout_for(const torch::Device& device) {
  return device.is_cuda() ? qkv_layout_requested() : QKVLayout::kHeadMajor;
}

const char* qkv_layout_name(QKVLayout layout) {
  return layout == QKVLayout::kSeqMajor ? "seq_major" : "head_major";
}

RotatedQKV rotary_qkv_composite(const torch::Tensor& qkv_BTC, int64_t n_heads, const RotaryTables& rope) {
  check_shapes(qkv_BTC, n_heads, rope);
  const int64_t B = qkv_BTC.size(0), T = qkv_BTC.size(1), Dh = qkv_BTC.size(2) / (3 * n_heads);
  // [B, T, 3, H, Dh] → three [B, H, T, Dh]
  auto x_3BHTd = qkv_BTC.reshape({B, T, 3, n_heads, Dh}).permute({2, 0, 3, 1, 4});
  return {apply_rotary(x_3BHTd[0], rope), apply_rotary(x_3BHTd[1], rope), x_3BHTd[2]};
}

bool fused_rotary_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("MOECPT_FUSED_ROPE");
    return !(v && std::string(v) == "0");
  }();
  return on;
}

}  // namespace moecpt::model
