#include "model/causal_attention.h"

#include <cmath>
#include <limits>

#include "core/error.h"
#include "model/cpu_parallel.h"

namespace moecpt::model {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class CausalAttention : public torch::autograd::Function<CausalAttention> {
 public:
  // q, k, v: [N, T, Dh] contiguous (N = B·H).
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& q, const torch::Tensor& k,
                               const torch::Tensor& v) {
    const int64_t N = q.size(0), T = q.size(1);
    const double scale = 1.0 / std::sqrt(double(q.size(2)));
    auto mask = torch::ones({T, T}, q.options().dtype(torch::kBool)).triu(1);
    auto P = torch::empty({N, T, T}, q.options());
    auto y = torch::empty_like(q);
    const int64_t W = cpu_workers(q, N);
    run_workers(W, [&](int64_t t) {
      const auto [lo, hi] = share(N, W, t);
      if (hi == lo) return;
      auto s = P.narrow(0, lo, hi - lo);
      bmm_into(s, q.narrow(0, lo, hi - lo), k.narrow(0, lo, hi - lo).transpose(1, 2));
      s.mul_(scale).masked_fill_(mask, -std::numeric_limits<double>::infinity());
      s.copy_(at::softmax(s, -1));
      bmm_into(y.narrow(0, lo, hi - lo), s, v.narrow(0, lo, hi - lo));
    });
    ctx->save_for_backward({q, k, v, P});
    ctx->saved_data["scale"] = scale;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &q = saved[0], &k = saved[1], &v = saved[2], &P = saved[3];
    const double scale = ctx->saved_data["scale"].toDouble();
    auto dy = grads[0].contiguous();
    const int64_t N = q.size(0);
    auto dq = torch::empty_like(q), dk = torch::empty_like(k), dv = torch::empty_like(v);
    const int64_t W = cpu_workers(q, N);
    run_workers(W, [&](int64_t t) {
      const auto [lo, hi] = share(N, W, t);
      if (hi == lo) return;
      const int64_t n = hi - lo;
      auto P_r = P.narrow(0, lo, n), dy_r = dy.narrow(0, lo, n);
      bmm_into(dv.narrow(0, lo, n), P_r.transpose(1, 2), dy_r);
      auto dS = at::bmm(dy_r, v.narrow(0, lo, n).transpose(1, 2));  // dP
      dS.sub_((dS * P_r).sum(-1, /*keepdim=*/true)).mul_(P_r).mul_(scale);
      bmm_into(dq.narrow(0, lo, n), dS, k.narrow(0, lo, n));
      bmm_into(dk.narrow(0, lo, n), dS.transpose(1, 2), q.narrow(0, lo, n));
    });
    return {dq, dk, dv};
  }
};

}  // namespace

torch::Tensor causal_attention_threaded(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
  if (q.dim() != 4 || k.sizes() != q.sizes() || v.sizes() != q.sizes())
    throw Error("causal_attention_threaded: q, k, v must all be [B, H, T, Dh]");
  const auto sizes = q.sizes().vec();
  auto flat = [&](const torch::Tensor& x) { return x.reshape({-1, sizes[2], sizes[3]}).contiguous(); };
  return CausalAttention::apply(flat(q), flat(k), flat(v)).view(sizes);
}

}  // namespace moecpt::model
