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
#include "core/pch.h"

namespace moecpt::model {

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps);

// MOECPT_RMSNORM_KERNEL: 0 (default) or 1, read once; any other value is an error naming it.
bool rms_norm_kernel_requested();
// Requested, moecpt's CUDA kernels usable for x (model/cuda_kernels.h), w fp32
// [D] on x's device and D within the kernel's width.
bool use_rms_norm_kernel(const torch::Tensor& x, const torch::Tensor& w);
// The kernel path itself, whatever the switch says (the GPU tests compare it
// with ATen's); a clear error where it cannot run.
torch::Tensor rms_norm_kernel(const torch::Tensor& x, const torch::Tensor& w, double eps);

}  // namespace moecpt::model
