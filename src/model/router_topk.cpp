#include "model/router_topk.h"

#include "model/torch_compat.h"

namespace moecpt::model {

TopKRouter::TopKRouter(const RouterConfig& rc, const ModelConfig& mc)
    : Router(mc.d_model, mc.n_experts, mc.top_k, mc.init_std, rc.renormalize),
      aux_alpha_(rc.aux_alpha),
      z_beta_(rc.z_beta) {}

RoutingInfo TopKRouter::route(const torch::Tensor& x_TD) {
  compat::NoAutocast no_autocast;
  const int64_t T = x_TD.size(0);
  RoutingInfo r;

  auto logits_TE = this->logits_TE(x_TD);
  auto probs_TE = torch::softmax(logits_TE, -1);
  r.topk_ids_TK = std::get<1>(probs_TE.topk(top_k_, -1));
  r.gates_TK = gather_gates(probs_TE, r.topk_ids_TK);
  r.tokens_per_expert_E = count_tokens(r.topk_ids_TK);
  r.scores_TE = probs_TE.detach();

  // f_i is a count: it carries no gradient, so the loss pushes on P_i only.
  auto f_E = r.tokens_per_expert_E.to(probs_TE.scalar_type()) / double(top_k_ * T);
  if (dp_sum) {  // data parallel: f over the global batch, counts and tokens of every rank
    auto n = dp_sum(torch::cat({r.tokens_per_expert_E.to(torch::kFloat64),
                                torch::full({1}, double(T), r.tokens_per_expert_E.options().dtype(torch::kFloat64))}));
    f_E = (n.narrow(0, 0, n_experts_) / (double(top_k_) * n[n_experts_])).to(probs_TE.scalar_type());
  }
  auto P_E = probs_TE.mean(0);
  r.aux_loss = aux_alpha_ * double(n_experts_) * (f_E * P_E).sum();
  r.z_loss = z_beta_ * torch::logsumexp(logits_TE, -1).pow(2).mean();
  return r;
}

}  // namespace moecpt::model
