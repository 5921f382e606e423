#include "model/router_bias.h"

#include "model/torch_compat.h"

namespace moecpt::model {

BiasRouter::BiasRouter(const RouterConfig& rc, const ModelConfig& mc)
    : Router(mc.d_model, mc.n_experts, mc.top_k, mc.init_std, rc.renormalize),
      gamma_(rc.bias_gamma) {
  expert_bias_E = register_buffer("expert_bias", torch::zeros({mc.n_experts}));
}

RoutingInfo BiasRouter::route(const torch::Tensor& x_TD) {
  compat::NoAutocast no_autocast;
  RoutingInfo r;
  auto logits_TE = this->logits_TE(x_TD);
  auto scores_TE = torch::sigmoid(logits_TE);
  {
    torch::NoGradGuard no_grad;
    auto biased_TE = scores_TE + expert_bias_E.to(scores_TE.scalar_type()).unsqueeze(0);
    r.topk_ids_TK = std::get<1>(biased_TE.topk(top_k_, -1));
  }
  r.gates_TK = gather_gates(scores_TE, r.topk_ids_TK);
  r.tokens_per_expert_E = count_tokens(r.topk_ids_TK);
  r.scores_TE = scores_TE.detach();
  r.aux_loss = zero_scalar(logits_TE);
  r.z_loss = zero_scalar(logits_TE);
  return r;
}

void BiasRouter::update_bias(const torch::Tensor& tokens_per_expert_E) {
  torch::NoGradGuard no_grad;
  auto load_E = tokens_per_expert_E.to(expert_bias_E.device(), expert_bias_E.scalar_type());
  expert_bias_E.add_(gamma_ * torch::sign(load_E.mean() - load_E));
}

}  // namespace moecpt::model
