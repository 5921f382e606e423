// LibTorch side of moecpt's own CUDA kernels (model/cuda/kernels.h): checks,
// dtypes, strides and the current stream. The callers keep an ATen path for
// everything these do not cover (CPU, fp16/fp64, builds without the kernels,
// MOECPT_CUDA_KERNELS=0), and the tests compare the two on a GPU.
#pragma once
#include <torch/types.h>

#include "model/expert_ffn.h"

namespace moecpt::model {

// Whether this build has the kernels (CMake option MOECPT_CUDA_KERNELS).
bool cuda_kernels_compiled();
// Whether they run for tensors like `like`: compiled, `like` is a CUDA tensor
// in fp32 or bf16, and the environment does not say MOECPT_CUDA_KERNELS=0
// (read once; any other value than 0 or 1 is an error naming the variable).
bool use_cuda_kernels(const torch::Tensor& like);
// Compiled and not switched off (reads MOECPT_CUDA_KERNELS, so a bad value is
// an error here on any machine).
bool cuda_kernels_enabled();

// a = act(h1) ⊙ h3 with h13 = [h1 | h3] ([S, 2H], rows may be strided);
// a [S, H]. Same dtype and device throughout.
void cuda_gated_forward(const torch::Tensor& h13, int64_t H, GatedActivation act, const torch::Tensor& a);
// dh13 = [act'(h1) · da ⊙ h3 | da ⊙ act(h1)].
void cuda_gated_backward(const torch::Tensor& h13, const torch::Tensor& da, int64_t H, GatedActivation act,
                         const torch::Tensor& dh13);
// out = R x (sign +1) or Rᵀ x (sign −1) for x, out [B, T, H, 2n] (any strides,
// last dim contiguous) and tables c, s [T, n] (or [T, 1, n]) in x's dtype.
void cuda_rotate_pairs(const torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& c,
                       const torch::Tensor& s, int sign);

// The fused head's per-row cross-entropy: loss_rows[r] = lse_r − x[r, t_r] for
// fp32 logits [rows, V] and int64 targets [rows]; when grad (bf16 [rows, V])
// is defined, also the gradient of loss_rows[r] by the logits (exp(x − lse),
// expm1 at the target). Rows contiguous; logits' rows may be strided.
void cuda_cross_entropy_rows(const torch::Tensor& logits, const torch::Tensor& targets, const torch::Tensor& grad,
                             const torch::Tensor& loss_rows);

// The MoE slot gathers (model/moe_slots.h): idx_S int64 [T·K] maps slot
// t·K + j to its row of the expert-sorted rows; w_TK fp32 [T, K] contiguous.
// out_TD[t] = Σ_j w[t, j] · src_SD[idx[t·K + j]] (w undefined: weights 1).
void cuda_gather_sum_rows(const torch::Tensor& src_SD, const torch::Tensor& idx_S, const torch::Tensor& w_TK,
                          int64_t K, const torch::Tensor& out_TD);
// dy_SD[idx[t·K + j]] = w[t, j] · g_TD[t];  dw_TK[t, j] = g_TD[t] · y_SD[idx[t·K + j]] (fp32).
void cuda_combine_backward(const torch::Tensor& g_TD, const torch::Tensor& y_SD, const torch::Tensor& idx_S,
                           const torch::Tensor& w_TK, const torch::Tensor& dy_SD, const torch::Tensor& dw_TK);

// RMSNorm of rows (model/rms_norm.h): x_ND fp32/bf16 CUDA [rows, D] with
// contiguous rows, w fp32 [D] (D ≤ cuda_rms_norm_max_width()); writes y_ND
// (x's shape, in a dtype that pairs with x's, below) and rstd_N fp32 [rows]
// (1 / sqrt(mean x² + eps)). With a_ND and h_ND defined, the residual add in
// front: h_ND = x_ND + a_ND (a's dtype pairs with x's; h in x's dtype and
// shape), and y is the RMSNorm of h.
int64_t cuda_rms_norm_max_width();
// Whether dtype t pairs with x's dtype in the RMSNorm kernels (y, dy, the
// residual addend a): x's own, or bf16 beside an fp32 x.
bool rms_norm_dtype_pairs(torch::ScalarType t, torch::ScalarType x);
void cuda_rms_norm_forward(const torch::Tensor& x_ND, const torch::Tensor& w_D, double eps, const torch::Tensor& y_ND,
                           const torch::Tensor& rstd_N, const torch::Tensor& a_ND = {},
                           const torch::Tensor& h_ND = {});
// Its backward from dy_ND (y's dtype): writes dx_ND (x's dtype), returns dw
// fp32 [D]. With dres_ND (x's dtype and shape) defined, dx_ND = that backward
// + dres_ND (the residual stream's gradient of the fused add: x here is h).
torch::Tensor cuda_rms_norm_backward(const torch::Tensor& x_ND, const torch::Tensor& w_D, const torch::Tensor& rstd_N,
                                     const torch::Tensor& dy_ND, const torch::Tensor& dx_ND,
                                     const torch::Tensor& dres_ND = {});

// The MoE slot order (model/moe_slots.h) as moecpt's stable counting sort:
// ids_S int64 CUDA [S] (contiguous) with values in [0, E), 1 ≤ E ≤
// cuda_slot_sort_max_experts(), K slots per token. The same order as a stable
// sort of ids_S, its inverse, order / K and the count per expert, all int64.
struct CudaSlotOrder {
  torch::Tensor order_S, inverse_S, token_S, counts_E;
};
int64_t cuda_slot_sort_max_experts();
CudaSlotOrder cuda_slot_sort(const torch::Tensor& ids_S, int64_t E, int64_t K);
// Its counts per expert alone (two launches, no atomics): int64 [E].
torch::Tensor cuda_expert_counts(const torch::Tensor& ids_S, int64_t E);

// Sinkhorn balancing of C [T, E] (fp32 CUDA, contiguous, 1 ≤ E ≤ 64) in one
// kernel with its stopping test on the device (no host read): d0 [T], d1 [E]
// and stats [2] = (iterations, final mean |d1 − d1_prev|), fp32 on the device.
// The maths of model/router_sinkhorn.h with the test every iteration.
struct CudaSinkhornResult {
  torch::Tensor d0_T, d1_E, stats_2;
};
CudaSinkhornResult cuda_sinkhorn(const torch::Tensor& C_TE, double tol, int64_t max_iters, double eps);
// Whether the Sinkhorn router uses cuda_sinkhorn: opt-in, MOECPT_SINKHORN_KERNEL=1,
// until it has been measured on a GPU (read once; 0 or 1, else an error).
bool sinkhorn_kernel_requested();
// Whether a Sinkhorn router of n_experts on `device` runs cuda_sinkhorn: requested,
// the kernels built and enabled, a CUDA device, at most 64 experts (its fp32
// scores are the router's own business). The router and `bench train` ask this.
bool use_sinkhorn_kernel(const torch::Device& device, int64_t n_experts);

}  // namespace moecpt::model
