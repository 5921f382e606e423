// y = x Wᵀ (a bias-free torch::nn::Linear) with its rows split over ATen's
// threads on the CPU (model/cpu_parallel.h): forward and dL/dx by row blocks,
// dL/dW as a sum of per-thread dyᵀx blocks. The attention projections use it.
// On a GPU, under autocast or with mixed dtypes it is plain torch::linear.
#pragma once
#include "core/pch.h"

namespace moecpt::model {

torch::Tensor threaded_linear(const torch::Tensor& x_ND, const torch::Tensor& w_OD);

}  // namespace moecpt::model
