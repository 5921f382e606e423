#include "model/moe.h"

#include "core/error.h"
#include "model/moe_expert_parallel.h"

namespace moecpt::model {

GroupedExpertsImpl::GroupedExpertsImpl(int64_t n_experts, int64_t d_model, int64_t hidden,
                                       const std::string& activation, double init_std,
                                       double out_std)
    : act_(activation_by_name(activation)) {
  w1_EDH = register_parameter("w1", torch::randn({n_experts, d_model, hidden}) * init_std);
  w3_EDH = register_parameter("w3", torch::randn({n_experts, d_model, hidden}) * init_std);
  w2_EHD = register_parameter("w2", torch::randn({n_experts, hidden, d_model}) * out_std);
}

torch::Tensor GroupedExpertsImpl::forward(const torch::Tensor& x_SD,
                                          const torch::Tensor& tokens_per_expert_E) {
  // LibTorch 1.13 has no grouped GEMM, so: one host copy of the E group sizes per
  // layer (not one sync per expert), then a plain mm per non-empty group on
  // zero-copy slices. unbind() (not w[e]) keeps the backward to a single stack
  // of the expert gradients instead of E full-size zero tensors.
  auto counts_E = tokens_per_expert_E.to(torch::kCPU);
  const auto* counts = counts_E.data_ptr<int64_t>();
  auto w1 = w1_EDH.unbind(0), w3 = w3_EDH.unbind(0), w2 = w2_EHD.unbind(0);

  std::vector<torch::Tensor> y_parts;
  int64_t offset = 0;
  for (int64_t e = 0; e < counts_E.size(0); ++e) {
    if (counts[e] == 0) continue;
    auto x_nD = x_SD.narrow(0, offset, counts[e]);
    y_parts.push_back(torch::mm(act_(torch::mm(x_nD, w1[e])) * torch::mm(x_nD, w3[e]), w2[e]));
    offset += counts[e];
  }
  if (offset != x_SD.size(0)) {
    throw Error("moe: tokens_per_expert sums to " + std::to_string(offset) + " but " +
                std::to_string(x_SD.size(0)) + " slots were dispatched");
  }
  return torch::cat(y_parts, 0);
}

MoEImpl::MoEImpl(const ModelConfig& mc, const RouterConfig& rc, double out_std) {
  if (mc.expert_hidden < 1) throw Error("model.expert_hidden must be >= 1 for an MoE model");
  router = register_module("router", make_router(rc, mc));
  experts = register_module("experts", GroupedExperts(mc.n_experts, mc.d_model, mc.expert_hidden,
                                                      mc.activation, mc.init_std, out_std));
  if (mc.n_shared_experts > 0) {
    // S shared experts of width h are the same maths as one of width S·h.
    shared = register_module("shared", GatedMLP(mc.d_model, mc.n_shared_experts * mc.expert_hidden,
                                                mc.activation, mc.init_std, out_std));
  }
}

MoEOutput MoEImpl::forward(const torch::Tensor& x_BTD) {
  // 1. router: top-k experts and gates for every token
  // 2. dispatch: sort the T·K token slots by expert id, gather their inputs
  // 3. grouped experts: each expert runs on its contiguous group
  // 4. combine: weight by gates, scatter-add back to token order
  // 5. shared experts: applied to every token, added on top
  const int64_t D = x_BTD.size(-1);
  auto x_TD = x_BTD.reshape({-1, D});
  const int64_t K = router->top_k();

  // 1.
  MoEOutput out;
  out.routing = router->route(x_TD);
  const auto& r = out.routing;

  // 2. Slot s = t·K + j holds token t's j-th choice; a stable sort groups by expert.
  auto ids_S = r.topk_ids_TK.reshape({-1});
  auto order_S = std::get<1>(ids_S.sort(c10::optional<bool>(/*stable=*/true), /*dim=*/0));
  auto token_idx_S = order_S.div(K, "floor");
  auto x_SD = x_TD.index_select(0, token_idx_S);

  // 3. (expert parallel: on the experts' ranks, model/moe_expert_parallel.h)
  auto y_SD = expert_parallel ? expert_parallel->run(*experts, x_SD, r.tokens_per_expert_E)
                              : experts(x_SD, r.tokens_per_expert_E);

  // 4.
  auto gates_S = r.gates_TK.reshape({-1}).index_select(0, order_S).to(y_SD.scalar_type());
  auto y_TD = torch::zeros({x_TD.size(0), D}, y_SD.options())
                  .index_add(0, token_idx_S, y_SD * gates_S.unsqueeze(1));

  // 5.
  if (shared) y_TD = y_TD + shared(x_TD);

  out.y_BTD = y_TD.view(x_BTD.sizes());
  return out;
}

}  // namespace moecpt::model
