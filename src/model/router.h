// Router interface (SPEC §3): a linear map d → E without bias, kept and computed
// in fp32, that picks k experts per token and their gate weights. Three routing
// algorithms implement it, one file each: router_topk (Z+Aux), router_sinkhorn,
// router_bias (aux-loss-free). make_router() builds one from RouterConfig.type.
#pragma once
#include <functional>
#include <memory>

#include "core/config.h"
#include "core/pch.h"

namespace moecpt::model {

// What one MoE layer decided for the T tokens of a batch.
struct RoutingInfo {
  torch::Tensor gates_TK;             // float32: weight of each chosen expert
  torch::Tensor topk_ids_TK;          // int64: the chosen experts
  torch::Tensor tokens_per_expert_E;  // int64: routed slots per expert (sums to T·K), on device
  torch::Tensor scores_TE;            // float32, detached: raw router scores (softmax; sigmoid
                                      // for the bias router), for entropy / inference-mode stats
  torch::Tensor aux_loss;             // scalar: load-balancing loss, already × α (0 if n/a)
  torch::Tensor z_loss;               // scalar: router z-loss, already × β (0 if n/a)
  torch::Tensor sinkhorn_stats;       // Sinkhorn's fp64 [iterations, final mean |d1 - d1_prev|] on the
                                      // routing's device; undefined when Sinkhorn did not run. The
                                      // trainer reads it in the step's one host copy.
};

class Router : public torch::nn::Module {
 public:
  Router(int64_t d_model, int64_t n_experts, int64_t top_k, double init_std, bool renormalize);
  ~Router() override = default;

  // x_TD: [T, D] tokens (any float dtype). Training vs evaluation behaviour
  // follows is_training() (only Sinkhorn differs).
  virtual RoutingInfo route(const torch::Tensor& x_TD) = 0;

  // Aux-loss-free balancing hook, called by the trainer after the optimizer step
  // with the loads summed over the step's micro-batches. No-op for other routers.
  virtual void update_bias(const torch::Tensor& tokens_per_expert_E) {}

  // Data parallel (docs/distributed.md): when set, returns the sum of a tensor
  // over all ranks that share the batch (an all-reduce). Routers whose loss uses
  // batch statistics (the top-k aux loss's f_i) use it to make them global.
  // Unset on one process and during evaluation.
  std::function<torch::Tensor(const torch::Tensor&)> dp_sum;

  int64_t n_experts() const { return n_experts_; }
  int64_t top_k() const { return top_k_; }

  torch::Tensor weight_ED;  // [E, D] router weight, registered as "weight"

 protected:
  // z = x Wᵀ in fp32 (double if x is double, for gradient checks), autocast off.
  torch::Tensor logits_TE(const torch::Tensor& x_TD) const;
  // Gate values at the chosen ids, renormalised to sum 1 when configured and k > 1.
  torch::Tensor gather_gates(const torch::Tensor& scores_TE, const torch::Tensor& topk_ids_TK) const;
  // Routed slots per expert, computed on device with a scatter-add (no host sync).
  torch::Tensor count_tokens(const torch::Tensor& topk_ids_TK) const;
  torch::Tensor zero_scalar(const torch::Tensor& like) const;

  int64_t n_experts_;
  int64_t top_k_;
  bool renormalize_;
};

// Builds the router named by rc.type for the given model shape; throws
// moecpt::Error for an unknown type.
std::shared_ptr<Router> make_router(const RouterConfig& rc, const ModelConfig& mc);

}  // namespace moecpt::model
