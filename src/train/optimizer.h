// The optimizer every moecpt phase uses (SPEC §4): AdamW with decoupled weight
// decay on matrices only — norms, biases and the token embedding are not decayed.
#pragma once
#include <memory>

#include "core/config.h"
#include "core/pch.h"

namespace moecpt {

std::unique_ptr<torch::optim::AdamW> make_adamw(torch::nn::Module& model, const OptimConfig& o);

// Set the learning rate of every parameter group.
void set_learning_rate(torch::optim::Optimizer& opt, double lr);

// Global-norm gradient clipping on the device: the same maths as LibTorch's
// clip_grad_norm_ (coef = max_norm / (norm + 1e-6), applied when < 1) without its
// .item() (a host sync). Returns the pre-clip norm as a 0-d fp32 device tensor,
// undefined if no parameter has a gradient. The trainer and `bench train` use it;
// expert parallelism has its own (model/moe_expert_parallel.h: the norm spans ranks).
torch::Tensor clip_grad_norm_on_device(const std::vector<torch::Tensor>& params, double max_norm);

}  // namespace moecpt
