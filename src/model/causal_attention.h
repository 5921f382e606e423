// Causal attention softmax(QKᵀ/√Dh + mask) V for LibTorch builds without
// scaled_dot_product_attention (1.13) on the CPU, as one autograd Function
// whose (batch·head) slices are split over ATen's threads
// (model/cpu_parallel.h): each thread runs its heads' bmm, mask, softmax and
// bmm, and the backward written out (dV = Pᵀ dY, dS = P ⊙ (dP − rowsum(dP ⊙ P)),
// dQ = dS K/√Dh, dK = dSᵀ Q/√Dh). The [B·H, T, T] probabilities are kept for
// the backward, as autograd would. ATen 1.13's bmm loops over the batch on
// one thread; this is what made attention the largest serial part of a step.
#pragma once
#include "core/pch.h"

namespace moecpt::model {

// q, k, v: [B, H, T, Dh], one floating dtype, CPU. Returns [B, H, T, Dh].
torch::Tensor causal_attention_threaded(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v);

}  // namespace moecpt::model
