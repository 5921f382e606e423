// RMSNorm for the model's norms (model/norm.h): y = x / sqrt(mean(x²) + eps) · w.
// ATen's (compat::rms_norm: a fused kernel on CUDA with LibTorch ≥ 2.4), or,
// on CUDA with MOECPT_RMSNORM_KERNEL=1, moecpt's kernels as one autograd
// Function: the forward writes y and the rows' 1/rms, the backward dx and the
// weight's gradient from the saved x and 1/rms (model/cuda/kernels.h; checked
// against fp64 under the CPU emulation, tests/cuda_emu). Opt-in until a GPU
// has timed it: session 8's H100 profile put ATen's backward at 7.3 ms for 49
// calls on [16384, 1024] fp32, ~2.5× its bytes at the HBM bandwidth.
// The kernel multiplies by the fp32 weight also for a bf16 stream (ATen's path
// rounds the weight to bf16 first).
#pragma once
#include <optional>

#include "core/pch.h"

namespace moecpt::model {

// y_dtype: the dtype the kernel path writes y in (nullopt: x's). bf16 with an
// fp32 x for a norm whose one reader is a bf16 matmul (the attention's under
// autocast): the same bits as writing fp32 and casting, without the cast pass
// either way (its gradient comes back bf16 and the backward reads it as is).
// ATen's path ignores it, as does the kernel path for other dtype pairs.
using NormOutDtype = std::optional<torch::ScalarType>;
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps, NormOutDtype y_dtype = {});

// MOECPT_RMSNORM_KERNEL: 0 (default) or 1, read once; any other value is an error naming it.
bool rms_norm_kernel_requested();
// Requested, moecpt's CUDA kernels usable for x (model/cuda_kernels.h), w fp32
// [D] on x's device and D within the kernel's width.
bool use_rms_norm_kernel(const torch::Tensor& x, const torch::Tensor& w);
// The kernel path itself, whatever the switch says (the GPU tests compare it
// with ATen's); a clear error where it cannot run.
torch::Tensor rms_norm_kernel(const torch::Tensor& x, const torch::Tensor& w, double eps, NormOutDtype y_dtype = {});

// A pre-norm block's residual add and the next norm, `h = x + a; y = norm(h)`,
// returned as {h, y}. ATen's add and rms_norm above, or, on CUDA with
// MOECPT_ADD_RMSNORM_KERNEL=1 (independent of MOECPT_RMSNORM_KERNEL), one
// autograd Function on moecpt's kernels: the forward reads x and a once and
// writes h, y and 1/rms; the backward writes one gradient, the norm's plus
// h's own (the residual stream's), for both x and a, so neither the forward's
// add nor autograd's accumulation of h's two gradients is a separate pass.
// a: x's shape, in x's dtype or bf16 with an fp32 x (a sublayer's output
// under autocast); other pairs take the ATen path.
std::pair<torch::Tensor, torch::Tensor> add_rms_norm(const torch::Tensor& x, const torch::Tensor& a,
                                                     const torch::Tensor& w, double eps, NormOutDtype y_dtype = {});
// MOECPT_ADD_RMSNORM_KERNEL: 0 (default) or 1, read once; else an error naming it.
bool add_rms_norm_kernel_requested();
bool use_add_rms_norm_kernel(const torch::Tensor& x, const torch::Tensor& a, const torch::Tensor& w);
// The kernel path whatever the switch says; a clear error where it cannot run.
std::pair<torch::Tensor, torch::Tensor> add_rms_norm_kernel(const torch::Tensor& x, const torch::Tensor& a,
                                                            const torch::Tensor& w, double eps,
                                                            NormOutDtype y_dtype = {});

}  // namespace moecpt::model
