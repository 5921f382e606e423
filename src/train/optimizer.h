// The optimizer every moecpt phase uses (SPEC §4): AdamW with decoupled weight
// decay on matrices only — norms, biases and the token embedding are not decayed.
#pragma once
#include <memory>

#include "core/config.h"
#include "core/pch.h"

namespace moecpt {

// LibTorch's AdamW whose step() runs as one fused multi-tensor kernel per
// parameter group (at::_fused_adamw_, LibTorch >= 2.4) instead of ~6 kernels
// per parameter: on a GPU the optimizer was ~48 ms of a 378 ms paper-scale
// step, one small launch after another (docs/performance.md). Same maths
// (decoupled decay, bias corrections; fp32 state), same per-parameter state
// (AdamWParamState: checkpoints are interchangeable), so resume and expert
// parallel's state sharding see no difference. kAuto: fused when compiled in
// and the parameters are on a CUDA device, else LibTorch's loop (the CPU, and
// LibTorch 1.13, unchanged). MOECPT_FUSED_ADAMW=0 forces the loop (A/B runs).
class FusedAdamW : public torch::optim::AdamW {
 public:
  enum class Mode { kAuto, kFused, kLoop };
  FusedAdamW(const std::vector<torch::optim::OptimizerParamGroup>& groups, torch::optim::AdamWOptions defaults,
             Mode mode = Mode::kAuto);
  torch::Tensor step(LossClosure closure = nullptr) override;
  // "fused" or "loop": what the last step() ran ("none" before the first).
  const char* last_path() const { return last_path_; }
  static bool compiled();  // at::_fused_adamw_ available in this LibTorch
  // Whether the next step() takes the fused path (then it can apply a pending
  // gradient scale inside its kernel).
  bool use_fused() const;
  // The next step() divides every gradient by `divisor` (a 0-d fp32 tensor on
  // the parameters' device) before using it: inside the fused kernel
  // (at::_fused_adamw_'s grad_scale, which also writes the scaled gradient
  // back), else as a multiply before LibTorch's loop. Consumed by that step.
  void set_pending_grad_divisor(torch::Tensor divisor) { pending_divisor_ = std::move(divisor); }

 private:
  Mode mode_;
  const char* last_path_ = "none";
  torch::Tensor pending_divisor_;
};

// The run's optimizer: FusedAdamW (kAuto unless told) over two groups, the
// decayed matrices and the rest.
std::unique_ptr<torch::optim::AdamW> make_adamw(torch::nn::Module& model, const OptimConfig& o,
                                                FusedAdamW::Mode mode = FusedAdamW::Mode::kAuto);

// The state LibTorch's optimizer keeps for parameter `p`; nullptr before its
// first step. (Its map is keyed by the TensorImpl: as a string in LibTorch 1.13,
// as void* in 2.x; this hides which.)
torch::optim::OptimizerParamState* find_param_state(torch::optim::Optimizer& opt, const torch::Tensor& p);

// Set the learning rate of every parameter group.
void set_learning_rate(torch::optim::Optimizer& opt, double lr);

// Global-norm gradient clipping on the device: the same maths as LibTorch's
// clip_grad_norm_ (coef = max_norm / (norm + 1e-6), applied when < 1) without its
// .item() (a host sync). Returns the pre-clip norm as a 0-d fp32 device tensor,
// undefined if no parameter has a gradient. The trainer and `bench train` use it;
// expert parallelism has its own (model/moe_expert_parallel.h: the norm spans ranks).
// With `fold_into` a FusedAdamW whose next step is fused, the CUDA path does
// not scale the gradients itself: it hands 1/coef to that step (one pass over
// every gradient less: the _foreach_mul_ was 6 ms of the H100 Granular step).
torch::Tensor clip_grad_norm_on_device(const std::vector<torch::Tensor>& params, double max_norm,
                                       FusedAdamW* fold_into = nullptr);

}  // namespace moecpt
