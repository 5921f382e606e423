#include "model/router_sinkhorn.h"

#include <algorithm>
#include <cstdlib>
#include <limits>

#include "model/cuda_kernels.h"
#include "model/torch_compat.h"

namespace moecpt::model {

SinkhornResult sinkhorn_balance(const torch::Tensor& logits_TE, double tol, int64_t max_iters,
                                double eps) {
  torch::NoGradGuard no_grad;
  compat::NoAutocast no_autocast;
  const int64_t T = logits_TE.size(0), E = logits_TE.size(1);
  auto z_TE = logits_TE.detach().to(torch::promote_types(logits_TE.scalar_type(), torch::kFloat32));
  auto C_TE = torch::exp(z_TE - std::get<0>(z_TE.max(-1, /*keepdim=*/true)));
  if (C_TE.scalar_type() == torch::kFloat32 && use_sinkhorn_kernel(C_TE.device(), E)) {
    auto k = cuda_sinkhorn(C_TE.contiguous(), tol, max_iters, eps);
    SinkhornResult res;
    res.S_TE = k.d0_T.unsqueeze(1) * C_TE * k.d1_E.unsqueeze(0);
    res.iters = -2;
    res.error = std::numeric_limits<double>::quiet_NaN();
    res.stats = k.stats_2.to(torch::kFloat64);
    return res;
  }
  auto d0_T = torch::ones({T}, C_TE.options());
  auto d1_E = torch::ones({E}, C_TE.options());

  // The stopping test reads the error on the host (a device sync on a GPU). On
  // the CPU it runs every iteration; on a GPU every kCheckEvery-th iteration
  // (and at max_iters), so a layer pays ~iters/8 syncs instead of iters, at the
  // price of up to 7 extra iterations, which only balance further. The error
  // reported is the one of the last checked iteration (= the last iteration).
  // MOECPT_SINKHORN_CHECK_EVERY=N overrides the interval (N >= 1).
  static const int64_t env_every = [] {
    const char* v = std::getenv("MOECPT_SINKHORN_CHECK_EVERY");
    return v && *v ? std::max<int64_t>(1, std::atoll(v)) : int64_t(0);
  }();
  constexpr int64_t kCheckEvery = 8;
  const int64_t check_every = env_every > 0 ? env_every : (C_TE.is_cpu() ? 1 : kCheckEvery);
  SinkhornResult res;
  while (res.iters < max_iters) {
    d0_T = (1.0 / double(T)) / (torch::mv(C_TE, d1_E) + eps);
    auto d1_new_E = (1.0 / double(E)) / (torch::mv(C_TE.t(), d0_T) + eps);
    ++res.iters;
    const bool check = res.iters % check_every == 0 || res.iters == max_iters;
    if (check) res.error = (d1_new_E - d1_E).abs().mean().item<double>();
    d1_E = d1_new_E;
    if (check && res.error < tol) break;
  }
  res.S_TE = d0_T.unsqueeze(1) * C_TE * d1_E.unsqueeze(0);
  res.stats = torch::empty({2}, C_TE.options().dtype(torch::kFloat64));  // two fills: no host-to-device copy
  res.stats[0].fill_(double(res.iters));
  res.stats[1].fill_(res.error);
  return res;
}

SinkhornRouter::SinkhornRouter(const RouterConfig& rc, const ModelConfig& mc)
    : Router(mc.d_model, mc.n_experts, mc.top_k, mc.init_std, rc.renormalize),
      tol_(rc.sinkhorn_tol),
      max_iters_(rc.sinkhorn_max_iters) {}

RoutingInfo SinkhornRouter::route(const torch::Tensor& x_TD) {
  compat::NoAutocast no_autocast;
  RoutingInfo r;
  auto logits_TE = this->logits_TE(x_TD);
  // With one expert a softmax gate would be a constant 1; sigmoid keeps a gradient.
  auto gate_scores_TE = top_k_ == 1 ? torch::sigmoid(logits_TE) : torch::softmax(logits_TE, -1);

  if (is_training()) {
    auto balanced = sinkhorn_balance(logits_TE, tol_, max_iters_);
    r.topk_ids_TK = std::get<1>(balanced.S_TE.topk(top_k_, -1));
    r.sinkhorn_stats = balanced.stats;
  } else {
    torch::NoGradGuard no_grad;
    r.topk_ids_TK = std::get<1>(logits_TE.topk(top_k_, -1));
  }
  r.gates_TK = gather_gates(gate_scores_TE, r.topk_ids_TK);
  r.tokens_per_expert_E = count_tokens(r.topk_ids_TK);
  // The routing statistics' scores are the softmax: the gate scores themselves unless k = 1.
  r.scores_TE = top_k_ == 1 ? torch::softmax(logits_TE.detach(), -1) : gate_scores_TE.detach();
  r.aux_loss = zero_scalar(logits_TE);
  r.z_loss = zero_scalar(logits_TE);
  return r;
}

}  // namespace moecpt::model
