// The routed experts' gated MLPs as one autograd Function over all groups
// (the "loop" expert GEMM of model/grouped_gemm.h): for expert e and its rows
// [o_e, o_e + n_e) of x (sorted by expert),
//
//   h = x_e [W1_e | W3_e]      one mm per expert, w1 and w3 side by side
//   a = act(h_1) ⊙ h_3         one elementwise pass over all rows
//   y_e = a_e W2_e             one mm per expert, written in place
//
// and the backward written out (dW2_e = a_eᵀ dy_e, da = dy W2ᵀ, dh from the
// activation's derivative, dW13_e = x_eᵀ dh_e, dx_e = dh_e W13_eᵀ), each mm
// writing into its slice of one preallocated buffer. Versus the same maths as
// separate autograd ops this saves, per layer, the E full-size zero tensors and
// sums of the slices' backward, the cat of the outputs, the stack of the
// weight gradients, and half the mm calls of the up-projection
// (docs/performance.md measured it). Any device and dtype; the caller casts.
#pragma once
#include "core/pch.h"

namespace moecpt::model {

enum class GatedActivation { kGelu, kSilu };
// "geglu" → exact GeLU, "swiglu" → SiLU; throws moecpt::Error otherwise.
GatedActivation gated_activation_by_name(const std::string& name);

// x_SD [S, D] (rows grouped by expert), w1/w3 [E, D, H], w2 [E, H, D], all of
// one dtype and device; counts_E: int64 on the CPU, the group sizes (sum S).
// Returns y_SD [S, D]; differentiable in x and the three weights.
torch::Tensor expert_ffn_loop(const torch::Tensor& x_SD, const torch::Tensor& w1_EDH,
                              const torch::Tensor& w3_EDH, const torch::Tensor& w2_EHD,
                              const torch::Tensor& counts_E, GatedActivation act);

// a = act(h1) ⊙ h3 for h13 = [h1 | h3] ([S, 2H]) → [S, H], one autograd node
// that saves only h13 (the grouped expert path's activation; on CUDA one
// kernel each way, model/cuda_kernels.h).
torch::Tensor gated_activation(const torch::Tensor& h13_S2H, GatedActivation act);

// [a | b] along the last dim, cast to `dtype`, as one node: each input is cast
// straight into its half of the output (no separate cat pass) and backward
// casts each half of the gradient back to its input's dtype. The grouped
// experts' w1 | w3 weight under autocast.
torch::Tensor concat_last_as(const torch::Tensor& a, const torch::Tensor& b, torch::ScalarType dtype);

// The dense gated MLP (dense FFN, shared experts) through the same Function as
// one group of all rows (split over threads by rows on the CPU), weights in
// torch::nn::Linear's [out, in] layout: w1, w3 [H, D], w2 [D, H]. x: [..., D].
// Under autocast it runs in bf16, as Linear would.
torch::Tensor gated_mlp(const torch::Tensor& x_ND, const torch::Tensor& w1_HD, const torch::Tensor& w3_HD,
                        const torch::Tensor& w2_DH, GatedActivation act);

}  // namespace moecpt::model
