// moecpt's own CPU kernels split their work over ATen's intra-op threads, each
// thread calling single-threaded BLAS (model/torch_compat.h keeps OpenBLAS at
// one thread): the fused head's row chunks (fused_ce.cpp), expert groups and
// FFN rows (expert_ffn.cpp), the attention projections (threaded_linear.cpp).
// This is the one file that calls at::parallel_for, which for an OpenMP
// LibTorch is inline OpenMP and so needs -fopenmp (CMakeLists.txt).
#pragma once
#include <cstdint>
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/mm.h>

#include <functional>
#include <utility>

namespace moecpt::model {

// How many workers to split `items` units of work (rows, chunks) over: ATen's
// thread count on the CPU, 1 on a GPU or inside a parallel region, and never
// more than items / min_items_per_worker (small inputs stay on one thread).
int64_t cpu_workers(const at::Tensor& like, int64_t items, int64_t min_items_per_worker = 1);

// fn(t) for t in [0, n_workers), concurrently, each worker with the caller's
// thread-local state (grad mode, autocast, profiler: worker threads start with
// the defaults otherwise). n_workers <= 1 runs fn(0) here.
void run_workers(int64_t n_workers, const std::function<void(int64_t)>& fn);

// Rows [lo, hi) of `n` split evenly over `workers`: worker t's share.
inline std::pair<int64_t, int64_t> share(int64_t n, int64_t workers, int64_t t) {
  return {n * t / workers, n * (t + 1) / workers};
}

// at::mm_out / at::bmm_out into a slice of a preallocated output (they want an
// lvalue; a worker's share of the output is a temporary narrow()).
inline void mm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b) { at::mm_out(out, a, b); }
inline void bmm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b) { at::bmm_out(out, a, b); }

}  // namespace moecpt::model
