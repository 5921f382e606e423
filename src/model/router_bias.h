// Auxiliary-loss-free balancing (DeepSeek-V3 style; SPEC §3 "beyond the study"):
// a per-expert bias is added to the sigmoid scores for the *choice* only; gates
// come from the unbiased scores. The bias is a buffer (checkpointed, never
// optimised), nudged by ±γ toward under-loaded experts after each optimizer step.
#pragma once
#include "model/router.h"

namespace moecpt::model {

class BiasRouter : public Router {
 public:
  BiasRouter(const RouterConfig& rc, const ModelConfig& mc);
  // s = sigmoid(z); ids = top-k of (s + bias); gates = s at ids (renormalised if
  // configured). No aux loss, no z-loss.
  RoutingInfo route(const torch::Tensor& x_TD) override;
  // bias_i += γ · sign(mean_j load_j − load_i). Called outside forward, so the
  // loads of all micro-batches of a step can be summed first.
  void update_bias(const torch::Tensor& tokens_per_expert_E) override;

  torch::Tensor expert_bias_E;  // [E] float32 buffer "expert_bias"

 private:
  double gamma_;
};

}  // namespace moecpt::model
