// The MoE layer's dispatch (token → expert-sorted slots) and combine (slots →
// gate-weighted token outputs) as gathers, forward and backward.
//
// Token t's j-th choice is slot t·K + j; order_S sorts the T·K slots by expert
// (stably) and inverse_S undoes it: order_S[inverse_S[s]] = s.
//
//   dispatch  x_SD[s] = x_TD[order_S[s] / K]
//             backward dx_TD[t] = Σ_j dx_SD[inverse_S[t·K + j]]   (gather, sum over K)
//   combine   y_TD[t] = Σ_j gates_TK[t, j] · y_SD[inverse_S[t·K + j]]
//             (each slot scaled by its gate, gathered back to token order,
//             the K slots of a token summed)
//
// The textbook combine is a zero tensor plus index_add of the gated slots, and
// dispatch's backward under autograd is another index_add: atomic adds on a
// GPU (run-to-run different sums, bf16 rounding at every add) and zero fills.
// Here every op is a gather, an elementwise product or a row sum:
// deterministic, with fp32 accumulation inside the sums. (A first version did
// the combine as a batched [1, K] × [K, D] matmul per token: cuBLAS ran it far
// below memory bandwidth on an H100, 18 ms per step slower than index_add.)
//
// MOECPT_MOE_COMBINE picks the ops (model/moe.cpp, A/B runs):
//   gather     the gathers above (the default)
//   index_add  the textbook ops
//   kernel     on CUDA in fp32/bf16, moecpt's kernels (model/cuda_kernels.h):
//              the combine's forward and the dispatch's backward as one
//              gather-and-sum pass, the combine's backward as one pass that
//              writes dy and the gate gradients; the gates stay fp32 and each
//              output is rounded once. Elsewhere the gathers. Opt-in until a
//              GPU run has checked and timed it.
#pragma once
#include "core/pch.h"

namespace moecpt::model {

struct SlotOrder {
  torch::Tensor order_S, inverse_S;  // int64 [T·K] on the ids' device
  torch::Tensor token_S;             // order_S / K: the token of each sorted slot
  int64_t top_k = 1;
};

// topk_ids_TK: int64 [T, K] expert ids. A stable sort of the flattened ids.
// With n_experts > 0 (the ids lie in [0, n_experts)) the keys are sorted as the
// narrowest integer type that holds them (uint8 up to 256 experts): a radix
// sort's passes scale with the key's bits (ATen's CUDA sort does all of them),
// and the order is the same. n_experts = 0 sorts the int64 ids as they are.
//
// On CUDA with MOECPT_SLOT_SORT_KERNEL=1 and 1 ≤ n_experts ≤ 256: moecpt's
// counting sort (model/cuda_kernels.h cuda_slot_sort), the same order in three
// launches instead of ATen's radix sort, a scatter and a division; the routers
// then count tokens per expert with its counting pass (Router::count_tokens).
// Opt-in until a GPU has timed it (session 8's H100 profile: the sort alone
// 3.7 ms per step).
SlotOrder sort_slots_by_expert(const torch::Tensor& topk_ids_TK, int64_t n_experts = 0);
// MOECPT_SLOT_SORT_KERNEL: 0 (default) or 1, read once; else an error naming it.
bool slot_sort_kernel_requested();
// Requested, the kernels built and enabled, ids on CUDA, 1 ≤ n_experts ≤ 256.
bool use_slot_sort_kernel(const torch::Tensor& ids, int64_t n_experts);

// x_TD [T, D] → x_SD [T·K, D] in expert order. Differentiable in x.
torch::Tensor dispatch_slots(const torch::Tensor& x_TD, const SlotOrder& o);

// y_SD [T·K, D] in expert order, gates_TK [T, K] → y_TD [T, D] in y's dtype
// (the gates are cast to it). Differentiable in y and the gates.
torch::Tensor combine_slots(const torch::Tensor& y_SD, const torch::Tensor& gates_TK, const SlotOrder& o);

// The textbook ops under autograd (index_select; zeros + index_add), for A/B
// runs and tests.
torch::Tensor dispatch_slots_index_select(const torch::Tensor& x_TD, const SlotOrder& o);
torch::Tensor combine_slots_index_add(const torch::Tensor& y_SD, const torch::Tensor& gates_TK, const SlotOrder& o);

// moecpt's CUDA kernels for the same maths (CUDA fp32/bf16 rows; the gate
// gradients accumulated in fp32 and the gates not rounded to the rows' dtype).
torch::Tensor dispatch_slots_cuda(const torch::Tensor& x_TD, const SlotOrder& o);
torch::Tensor combine_slots_cuda(const torch::Tensor& y_SD, const torch::Tensor& gates_TK, const SlotOrder& o);

enum class SlotOps { kGather, kIndexAdd, kKernel };
// MOECPT_MOE_COMBINE (read once): unset or "gather", "index_add", "kernel";
// other values are an error naming the variable.
SlotOps slot_ops_from_env();
// The ops that run for rows like `rows` under `ops`: kKernel falls back to
// kGather where the kernels do not apply (CPU, fp64, a build without them,
// MOECPT_CUDA_KERNELS=0).
SlotOps slot_ops_for(SlotOps ops, const torch::Tensor& rows);
const char* slot_ops_name(SlotOps ops);
// dispatch_slots / combine_slots by the ops slot_ops_for picks.
torch::Tensor dispatch_slots_with(SlotOps ops, const torch::Tensor& x_TD, const SlotOrder& o);
torch::Tensor combine_slots_with(SlotOps ops, const torch::Tensor& y_SD, const torch::Tensor& gates_TK,
                                 const SlotOrder& o);

}  // namespace moecpt::model
