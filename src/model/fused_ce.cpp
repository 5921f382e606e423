#include "model/fused_ce.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>

#include "core/error.h"
#include "core/log.h"
#include "model/cpu_parallel.h"
#include "model/cuda_kernels.h"
#include "model/torch_compat.h"
#include "model/weight_casts.h"

namespace moecpt::model {

namespace {

// An operator overload looked up in the dispatcher at run time, typed as Sig:
// absent (older LibTorch), of another signature, or switched off by
// MOECPT_HEAD_FP32_MM=0 (A/B runs) → nullopt, and the caller keeps its fallback.
template <typename Sig>
c10::optional<c10::TypedOperatorHandle<Sig>> find_typed_op(const char* name, const char* overload) {
  const char* v = std::getenv("MOECPT_HEAD_FP32_MM");
  if (v && std::string(v) == "0") return c10::nullopt;
  auto h = c10::Dispatcher::singleton().findSchema({name, overload});
  if (!h) return c10::nullopt;
  try {
    return h->typed<Sig>();
  } catch (const c10::Error&) {  // a different signature than expected
    return c10::nullopt;
  }
}

// aten::mm.dtype_out: bf16 × bf16 → fp32 straight from cuBLAS's fp32
// accumulator (CUDA only; recent LibTorch). Compiles against every LibTorch.
using MmDtypeOut = at::Tensor&(const at::Tensor&, const at::Tensor&, c10::ScalarType, at::Tensor&);
const auto& mm_dtype_out_op() {
  static const auto op = find_typed_op<MmDtypeOut>("aten::mm", "dtype_out");
  return op;
}

// aten::addmm.dtype_out likewise: each chunk's bf16 gᵀ x_c accumulated by cuBLAS
// straight into the fp32 dL/dW (beta = 1), instead of a bf16 [V, D] product
// (rounded to bf16) and an add_ pass over the fp32 accumulator (4 ms of the
// H100 dense step). Same switch and fallback as mm.dtype_out.
using AddmmDtypeOut = at::Tensor&(const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::ScalarType,
                                  const c10::Scalar&, const c10::Scalar&, at::Tensor&);
const auto& addmm_dtype_out_op() {
  static const auto op = find_typed_op<AddmmDtypeOut>("aten::addmm", "dtype_out");
  return op;
}
std::atomic<bool> g_addmm_dtype_out_failed{false};

std::atomic<bool> g_fp32_logits_last{false}, g_fp32_dw_last{false}, g_ce_kernel_last{false};
// Set when mm.dtype_out threw at its first use (e.g. a LibTorch whose kernel
// refuses these operands): the process then keeps the bf16 logits + cast.
std::atomic<bool> g_mm_dtype_out_failed{false};

class FusedLinearCrossEntropy : public torch::autograd::Function<FusedLinearCrossEntropy> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x_ND,
                               const torch::Tensor& w_VD, const torch::Tensor& targets_N,
                               int64_t chunk_rows, bool low_precision) {
    const int64_t N = x_ND.size(0), V = w_VD.size(0);
    // Explicit dtypes below; autocast must not re-cast inside the loop.
    compat::NoAutocast no_autocast;
    const auto acc = torch::promote_types(x_ND.scalar_type(), w_VD.scalar_type());  // fp32 or fp64
    const auto mm_dtype = low_precision ? torch::kBFloat16 : acc;
    const auto x = x_ND.to(mm_dtype), w = cached_to(w_VD, mm_dtype);  // model/weight_casts.h
    const bool need_grad = ctx != nullptr && (x_ND.requires_grad() || w_VD.requires_grad());

    const int64_t n_chunks = (N + chunk_rows - 1) / chunk_rows;
    // Chunks run in parallel on ATen's intra-op threads, each with its own
    // single-threaded matmuls (the CPU policy of model/torch_compat.h: one
    // BLAS thread), loss and dL/dW accumulator, summed at the end: on 2 vCPUs
    // thin [rows, D] × [D, V] matmuls scale better this way than inside BLAS.
    // On a GPU, or inside another parallel region, one thread runs them all.
    const int64_t n_threads = cpu_workers(x, n_chunks);
    torch::Tensor grad_x;
    std::vector<torch::Tensor> grad_w(static_cast<size_t>(n_threads)), loss_sum(static_cast<size_t>(n_threads));
    if (need_grad) grad_x = torch::empty({N, x_ND.size(1)}, x_ND.options().dtype(acc));
    for (int64_t t = 0; t < n_threads; ++t) {
      loss_sum[t] = torch::zeros({}, x_ND.options().dtype(acc));
      if (need_grad) grad_w[t] = torch::zeros({V, w_VD.size(1)}, w_VD.options().dtype(acc));
    }
    // One logits buffer and one log-probability buffer per thread, reused by its
    // chunks: a fresh [rows, V] tensor per chunk is a large allocation, and
    // its page faults serialise the threads in the kernel (measured: two
    // threads no faster than one).
    const int64_t buf_rows = std::min(chunk_rows, N);
    // On a GPU in bf16, cuBLAS writes the logits in fp32 where LibTorch has
    // mm.dtype_out: no bf16 logits and no cast pass (1.5 bytes per logit less
    // traffic, and logits not rounded to bf16). The bf16 buffer then holds
    // the gradient only.
    const bool fp32_logits = low_precision && x.is_cuda() && acc == torch::kFloat32 &&
                             mm_dtype_out_op().has_value() && !g_mm_dtype_out_failed;
    // On a GPU in bf16 with moecpt's kernels (model/cuda_kernels.h), one kernel
    // per chunk takes the fp32 logits to the per-row losses and the bf16
    // gradient: one read of the logits for (max, Σ exp), one more (mostly from
    // L2) to write g; no fp32 log-probabilities (1 GiB per chunk) written and
    // read back. Else ATen's log-softmax and exp passes below.
    const bool ce_kernel = low_precision && acc == torch::kFloat32 && use_cuda_kernels(x);
    std::vector<torch::Tensor> logits_buf(static_cast<size_t>(n_threads)), probs_buf(static_cast<size_t>(n_threads)),
        logits32_buf(fp32_logits ? static_cast<size_t>(n_threads) : 0), loss_rows_buf(static_cast<size_t>(n_threads));
    for (int64_t t = 0; t < n_threads; ++t) {
      logits_buf[t] = torch::empty({buf_rows, V}, x.options());
      if (ce_kernel)
        loss_rows_buf[t] = torch::empty({buf_rows}, x.options().dtype(torch::kFloat32));
      else
        probs_buf[t] = torch::empty({buf_rows, V}, x.options().dtype(acc));
      if (fp32_logits) logits32_buf[t] = torch::empty({buf_rows, V}, x.options().dtype(acc));
    }
    const double inv_n = 1.0 / double(N);
    // Per chunk, besides the matmuls, one fused log-softmax over its [rows, V]
    // logits (fp32) and one exp pass for the gradient:
    //   l    = log_softmax(logits)       loss += −Σ l[target]
    //   g    = exp(l) − onehot           written in the matmuls' dtype; at the
    //                                    target expm1(l[t]), exact in fp32 even
    //                                    where p_t ≈ 1 (g_t then ≈ −(1 − p_t))
    // and the 1/N of the mean goes into the small products, not the big
    // [rows, V] gradient: dx_c = (g W) / N, dW += gᵀ x_c / N (matmul alpha).
    // (Before: a max pass, the softmax, p − onehot in fp32 and a cast: one
    // more full read of the logits per chunk.)
    auto run_chunk = [&](int64_t chunk, int64_t t) {
      const int64_t start = chunk * chunk_rows, n = std::min(chunk_rows, N - start);
      auto x_c = x.narrow(0, start, n);
      auto t_c = targets_N.narrow(0, start, n).unsqueeze(1);
      auto logits_mm = logits_buf[t].narrow(0, 0, n);
      torch::Tensor logits;  // [n, V] in acc
      if (fp32_logits && !g_mm_dtype_out_failed) {
        auto out = logits32_buf[t].narrow(0, 0, n);
        try {
          mm_dtype_out_op()->call(x_c, w.t(), torch::kFloat32, out);
          logits = out;
        } catch (const c10::Error& e) {
          if (!g_mm_dtype_out_failed.exchange(true))
            log::warn(std::string("fused head: aten::mm.dtype_out failed, using bf16 logits + cast from now on: ") +
                      e.what_without_backtrace());
        }
      }
      if (!logits.defined()) {
        at::mm_out(logits_mm, x_c, w.t());
        logits = logits_mm.to(acc);  // the buffer itself unless bf16
      }
      torch::Tensor g;  // the [n, V] gradient of the rows' losses by the logits
      if (ce_kernel) {
        auto loss_rows = loss_rows_buf[t].narrow(0, 0, n);
        if (need_grad) g = logits_mm;  // the bf16 logits are no longer needed
        cuda_cross_entropy_rows(logits, t_c.squeeze(1).contiguous(), g, loss_rows);
        loss_sum[t] += loss_rows.sum();
        if (!need_grad) return;
      } else {
        auto l = probs_buf[t].narrow(0, 0, n);
        at::_log_softmax_out(l, logits, 1, /*half_to_float=*/false);
        auto l_target = l.gather(1, t_c);
        loss_sum[t] -= l_target.sum();
        if (!need_grad) return;
        auto g_target = l_target.expm1();
        if (low_precision) {
          g = logits_mm;  // the bf16 logits are no longer needed
          at::exp_out(g, l);
          g.scatter_(1, t_c, g_target.to(g.scalar_type()));
        } else {
          g = l.exp_();
          g.scatter_(1, t_c, g_target);
        }
      }
      auto gx = grad_x.narrow(0, start, n);
      if (low_precision) {  // bf16 products, fp32 accumulators
        gx.copy_(torch::mm(g, w)).mul_(inv_n);
        bool accumulated = false;
        if (fp32_logits && addmm_dtype_out_op().has_value() && !g_addmm_dtype_out_failed) {
          try {
            addmm_dtype_out_op()->call(grad_w[t], g.t(), x_c, torch::kFloat32, 1.0, inv_n, grad_w[t]);
            accumulated = true;
          } catch (const c10::Error& e) {
            if (!g_addmm_dtype_out_failed.exchange(true))
              log::warn(std::string("fused head: aten::addmm.dtype_out failed, using a bf16 product + add from now "
                                    "on: ") +
                        e.what_without_backtrace());
          }
        }
        if (!accumulated) grad_w[t].add_(torch::mm(g.t(), x_c), inv_n);
      } else {
        at::addmm_out(gx, gx, g, w, /*beta=*/0.0, /*alpha=*/inv_n);
        grad_w[t].addmm_(g.t(), x_c, /*beta=*/1.0, /*alpha=*/inv_n);
      }
    };
    // Worker t takes the chunks [t·n/T, (t+1)·n/T): contiguous, balanced to one chunk.
    run_workers(n_threads, [&](int64_t t) {
      const auto [c0, c1] = share(n_chunks, n_threads, t);
      for (int64_t c = c0; c < c1; ++c) run_chunk(c, t);
    });
    g_fp32_logits_last = fp32_logits && !g_mm_dtype_out_failed;
    g_fp32_dw_last = need_grad && low_precision && fp32_logits && addmm_dtype_out_op().has_value() &&
                     !g_addmm_dtype_out_failed;
    g_ce_kernel_last = ce_kernel;
    for (int64_t t = 1; t < n_threads; ++t) {
      loss_sum[0] += loss_sum[t];
      if (need_grad) grad_w[0] += grad_w[t];
    }
    if (need_grad) ctx->save_for_backward({grad_x.to(x_ND.scalar_type()), grad_w[0].to(w_VD.scalar_type())});
    return loss_sum[0] * inv_n;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_out) {
    const auto saved = ctx->get_saved_variables();
    const auto& g = grad_out[0];
    return {saved[0] * g.to(saved[0].scalar_type()), saved[1] * g.to(saved[1].scalar_type()),
            torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

bool fused_head_fp32_logits() { return g_fp32_logits_last; }
bool fused_head_fp32_dw() { return g_fp32_dw_last; }
bool fused_head_ce_kernel() { return g_ce_kernel_last; }

int64_t default_ce_chunk_rows(const torch::Device& device, int64_t vocab) {
  if (const char* v = std::getenv("MOECPT_CE_CHUNK_ROWS"); v && *v) {
    char* end = nullptr;
    const long long rows = std::strtoll(v, &end, 10);
    if (*end != 0 || rows < 1) throw Error("MOECPT_CE_CHUNK_ROWS must be a positive integer, got '" + std::string(v) + "'");
    return rows;
  }
  vocab = std::max<int64_t>(1, vocab);
  // CPU: 2 Mi logits (8 MiB fp32) per chunk, at least 256 rows: on the 2-vCPU
  // machine 128–512 rows were ~25 % faster than unfused at V = 8192, 32 rows no faster.
  if (!device.is_cuda()) return std::max<int64_t>(256, (int64_t(2) << 20) / vocab);
  // GPU: 256 Mi logits (1 GiB fp32) per chunk. Each chunk adds its [V, D] dL/dW
  // product into the fp32 accumulator, a pass over ~10 bytes per weight (1.3 GB
  // at V = 128,256, D = 1024); with 256-row chunks that was 64 passes, ~30 ms of
  // a 248 ms dense paper-scale step on an H100 (docs/performance.md).
  return std::max<int64_t>(256, (int64_t(256) << 20) / vocab);
}

torch::Tensor fused_linear_cross_entropy(const torch::Tensor& x_ND, const torch::Tensor& w_VD,
                                         const torch::Tensor& targets_N, int64_t chunk_rows) {
  if (x_ND.dim() != 2 || w_VD.dim() != 2 || targets_N.dim() != 1 || x_ND.size(1) != w_VD.size(1) ||
      targets_N.size(0) != x_ND.size(0)) {
    throw Error("fused_linear_cross_entropy: need x [N, D], w [V, D], targets [N]; got x " +
                std::to_string(x_ND.dim()) + "-D, w " + std::to_string(w_VD.dim()) + "-D");
  }
  if (x_ND.size(0) == 0) throw Error("fused_linear_cross_entropy: no rows");
  if (chunk_rows <= 0) chunk_rows = default_ce_chunk_rows(x_ND.device(), w_VD.size(0));
  const bool low_precision = compat::autocast_enabled(x_ND.device()) && x_ND.scalar_type() != torch::kFloat64;
  const bool need_grad = torch::GradMode::is_enabled() && (x_ND.requires_grad() || w_VD.requires_grad());
  if (!need_grad) return FusedLinearCrossEntropy::forward(nullptr, x_ND, w_VD, targets_N, chunk_rows, low_precision);
  return FusedLinearCrossEntropy::apply(x_ND, w_VD, targets_N, chunk_rows, low_precision);
}

LossOutput forward_loss(TransformerImpl& m, const torch::Tensor& tokens_BT, const torch::Tensor& targets_BT) {
  if (targets_BT.sizes() != tokens_BT.sizes())
    throw Error("forward_loss: targets and tokens must have the same shape [B, T]");
  const auto& mc = m.config();
  LossOutput out;
  auto x_BTD = m.hidden_states(tokens_BT, out.routing);
  const auto& w_VD = m.head ? m.head->weight : m.tok_emb->weight;
  out.lm_loss = fused_linear_cross_entropy(x_BTD.reshape({-1, mc.d_model}), w_VD, targets_BT.reshape({-1}));
  std::tie(out.aux_loss, out.z_loss) = router_losses(out.routing, tokens_BT.device());
  return out;
}

}  // namespace moecpt::model
