// moecpt's own CUDA kernels (kernels.cu), behind a plain interface: raw
// pointers, sizes and strides in elements, the stream as void*. No LibTorch
// type crosses it, so the .cu file needs only the CUDA toolkit; the LibTorch
// side is model/cuda_kernels.{h,cpp}. Built when MOECPT_CUDA_KERNELS is on
// (CMakeLists.txt; AUTO = when LibTorch has CUDA). Each function returns a
// cudaError_t as int (0 = launched).
#pragma once
#include <cstdint>

namespace moecpt::cuda {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1 };
enum class Act : int { kGelu = 0, kSilu = 1 };  // exact (erf) GeLU, as at::gelu

// a[r, j] = act(h13[r, j]) · h13[r, H + j] for r < rows, j < H (fp32 maths,
// one rounding). Row strides ld_* (elements); columns contiguous.
int gated_forward(DType dt, Act act, const void* h13, int64_t ld_h13, void* a, int64_t ld_a, int64_t rows,
                  int64_t H, void* stream);

// dh13[r, j] = act'(h1) · da · h3,  dh13[r, H + j] = da · act(h1).
int gated_backward(DType dt, Act act, const void* h13, int64_t ld_h13, const void* da, int64_t ld_da, void* dh13,
                   int64_t ld_dh13, int64_t rows, int64_t H, void* stream);

// Rotary pairs: x, out are [B, T, Hd, 2n] with strides (sb, st, sh) for the
// first three dims and the last contiguous; c, s are [T, n] contiguous. With
// x = [x1 | x2]:  out1 = x1 c − sign·x2 s,  out2 = x2 c + sign·x1 s.
// sign = +1 rotates (forward), −1 applies the transpose (backward).
int rotate_pairs(DType dt, const void* x, const int64_t x_strides[3], void* out, const int64_t out_strides[3],
                 const void* c, const void* s, int64_t B, int64_t T, int64_t Hd, int64_t n, int sign, void* stream);

// Cross-entropy rows of the fused LM head: for each row r of fp32 logits
// [rows, V] (row stride ld) and its target t = targets[r] (int64):
//   lse = log Σ_j exp(x_j),   loss[r] = lse − x_t
// and, when grad (bf16, row stride ld_grad) is not null, the gradient of
// loss[r] by the logits: g_j = exp(x_j − lse), at the target expm1(x_t − lse)
// (exact in fp32 where p_t ≈ 1). One block per row: one read of the row for
// (max, Σ exp) by an online reduction, a second (mostly from L2) to write g.
// A target outside [0, V) gives loss NaN.
int cross_entropy_rows(const float* logits, int64_t ld, const int64_t* targets, int64_t rows, int64_t V,
                       void* grad_bf16, int64_t ld_grad, float* loss, void* stream);

// The MoE layer's slot gathers (model/moe_slots.h). Slot s = t·K + j is token
// t's j-th choice and lives at row idx[s] of the expert-sorted [S, D] rows
// (S = T·K; idx int64, w fp32 [T, K] contiguous). Rows contiguous in D with
// row strides ld_* (elements); fp32 accumulation, one rounding.
//
// out[t, :] = Σ_j w[t, j] · src[idx[t·K + j], :]   (w null: weights 1)
// The combine's forward (w = the gates) and the dispatch's backward (w null).
int gather_sum_rows(DType dt, const void* src, int64_t ld_src, const int64_t* idx, const float* w, int64_t T,
                    int64_t K, int64_t D, void* out, int64_t ld_out, void* stream);

// The combine's backward from g [T, D] (the gradient of out) and the slot
// outputs y [S, D]: for every slot s = t·K + j with row r = idx[s]
//   dy[r, :] = w[t, j] · g[t, :],   dw[t, j] = Σ_d g[t, d] · y[r, d]  (fp32)
// One warp per slot; every row of dy written once (idx is a permutation).
int combine_backward(DType dt, const void* g, int64_t ld_g, const void* y, int64_t ld_y, const int64_t* idx,
                     const float* w, int64_t T, int64_t K, int64_t D, void* dy, int64_t ld_dy, float* dw,
                     void* stream);

// Sinkhorn balancing of C [T, E] (fp32, E ≤ 64) in one kernel (one block),
// given transposed: Ct [E, T] contiguous (coalesced loads). From d1 = 1, repeat
//   d0 = (1/T) / (C d1 + eps);  d1' = (1/E) / (Cᵀ d0 + eps);  err = mean |d1' − d1|;  d1 = d1'
// until err < tol or max_iters, the stopping test every iteration on the
// device (no host read). Writes d0 [T], d1 [E] and stats [2] = (iterations, err).
int sinkhorn(const float* Ct, int64_t T, int64_t E, float tol, int64_t max_iters, float eps, float* d0, float* d1,
             float* stats, void* stream);

// RMSNorm of rows of x [rows, D] (dtype dt, row stride ld_x) with the fp32
// weight w [D]:  r = 1 / sqrt(mean_j x_j² + eps),  y_j = x_j · r · w_j  (fp32
// maths, one rounding); writes y (row stride ld_y) and r into rstd [rows].
// One warp per row. y is dt_y: dt, or bf16 with an fp32 dt (for a bf16 matmul
// that reads it: the same bits as writing fp32 and casting); bf16 dt with fp32
// y is refused.
// With a != nullptr, the residual add fused in front (a transformer block's
// `h = x + a; y = norm(h)`):
//   h_j = x_j + a_j   (fp32 maths, rounded to dt as ATen's add; written to h, row stride ld_h)
// and h is the row normalised. a is dt, or bf16 when dt is fp32 (an fp32 stream
// plus a bf16 sublayer output under autocast); fp32 a with bf16 dt is refused
// (ATen's add would promote to fp32). a == nullptr: h unused.
int rms_norm_forward(DType dt, const void* x, int64_t ld_x, DType dt_a, const void* a, int64_t ld_a, const float* w,
                     int64_t rows, int64_t D, float eps, void* h, int64_t ld_h, DType dt_y, void* y, int64_t ld_y,
                     float* rstd, void* stream);

// Its backward from dy (dt_dy: dt, or bf16 with an fp32 dt; row stride ld_dy),
// the normalised rows x (h with the add) and the forward's rstd:
//   dx_k = r · w_k · dy_k − (r³ · x_k / D) · Σ_j dy_j · w_j · x_j  [+ dres_k]   (dt, row stride ld_dx)
// where dres (dt, row stride ld_dres; nullptr: none) is the gradient reaching h
// through the residual stream, added before dx's one rounding: dx is then the
// gradient of both x and a. And the weight's gradient Σ_rows dy_j · x_j · r in
// `partials` partial sums: dw_partial [partials, D] fp32, to be summed over its
// first dim. Each warp takes a contiguous run of rows and keeps its columns'
// sums in registers: D ≤ kRmsNormMaxD. partials = rms_norm_backward_partials(rows).
constexpr int64_t kRmsNormMaxD = 2048;
int64_t rms_norm_backward_partials(int64_t rows);
int rms_norm_backward(DType dt, const void* x, int64_t ld_x, const float* w, const float* rstd, DType dt_dy,
                      const void* dy, int64_t ld_dy, const void* dres, int64_t ld_dres, int64_t rows, int64_t D,
                      void* dx, int64_t ld_dx, float* dw_partial, void* stream);

// The MoE layer's slot order (model/moe_slots.h) as a stable counting sort.
// Slots s < S carry expert ids ids[s] in [0, E) (int64; 1 ≤ E ≤ kSlotSortMaxE,
// S < 2^31), K slots per token. Writes, all int64:
//   order [S]    the slots sorted by expert, equal experts in slot order (as a
//                stable sort of ids);
//   inverse [S]  order[inverse[s]] = s;
//   token [S]    order / K, the token of each sorted slot;
//   counts [E]   slots per expert (null: not written).
// scratch: int32 [slot_sort_chunks(S), E]. Three launches (per-chunk counts,
// their prefix sums, the positions), no host sync.
constexpr int64_t kSlotSortMaxE = 256;
int64_t slot_sort_chunks(int64_t S);
int slot_sort(const int64_t* ids, int64_t S, int64_t E, int64_t K, int* scratch, int64_t* order, int64_t* inverse,
              int64_t* token, int64_t* counts, void* stream);
// The counts per expert alone (slot_sort's first two launches): counts [E]
// int64; the same ids, limits and scratch.
int expert_counts(const int64_t* ids, int64_t S, int64_t E, int* scratch, int64_t* counts, void* stream);

}  // namespace moecpt::cuda
