// Mixture-of-Experts FFN, dropless, in torchtitan's four parts:
//   router (scores → top-k ids and gates)      — router.h
//   dispatch (sort token slots by expert)      — MoEImpl::forward step 2
//   grouped experts (every expert on its group) — GroupedExpertsImpl
//   combine (gate-weighted sum back per token) — MoEImpl::forward step 4
// plus S always-on shared experts (DeepSeek-style granular MoE).
#pragma once
#include "core/config.h"
#include "core/pch.h"
#include "model/expert_ffn.h"
#include "model/mlp.h"
#include "model/router.h"

namespace moecpt::model {

class ExpertParallel;  // model/moe_expert_parallel.h

// E gated MLPs stored as 3-D parameters, so they can be run as one grouped
// matmul where the backend has it: w1, w3: [E, D, H], w2: [E, H, D].
class GroupedExpertsImpl : public torch::nn::Module {
 public:
  GroupedExpertsImpl(int64_t n_experts, int64_t d_model, int64_t hidden,
                     const std::string& activation, double init_std, double out_std);
  // x_SD: routed slots sorted by expert id; tokens_per_expert_E: group sizes
  // (sum = S). Returns y_SD in the same order.
  torch::Tensor forward(const torch::Tensor& x_SD, const torch::Tensor& tokens_per_expert_E);
  // Whether forward() takes the grouped-GEMM path for input x (MOECPT_EXPERT_GEMM
  // or auto: LibTorch >= 2.8, CUDA, bf16 or autocast).
  bool use_grouped(const torch::Tensor& x) const;
  // The dtype the experts multiply in for input x: bf16 under autocast and on
  // CUDA's grouped path, else x's. The MoE layer gathers its slots in it.
  torch::ScalarType compute_dtype(const torch::Tensor& x) const;

  torch::Tensor w1_EDH, w3_EDH, w2_EHD;

 private:
  GatedActivation act_kind_;  // model/expert_ffn.h
};
TORCH_MODULE(GroupedExperts);

struct MoEOutput {
  torch::Tensor y_BTD;
  RoutingInfo routing;
};

class MoEImpl : public torch::nn::Module {
 public:
  // Expert w2 (residual-out) weights ~ N(0, out_std), all others ~ N(0, init_std).
  MoEImpl(const ModelConfig& mc, const RouterConfig& rc, double out_std);
  MoEOutput forward(const torch::Tensor& x_BTD);

  std::shared_ptr<Router> router;
  GroupedExperts experts{nullptr};
  GatedMLP shared{nullptr};  // S shared experts as one MLP of width S·expert_hidden; null if S = 0
  // Expert parallel (docs/distributed.md): set by the trainer; `experts` then
  // holds this rank's E/P experts and step 3 runs through all-to-alls. Null: local.
  std::shared_ptr<ExpertParallel> expert_parallel;
};
TORCH_MODULE(MoE);

}  // namespace moecpt::model
