#include "model/router.h"

#include "core/error.h"
#include "model/cuda_kernels.h"
#include "model/moe_slots.h"
#include "model/router_bias.h"
#include "model/router_sinkhorn.h"
#include "model/router_topk.h"
#include "model/torch_compat.h"

namespace moecpt::model {

Router::Router(int64_t d_model, int64_t n_experts, int64_t top_k, double init_std, bool renormalize)
    : n_experts_(n_experts), top_k_(top_k), renormalize_(renormalize) {
  if (n_experts < 1 || top_k < 1 || top_k > n_experts) {
    throw Error("router: need 1 <= top_k (" + std::to_string(top_k) + ") <= n_experts (" +
                std::to_string(n_experts) + ")");
  }
  weight_ED = register_parameter("weight", torch::randn({n_experts, d_model}) * init_std);
}

torch::Tensor Router::logits_TE(const torch::Tensor& x_TD) const {
  compat::NoAutocast no_autocast;
  const auto dtype = torch::promote_types(x_TD.scalar_type(), torch::kFloat32);
  return torch::matmul(x_TD.to(dtype), weight_ED.to(dtype).t());
}

torch::Tensor Router::gather_gates(const torch::Tensor& scores_TE,
                                   const torch::Tensor& topk_ids_TK) const {
  auto gates_TK = scores_TE.gather(1, topk_ids_TK);
  // With k = 1 renormalising would make every gate 1 and cut the router's gradient.
  if (renormalize_ && top_k_ > 1) gates_TK = gates_TK / gates_TK.sum(-1, /*keepdim=*/true);
  return gates_TK;
}

torch::Tensor Router::count_tokens(const torch::Tensor& topk_ids_TK) const {
  auto ids_S = topk_ids_TK.reshape({-1});
  // with MOECPT_SLOT_SORT_KERNEL=1 on CUDA: the slot sort's counting pass (no atomics)
  if (use_slot_sort_kernel(ids_S, n_experts_)) return cuda_expert_counts(ids_S.contiguous(), n_experts_);
  return torch::zeros({n_experts_}, ids_S.options()).scatter_add_(0, ids_S, torch::ones_like(ids_S));
}

torch::Tensor Router::zero_scalar(const torch::Tensor& like) const {
  return torch::zeros({}, like.options());
}

std::shared_ptr<Router> make_router(const RouterConfig& rc, const ModelConfig& mc) {
  using Factory = std::function<std::shared_ptr<Router>()>;
  const std::map<std::string, Factory> factories = {
      {"topk", [&] { return std::make_shared<TopKRouter>(rc, mc); }},
      {"sinkhorn", [&] { return std::make_shared<SinkhornRouter>(rc, mc); }},
      {"bias", [&] { return std::make_shared<BiasRouter>(rc, mc); }},
  };
  auto it = factories.find(rc.type);
  if (it == factories.end()) throw Error("router.type: unknown router '" + rc.type + "'");
  return it->second();
}

}  // namespace moecpt::model
