// Activation checkpointing (recomputation): run a piece of the network in the
// forward pass without keeping its intermediate activations, and run it again
// in the backward pass to get them back. Memory per checkpointed block falls
// from all its intermediates (attention scores, FFN hidden, routing buffers…)
// to its inputs; the cost is one more forward of the block per step (≈ +1/3
// of the step's matmul FLOPs when every block is checkpointed).
//
// The "reentrant" scheme of torch.utils.checkpoint(use_reentrant=True) and
// Megatron's full recompute: forward runs fn with grad mode off and saves the
// inputs; backward reruns fn on detached copies with grad mode on (and the
// forward's bf16 autocast state, which the backward threads do not inherit),
// then backpropagates the incoming gradients through the rerun. Parameters
// used inside fn get their gradients accumulated during that rerun, exactly as
// without checkpointing; the function returns the inputs' gradients.
//
// Like every reentrant scheme, the parameters' gradients are accumulated into
// their .grad by the rerun: use loss.backward(), not torch::autograd::grad()
// with the parameters as inputs (which would not see them).
//
// fn must be deterministic (same outputs from the same inputs: no dropout, no
// data-dependent randomness; moecpt's blocks have none). On a GPU, a kernel
// with atomic adds (e.g. MOECPT_MOE_COMBINE=index_add) may make the rerun
// differ in the last bits, as in every recompute scheme. With grad mode off
// (evaluation) fn simply runs.
#pragma once
#include <functional>
#include <vector>

#include "core/pch.h"

namespace moecpt::model {

// first_pass: true in the forward pass, false when the backward reruns it (fn
// may publish side results, e.g. routing statistics, on the first pass only).
using RecomputeFn = std::function<std::vector<torch::Tensor>(const std::vector<torch::Tensor>& inputs, bool first_pass)>;

// Returns fn(inputs) (each output differentiable w.r.t. the inputs and the
// parameters fn uses) without keeping fn's intermediates for backward.
// Outputs must be fresh tensors (not views of the inputs).
std::vector<torch::Tensor> checkpointed(RecomputeFn fn, const std::vector<torch::Tensor>& inputs);

}  // namespace moecpt::model
