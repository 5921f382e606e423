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
// below memory bandwidth on an H100, 18 ms per step slower than index_add.) MOECPT_MOE_COMBINE=index_add
// keeps the textbook ops (A/B runs; model/moe.cpp).
#pragma once
#include "core/pch.h"

namespace moecpt::model {

struct SlotOrder {
  torch::Tensor order_S, inverse_S;  // int64 [T·K] on the ids' device
  torch::Tensor token_S;             // order_S / K: the token of each sorted slot
  int64_t top_k = 1;
};

// topk_ids_TK: int64 [T, K] expert ids. A stable sort of the flattened ids.
SlotOrder sort_slots_by_expert(const torch::Tensor& topk_ids_TK);

// x_TD [T, D] → x_SD [T·K, D] in expert order. Differentiable in x.
torch::Tensor dispatch_slots(const torch::Tensor& x_TD, const SlotOrder& o);

// y_SD [T·K, D] in expert order, gates_TK [T, K] → y_TD [T, D] in y's dtype
// (the gates are cast to it). Differentiable in y and the gates.
torch::Tensor combine_slots(const torch::Tensor& y_SD, const torch::Tensor& gates_TK, const SlotOrder& o);

// The textbook ops under autograd (index_select; zeros + index_add), for A/B
// runs and tests.
torch::Tensor dispatch_slots_index_select(const torch::Tensor& x_TD, const SlotOrder& o);
torch::Tensor combine_slots_index_add(const torch::Tensor& y_SD, const torch::Tensor& gates_TK, const SlotOrder& o);

// False when MOECPT_MOE_COMBINE=index_add (read once); other values are an error.
bool gather_combine_enabled();

}  // namespace moecpt::model
