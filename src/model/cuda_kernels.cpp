#include "model/cuda_kernels.h"

#include <string>

#include "core/env.h"
#include "core/error.h"

#ifdef MOECPT_CUDA_KERNELS
#include <c10/cuda/CUDAStream.h>

#include "model/cuda/kernels.h"
#endif

namespace moecpt::model {

bool cuda_kernels_compiled() {
#ifdef MOECPT_CUDA_KERNELS
  return true;
#else
  return false;
#endif
}

namespace {

bool enabled_by_env() {
  static const bool on = env_switch("MOECPT_CUDA_KERNELS", true);
  return on;
}

#ifdef MOECPT_CUDA_KERNELS
cuda::DType dtype_of(const torch::Tensor& t) {
  if (t.scalar_type() == torch::kBFloat16) return cuda::DType::kBFloat16;
  if (t.scalar_type() == torch::kFloat32) return cuda::DType::kFloat32;
  throw Error("moecpt CUDA kernels: dtype " + std::string(c10::toString(t.scalar_type())) + " is not fp32 or bf16");
}

void check_launch(int rc, const char* what) {
  if (rc != 0) throw Error(std::string("moecpt CUDA kernel ") + what + ": launch failed (cudaError " +
                           std::to_string(rc) + ")");
}

void* current_stream(const torch::Tensor& t) {
  return static_cast<void*>(c10::cuda::getCurrentCUDAStream(t.device().index()).stream());
}
#endif

void check_same(const torch::Tensor& a, const torch::Tensor& b, const char* what) {
  if (!a.is_cuda() || a.device() != b.device() || a.scalar_type() != b.scalar_type())
    throw Error(std::string(what) + ": tensors must be CUDA tensors on one device with one dtype");
}

void check_rows(const torch::Tensor& t, int64_t rows, int64_t cols, const char* what) {
  if (t.dim() != 2 || t.size(0) != rows || t.size(1) != cols || t.stride(1) != 1)
    throw Error(std::string(what) + ": expected [" + std::to_string(rows) + ", " + std::to_string(cols) +
                "] with contiguous rows");
}

[[noreturn]] void not_built() {
  throw Error("moecpt was built without its CUDA kernels (configure with -DMOECPT_CUDA_KERNELS=ON)");
}

}  // namespace

bool cuda_kernels_enabled() {
  const bool env = enabled_by_env();
  return env && cuda_kernels_compiled();
}

bool use_cuda_kernels(const torch::Tensor& like) {
  return cuda_kernels_compiled() && like.is_cuda() &&
         (like.scalar_type() == torch::kBFloat16 || like.scalar_type() == torch::kFloat32) && enabled_by_env();
}

void cuda_gated_forward(const torch::Tensor& h13, int64_t H, GatedActivation act, const torch::Tensor& a) {
  check_same(h13, a, "cuda_gated_forward");
  const int64_t S = h13.size(0);
  check_rows(h13, S, 2 * H, "cuda_gated_forward (h13)");
  check_rows(a, S, H, "cuda_gated_forward (a)");
#ifdef MOECPT_CUDA_KERNELS
  check_launch(cuda::gated_forward(dtype_of(h13), act == GatedActivation::kGelu ? cuda::Act::kGelu : cuda::Act::kSilu,
                                   h13.data_ptr(), h13.stride(0), a.data_ptr(), a.stride(0), S, H,
                                   current_stream(h13)),
               "gated_forward");
#else
  not_built();
#endif
}

void cuda_gated_backward(const torch::Tensor& h13, const torch::Tensor& da, int64_t H, GatedActivation act,
                         const torch::Tensor& dh13) {
  check_same(h13, da, "cuda_gated_backward");
  check_same(h13, dh13, "cuda_gated_backward");
  const int64_t S = h13.size(0);
  check_rows(h13, S, 2 * H, "cuda_gated_backward (h13)");
  check_rows(da, S, H, "cuda_gated_backward (da)");
  check_rows(dh13, S, 2 * H, "cuda_gated_backward (dh13)");
#ifdef MOECPT_CUDA_KERNELS
  check_launch(cuda::gated_backward(dtype_of(h13), act == GatedActivation::kGelu ? cuda::Act::kGelu : cuda::Act::kSilu,
                                    h13.data_ptr(), h13.stride(0), da.data_ptr(), da.stride(0), dh13.data_ptr(),
                                    dh13.stride(0), S, H, current_stream(h13)),
               "gated_backward");
#else
  not_built();
#endif
}

void cuda_rotate_pairs(const torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& c,
                       const torch::Tensor& s, int sign) {
  check_same(x, out, "cuda_rotate_pairs");
  check_same(x, c, "cuda_rotate_pairs");
  check_same(x, s, "cuda_rotate_pairs");
  if (x.dim() != 4 || out.sizes() != x.sizes() || x.size(3) % 2 != 0 || x.stride(3) != 1 || out.stride(3) != 1)
    throw Error("cuda_rotate_pairs: x and out must be [B, T, H, 2n] of one shape, last dim contiguous");
  const int64_t B = x.size(0), T = x.size(1), Hd = x.size(2), n = x.size(3) / 2;
  if (c.numel() != T * n || s.numel() != T * n || !c.is_contiguous() || !s.is_contiguous())
    throw Error("cuda_rotate_pairs: rotary tables must be contiguous [T, n] = [" + std::to_string(T) + ", " +
                std::to_string(n) + "]");
#ifdef MOECPT_CUDA_KERNELS
  const int64_t xs[3] = {x.stride(0), x.stride(1), x.stride(2)};
  const int64_t os[3] = {out.stride(0), out.stride(1), out.stride(2)};
  check_launch(cuda::rotate_pairs(dtype_of(x), x.data_ptr(), xs, out.data_ptr(), os, c.data_ptr(), s.data_ptr(), B, T,
                                  Hd, n, sign, current_stream(x)),
               "rotate_pairs");
#else
  (void)B, (void)Hd, (void)sign;
  not_built();
#endif
}

void cuda_cross_entropy_rows(const torch::Tensor& logits, const torch::Tensor& targets, const torch::Tensor& grad,
                             const torch::Tensor& loss_rows) {
  if (!logits.is_cuda() || logits.scalar_type() != torch::kFloat32 || logits.dim() != 2 || logits.stride(1) != 1)
    throw Error("cuda_cross_entropy_rows: logits must be fp32 CUDA [rows, V] with contiguous rows");
  const int64_t rows = logits.size(0), V = logits.size(1);
  if (targets.device() != logits.device() || targets.scalar_type() != torch::kInt64 || targets.numel() != rows ||
      !targets.is_contiguous())
    throw Error("cuda_cross_entropy_rows: targets must be contiguous int64 [" + std::to_string(rows) +
                "] on the logits' device");
  if (loss_rows.device() != logits.device() || loss_rows.scalar_type() != torch::kFloat32 ||
      loss_rows.numel() != rows || !loss_rows.is_contiguous())
    throw Error("cuda_cross_entropy_rows: loss_rows must be contiguous fp32 [" + std::to_string(rows) + "]");
  if (grad.defined()) {
    if (grad.device() != logits.device() || grad.scalar_type() != torch::kBFloat16)
      throw Error("cuda_cross_entropy_rows: the gradient must be bf16 on the logits' device");
    check_rows(grad, rows, V, "cuda_cross_entropy_rows (grad)");
  }
#ifdef MOECPT_CUDA_KERNELS
  check_launch(cuda::cross_entropy_rows(logits.data_ptr<float>(), logits.stride(0), targets.data_ptr<int64_t>(), rows,
                                        V, grad.defined() ? grad.data_ptr() : nullptr,
                                        grad.defined() ? grad.stride(0) : 0, loss_rows.data_ptr<float>(),
                                        current_stream(logits)),
               "cross_entropy_rows");
#else
  not_built();
#endif
}

namespace {

// idx_S int64 [T·K] and (when defined) w_TK fp32 [T, K], contiguous, on `like`'s device.
void check_slots(const torch::Tensor& like, const torch::Tensor& idx_S, const torch::Tensor& w_TK, int64_t T,
                 int64_t K, const char* what) {
  if (K < 1 || idx_S.device() != like.device() || idx_S.scalar_type() != torch::kInt64 || idx_S.dim() != 1 ||
      idx_S.size(0) != T * K || !idx_S.is_contiguous())
    throw Error(std::string(what) + ": the slot index must be contiguous int64 [T·K = " + std::to_string(T * K) +
                "] on the rows' device");
  if (w_TK.defined() && (w_TK.device() != like.device() || w_TK.scalar_type() != torch::kFloat32 ||
                         w_TK.dim() != 2 || w_TK.size(0) != T || w_TK.size(1) != K || !w_TK.is_contiguous()))
    throw Error(std::string(what) + ": the weights must be contiguous fp32 [" + std::to_string(T) + ", " +
                std::to_string(K) + "] on the rows' device");
}

}  // namespace

void cuda_gather_sum_rows(const torch::Tensor& src_SD, const torch::Tensor& idx_S, const torch::Tensor& w_TK,
                          int64_t K, const torch::Tensor& out_TD) {
  check_same(src_SD, out_TD, "cuda_gather_sum_rows");
  const int64_t T = out_TD.size(0), D = out_TD.size(1);
  check_rows(src_SD, T * K, D, "cuda_gather_sum_rows (src)");
  check_rows(out_TD, T, D, "cuda_gather_sum_rows (out)");
  check_slots(src_SD, idx_S, w_TK, T, K, "cuda_gather_sum_rows");
#ifdef MOECPT_CUDA_KERNELS
  check_launch(cuda::gather_sum_rows(dtype_of(src_SD), src_SD.data_ptr(), src_SD.stride(0), idx_S.data_ptr<int64_t>(),
                                     w_TK.defined() ? w_TK.data_ptr<float>() : nullptr, T, K, D, out_TD.data_ptr(),
                                     out_TD.stride(0), current_stream(src_SD)),
               "gather_sum_rows");
#else
  not_built();
#endif
}

void cuda_combine_backward(const torch::Tensor& g_TD, const torch::Tensor& y_SD, const torch::Tensor& idx_S,
                           const torch::Tensor& w_TK, const torch::Tensor& dy_SD, const torch::Tensor& dw_TK) {
  check_same(g_TD, y_SD, "cuda_combine_backward");
  check_same(g_TD, dy_SD, "cuda_combine_backward");
  const int64_t T = g_TD.size(0), D = g_TD.size(1), K = T > 0 ? y_SD.size(0) / T : 1;
  check_rows(g_TD, T, D, "cuda_combine_backward (g)");
  check_rows(y_SD, T * K, D, "cuda_combine_backward (y)");
  check_rows(dy_SD, T * K, D, "cuda_combine_backward (dy)");
  if (!w_TK.defined()) throw Error("cuda_combine_backward: the gates are required");
  check_slots(g_TD, idx_S, w_TK, T, K, "cuda_combine_backward");
  check_slots(g_TD, idx_S, dw_TK, T, K, "cuda_combine_backward (dw)");
#ifdef MOECPT_CUDA_KERNELS
  check_launch(cuda::combine_backward(dtype_of(g_TD), g_TD.data_ptr(), g_TD.stride(0), y_SD.data_ptr(),
                                      y_SD.stride(0), idx_S.data_ptr<int64_t>(), w_TK.data_ptr<float>(), T, K, D,
                                      dy_SD.data_ptr(), dy_SD.stride(0), dw_TK.data_ptr<float>(),
                                      current_stream(g_TD)),
               "combine_backward");
#else
  not_built();
#endif
}

int64_t cuda_rms_norm_max_width() {
#ifdef MOECPT_CUDA_KERNELS
  return cuda::kRmsNormMaxD;
#else
  return 0;
#endif
}

namespace {

void check_rms_norm_args(const torch::Tensor& x_ND, const torch::Tensor& w_D, const torch::Tensor& rstd_N,
                         const char* what) {
  if (!x_ND.is_cuda() || x_ND.dim() != 2) throw Error(std::string(what) + ": x must be a CUDA [rows, D] tensor");
  const int64_t N = x_ND.size(0), D = x_ND.size(1);
  check_rows(x_ND, N, D, what);
  if (D > cuda_rms_norm_max_width())
    throw Error(std::string(what) + ": rows of " + std::to_string(D) + " are wider than the kernel's " +
                std::to_string(cuda_rms_norm_max_width()));
  if (w_D.device() != x_ND.device() || w_D.scalar_type() != torch::kFloat32 || w_D.numel() != D ||
      !w_D.is_contiguous())
    throw Error(std::string(what) + ": the weight must be contiguous fp32 [" + std::to_string(D) +
                "] on x's device");
  if (rstd_N.device() != x_ND.device() || rstd_N.scalar_type() != torch::kFloat32 || rstd_N.numel() != N ||
      !rstd_N.is_contiguous())
    throw Error(std::string(what) + ": rstd must be contiguous fp32 [" + std::to_string(N) + "] on x's device");
}

// t on x's device, in a dtype that pairs with x's (y, dy, a).
void check_norm_io(const torch::Tensor& x, const torch::Tensor& t, const char* what) {
  if (!t.is_cuda() || t.device() != x.device() || !rms_norm_dtype_pairs(t.scalar_type(), x.scalar_type()))
    throw Error(std::string(what) + ": must be on x's device in x's dtype, or bf16 with an fp32 x");
}

}  // namespace

bool rms_norm_dtype_pairs(torch::ScalarType t, torch::ScalarType x) {
  return t == x || (t == torch::kBFloat16 && x == torch::kFloat32);
}

void cuda_rms_norm_forward(const torch::Tensor& x_ND, const torch::Tensor& w_D, double eps, const torch::Tensor& y_ND,
                           const torch::Tensor& rstd_N, const torch::Tensor& a_ND, const torch::Tensor& h_ND) {
  const char* what = "cuda_rms_norm_forward";
  check_rms_norm_args(x_ND, w_D, rstd_N, what);
  const int64_t N = x_ND.size(0), D = x_ND.size(1);
  check_norm_io(x_ND, y_ND, "cuda_rms_norm_forward (y)");
  check_rows(y_ND, N, D, "cuda_rms_norm_forward (y)");
  const bool add = a_ND.defined();
  if (add != h_ND.defined()) throw Error(std::string(what) + ": the addend a and the sum h come together");
  if (add) {
    check_norm_io(x_ND, a_ND, "cuda_rms_norm_forward (a)");
    check_rows(a_ND, N, D, "cuda_rms_norm_forward (a)");
    check_same(x_ND, h_ND, what);
    check_rows(h_ND, N, D, "cuda_rms_norm_forward (h)");
  }
#ifdef MOECPT_CUDA_KERNELS
  const auto dt = dtype_of(x_ND);
  check_launch(cuda::rms_norm_forward(dt, x_ND.data_ptr(), x_ND.stride(0), add ? dtype_of(a_ND) : dt,
                                      add ? a_ND.data_ptr() : nullptr, add ? a_ND.stride(0) : 0,
                                      w_D.data_ptr<float>(), N, D, float(eps), add ? h_ND.data_ptr() : nullptr,
                                      add ? h_ND.stride(0) : 0, dtype_of(y_ND), y_ND.data_ptr(), y_ND.stride(0),
                                      rstd_N.data_ptr<float>(), current_stream(x_ND)),
               "rms_norm_forward");
#else
  (void)eps;
  not_built();
#endif
}

torch::Tensor cuda_rms_norm_backward(const torch::Tensor& x_ND, const torch::Tensor& w_D, const torch::Tensor& rstd_N,
                                     const torch::Tensor& dy_ND, const torch::Tensor& dx_ND,
                                     const torch::Tensor& dres_ND) {
  check_rms_norm_args(x_ND, w_D, rstd_N, "cuda_rms_norm_backward");
  check_norm_io(x_ND, dy_ND, "cuda_rms_norm_backward (dy)");
  check_same(x_ND, dx_ND, "cuda_rms_norm_backward");
  const int64_t N = x_ND.size(0), D = x_ND.size(1);
  check_rows(dy_ND, N, D, "cuda_rms_norm_backward (dy)");
  check_rows(dx_ND, N, D, "cuda_rms_norm_backward (dx)");
  const bool add = dres_ND.defined();
  if (add) {
    check_same(x_ND, dres_ND, "cuda_rms_norm_backward (dres)");
    check_rows(dres_ND, N, D, "cuda_rms_norm_backward (dres)");
  }
#ifdef MOECPT_CUDA_KERNELS
  auto partial = torch::empty({cuda::rms_norm_backward_partials(N), D}, w_D.options());
  check_launch(cuda::rms_norm_backward(dtype_of(x_ND), x_ND.data_ptr(), x_ND.stride(0), w_D.data_ptr<float>(),
                                           rstd_N.data_ptr<float>(), dtype_of(dy_ND), dy_ND.data_ptr(), dy_ND.stride(0),
                                           add ? dres_ND.data_ptr() : nullptr, add ? dres_ND.stride(0) : 0, N, D,
                                           dx_ND.data_ptr(), dx_ND.stride(0), partial.data_ptr<float>(),
                                           current_stream(x_ND)),
               "rms_norm_backward");
  return partial.sum(0);
#else
  (void)N, (void)D, (void)add;
  not_built();
#endif
}

int64_t cuda_slot_sort_max_experts() {
#ifdef MOECPT_CUDA_KERNELS
  return cuda::kSlotSortMaxE;
#else
  return 0;
#endif
}

namespace {

void check_slot_ids(const torch::Tensor& ids_S, int64_t E, int64_t K, const char* what) {
  if (!ids_S.is_cuda() || ids_S.scalar_type() != torch::kInt64 || ids_S.dim() != 1 || !ids_S.is_contiguous())
    throw Error(std::string(what) + ": the expert ids must be a contiguous int64 CUDA [S] tensor");
  if (E < 1 || E > cuda_slot_sort_max_experts() || K < 1)
    throw Error(std::string(what) + ": needs 1 <= E <= " + std::to_string(cuda_slot_sort_max_experts()) +
                " experts and K >= 1, got E = " + std::to_string(E) + ", K = " + std::to_string(K));
  if (ids_S.size(0) >= (int64_t(1) << 31)) throw Error(std::string(what) + ": more than 2^31 - 1 slots");
}

}  // namespace

torch::Tensor cuda_expert_counts(const torch::Tensor& ids_S, int64_t E) {
  check_slot_ids(ids_S, E, 1, "cuda_expert_counts");
  auto counts = torch::empty({E}, ids_S.options());
#ifdef MOECPT_CUDA_KERNELS
  const int64_t S = ids_S.size(0);
  auto scratch = torch::empty({cuda::slot_sort_chunks(S), E}, ids_S.options().dtype(torch::kInt32));
  check_launch(cuda::expert_counts(ids_S.data_ptr<int64_t>(), S, E, scratch.data_ptr<int>(),
                                   counts.data_ptr<int64_t>(), current_stream(ids_S)),
               "expert_counts");
#else
  not_built();
#endif
  return counts;
}

CudaSlotOrder cuda_slot_sort(const torch::Tensor& ids_S, int64_t E, int64_t K) {
  check_slot_ids(ids_S, E, K, "cuda_slot_sort");
  const int64_t S = ids_S.size(0);
  CudaSlotOrder r{torch::empty({S}, ids_S.options()), torch::empty({S}, ids_S.options()),
                  torch::empty({S}, ids_S.options()), torch::empty({E}, ids_S.options())};
#ifdef MOECPT_CUDA_KERNELS
  auto scratch = torch::empty({cuda::slot_sort_chunks(S), E}, ids_S.options().dtype(torch::kInt32));
  check_launch(cuda::slot_sort(ids_S.data_ptr<int64_t>(), S, E, K, scratch.data_ptr<int>(),
                               r.order_S.data_ptr<int64_t>(), r.inverse_S.data_ptr<int64_t>(),
                               r.token_S.data_ptr<int64_t>(), r.counts_E.data_ptr<int64_t>(), current_stream(ids_S)),
               "slot_sort");
#else
  not_built();
#endif
  return r;
}

CudaSinkhornResult cuda_sinkhorn(const torch::Tensor& C_TE, double tol, int64_t max_iters, double eps) {
  if (!C_TE.is_cuda() || C_TE.scalar_type() != torch::kFloat32 || C_TE.dim() != 2 || !C_TE.is_contiguous() ||
      C_TE.size(1) < 1 || C_TE.size(1) > 64)
    throw Error("cuda_sinkhorn: C must be a contiguous fp32 CUDA [T, E] with 1 <= E <= 64");
  const int64_t T = C_TE.size(0), E = C_TE.size(1);
  CudaSinkhornResult r{torch::empty({T}, C_TE.options()), torch::empty({E}, C_TE.options()),
                       torch::empty({2}, C_TE.options())};
#ifdef MOECPT_CUDA_KERNELS
  // the kernel reads C transposed ([E, T]: coalesced); one transpose pass of T·E floats
  const auto Ct = C_TE.t().contiguous();
  check_launch(cuda::sinkhorn(Ct.data_ptr<float>(), T, E, float(tol), max_iters, float(eps),
                              r.d0_T.data_ptr<float>(), r.d1_E.data_ptr<float>(), r.stats_2.data_ptr<float>(),
                              current_stream(C_TE)),
               "sinkhorn");
#else
  (void)tol, (void)max_iters, (void)eps;
  not_built();
#endif
  return r;
}

bool sinkhorn_kernel_requested() {
  static const bool on = env_switch("MOECPT_SINKHORN_KERNEL", false);
  return on;
}

bool use_sinkhorn_kernel(const torch::Device& device, int64_t n_experts) {
  return device.is_cuda() && n_experts >= 1 && n_experts <= 64 && cuda_kernels_enabled() && sinkhorn_kernel_requested();
}

}  // namespace moecpt::model
