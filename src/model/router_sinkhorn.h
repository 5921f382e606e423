// Sinkhorn-balanced top-k router (the paper's SBTk; SPEC §3). In training the
// *choice* of experts comes from a doubly-stochastic rebalancing of the scores,
// the *gates* from the raw scores; at evaluation it is plain top-k.
#pragma once
#include "model/router.h"

namespace moecpt::model {

struct SinkhornResult {
  torch::Tensor S_TE;   // diag(d0) C diag(d1): rows sum ≈ 1/T, columns ≈ 1/E
  int64_t iters = 0;    // -2 when counted on the device (the CUDA kernel): see stats
  double error = 0.0;   // mean |d1 - d1_prev| at the last iteration (NaN when on the device)
  torch::Tensor stats;  // fp64 [iters, error] on the logits' device, always set
};

// The SPEC §3 iteration on C = exp(z - rowmax(z)) (the row shift is absorbed by d0):
//   d0 = (1/T) / (C d1 + eps);  d1 = (1/E) / (Cᵀ d0 + eps)
// until mean |d1 - d1_prev| < tol or max_iters. No gradient. The stopping test
// is a host read: every iteration on the CPU, every 8th on a GPU
// (MOECPT_SINKHORN_CHECK_EVERY overrides; router_sinkhorn.cpp). With
// MOECPT_SINKHORN_KERNEL=1 on a CUDA build with moecpt's kernels (E ≤ 64), one
// kernel runs every iteration and tests every iteration on the device: no host
// read (model/cuda_kernels.h; opt-in until measured on a GPU).
SinkhornResult sinkhorn_balance(const torch::Tensor& logits_TE, double tol, int64_t max_iters,
                                double eps = 1e-8);

class SinkhornRouter : public Router {
 public:
  SinkhornRouter(const RouterConfig& rc, const ModelConfig& mc);
  // Training: ids = top-k of Sinkhorn(z); eval: ids = top-k of z.
  // gates = softmax(z) at ids (sigmoid(z) when k = 1). No aux loss, no z-loss.
  RoutingInfo route(const torch::Tensor& x_TD) override;

 private:
  double tol_;
  int64_t max_iters_;
};

}  // namespace moecpt::model
