// Output head + cross-entropy in one op, without the [N, V] logits in memory.
//
//   loss = mean_n ( logsumexp_v (x_n · w_v) − x_n · w_{t_n} )
//
// The rows are processed in chunks (a few MiB of logits each): logits, their
// log-softmax (one fused kernel), loss, and — since
// the loss is a scalar — the gradients dL/dx = (softmax − onehot) W / N and
// dL/dW = (softmax − onehot)ᵀ x / N, all in the forward pass. backward() only scales them by the incoming gradient.
// This removes the eager path's full-size log_softmax, its backward, the
// NLL-backward zero fill and ~3 × N·V·4 bytes of memory traffic and peak memory
// (N·V = 2048 × 8192 = 64 MiB per copy on the mini models).
//
// Softmax and the loss are fp32. Under bf16 autocast the three matmuls run in
// bf16 (like the unfused head would), accumulation of dL/dW in fp32; on a GPU
// the logits come out of the matmul in fp32 where LibTorch can (below).
// Gradients are only computed when grad mode is on and x or w requires them.
// Every target must be in [0, V) (no ignore index; checked only in debug use).
#pragma once
#include "core/pch.h"
#include "model/transformer.h"

namespace moecpt::model {

// x_ND: hidden states (any leading dims flattened by the caller), w_VD: head
// weight, targets_N: int64. chunk_rows = 0 picks default_ce_chunk_rows.
// Rows per chunk of the fused head: max(256, 2^21 / V) on the CPU, max(256,
// 2^28 / V) on a GPU (1 GiB of fp32 logits: few passes over the fp32 dL/dW
// accumulator); MOECPT_CE_CHUNK_ROWS overrides both (an error if not a positive integer).
int64_t default_ce_chunk_rows(const torch::Device& device, int64_t vocab);

// Whether the last call had cuBLAS write its logits in fp32 (aten::mm.dtype_out:
// CUDA, bf16 autocast, a LibTorch that has the op, MOECPT_HEAD_FP32_MM not 0)
// instead of casting bf16 logits. For `bench train`'s report.
bool fused_head_fp32_logits();
// Whether the last call with gradients had cuBLAS accumulate dL/dW into the
// fp32 accumulator (aten::addmm.dtype_out, same conditions), and whether it ran
// moecpt's cross-entropy kernel (model/cuda_kernels.h). For reports and tests.
bool fused_head_fp32_dw();
bool fused_head_ce_kernel();

torch::Tensor fused_linear_cross_entropy(const torch::Tensor& x_ND, const torch::Tensor& w_VD,
                                         const torch::Tensor& targets_N, int64_t chunk_rows = 0);

// Transformer forward with the head and the cross-entropy against targets_BT
// (int64 [B, T], all in [0, V)) fused: lm_loss is set, logits_BTV is not.
// Same loss and gradients as cross_entropy(m.forward(tokens).logits_BTV);
// aux_loss, z_loss and routing as forward(); both run the body through
// TransformerImpl::hidden_states (activation checkpointing included).
struct LossOutput {
  torch::Tensor lm_loss;              // scalar mean next-token cross-entropy
  torch::Tensor aux_loss, z_loss;     // as ModelOutput
  std::vector<RoutingInfo> routing;   // as ModelOutput
};
LossOutput forward_loss(TransformerImpl& m, const torch::Tensor& tokens_BT, const torch::Tensor& targets_BT);

}  // namespace moecpt::model
