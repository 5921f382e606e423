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

}  // namespace moecpt
