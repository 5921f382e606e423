#include "model/moe_slots.h"

#include <cstdlib>

#include "core/env.h"
#include "core/error.h"
#include "model/cuda_kernels.h"

namespace moecpt::model {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// x_SD = x_TD[order_S / K]; backward gathers the K slots of each token and
// sums them: two ATen ops, or with `kernel` one pass of moecpt's CUDA kernel
// (model/cuda_kernels.h: fp32 sum, one rounding).
class DispatchSlots : public torch::autograd::Function<DispatchSlots> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x_TD, const torch::Tensor& token_of_slot_S,
                               const torch::Tensor& inverse_S, int64_t K, bool kernel) {
    ctx->save_for_backward({inverse_S});
    ctx->saved_data["K"] = K;
    ctx->saved_data["kernel"] = kernel;
    return x_TD.index_select(0, token_of_slot_S);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto inverse_S = ctx->get_saved_variables()[0];
    const int64_t K = ctx->saved_data["K"].toInt();
    const int64_t S = grads[0].size(0), D = grads[0].size(1);
    torch::Tensor dx;
    if (ctx->saved_data["kernel"].toBool()) {
      const auto g = grads[0].contiguous();
      dx = torch::empty({S / K, D}, g.options());
      cuda_gather_sum_rows(g, inverse_S, torch::Tensor(), K, dx);
    } else {
      auto g_TKD = grads[0].index_select(0, inverse_S).view({S / K, K, D});
      dx = K == 1 ? g_TKD.squeeze(1) : g_TKD.sum(1);
    }
    return {dx, torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

// y_TD[t] = Σ_j gates[t, j] · y_SD[inverse[t·K + j]]: each sorted slot's output
// scaled by its gate (elementwise), gathered back to token order, and the K
// slots of a token summed (fp32 accumulation inside the sum). Backward: each
// slot gathers its token's gradient (dy = gate · g) and the gate's gradient is
// the row dot product g · y, accumulated in fp32. Elementwise ops, gathers and
// row sums only: no atomics (deterministic) and no batched [1, K] × [K, D]
// GEMMs (cuBLAS ran those at ~10 % of memory bandwidth on an H100).
class CombineSlots : public torch::autograd::Function<CombineSlots> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& y_SD, const torch::Tensor& gates_TK,
                               const torch::Tensor& order_S, const torch::Tensor& inverse_S,
                               const torch::Tensor& token_S) {
    const int64_t T = gates_TK.size(0), K = gates_TK.size(1), D = y_SD.size(1);
    auto gates_S = gates_TK.reshape({-1}).index_select(0, order_S).to(y_SD.scalar_type());
    auto yw_TKD = (y_SD * gates_S.unsqueeze(1)).index_select(0, inverse_S).view({T, K, D});
    ctx->save_for_backward({y_SD, gates_S, inverse_S, token_S});
    ctx->saved_data["gates_dtype"] = int64_t(gates_TK.scalar_type());
    return K == 1 ? yw_TKD.squeeze(1) : yw_TKD.sum(1);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &y_SD = saved[0], &gates_S = saved[1], &inverse_S = saved[2], &token_S = saved[3];
    const auto gates_dtype = c10::ScalarType(ctx->saved_data["gates_dtype"].toInt());
    const int64_t S = y_SD.size(0), T = grads[0].size(0);
    auto g_SD = grads[0].to(y_SD.scalar_type()).index_select(0, token_S);
    auto dy_SD = g_SD * gates_S.unsqueeze(1);
    // fp32 accumulation for bf16/fp16 (fp64 stays fp64)
    auto dgates_S = at::sum(g_SD * y_SD, {1}, /*keepdim=*/false, c10::promoteTypes(y_SD.scalar_type(), torch::kFloat32));
    auto dgates_TK = dgates_S.index_select(0, inverse_S).view({T, S / T}).to(gates_dtype);
    return {dy_SD, dgates_TK, torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

// The combine on moecpt's CUDA kernels: forward one gather-and-sum pass (fp32
// sums, one rounding), backward one pass writing dy and the fp32 gate
// gradients. The gates stay fp32.
class CombineSlotsCuda : public torch::autograd::Function<CombineSlotsCuda> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& y_SD, const torch::Tensor& gates_TK,
                               const torch::Tensor& inverse_S) {
    const int64_t T = gates_TK.size(0), K = gates_TK.size(1);
    const auto y = y_SD.contiguous();
    const auto w = gates_TK.to(torch::kFloat32).contiguous();
    auto out = torch::empty({T, y.size(1)}, y.options());
    cuda_gather_sum_rows(y, inverse_S, w, K, out);
    ctx->save_for_backward({y, w, inverse_S});
    ctx->saved_data["gates_dtype"] = int64_t(gates_TK.scalar_type());
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &y = saved[0], &w = saved[1], &inverse_S = saved[2];
    const auto gates_dtype = c10::ScalarType(ctx->saved_data["gates_dtype"].toInt());
    const auto g = grads[0].to(y.scalar_type()).contiguous();
    auto dy = torch::empty_like(y);
    auto dw = torch::empty_like(w);
    cuda_combine_backward(g, y, inverse_S, w, dy, dw);
    return {dy, dw.to(gates_dtype), torch::Tensor()};
  }
};

void check(const torch::Tensor& rows, const SlotOrder& o, const char* what) {
  if (rows.dim() != 2 || !o.order_S.defined() || !o.token_S.defined() || o.top_k < 1 ||
      o.order_S.size(0) % o.top_k != 0)
    throw Error(std::string(what) + ": need [rows, D] and a slot order of T·K slots");
}

}  // namespace

SlotOrder sort_slots_by_expert(const torch::Tensor& topk_ids_TK, int64_t n_experts) {
  if (topk_ids_TK.dim() != 2) throw Error("sort_slots_by_expert: expert ids must be [T, K]");
  SlotOrder o;
  o.top_k = topk_ids_TK.size(1);
  auto ids_S = topk_ids_TK.reshape({-1});
  if (use_slot_sort_kernel(ids_S, n_experts)) {
    auto r = cuda_slot_sort(ids_S.to(torch::kInt64).contiguous(), n_experts, o.top_k);
    o.order_S = r.order_S, o.inverse_S = r.inverse_S, o.token_S = r.token_S;
    return o;
  }
  auto keys_S = n_experts <= 0           ? ids_S
                : n_experts <= 256       ? ids_S.to(torch::kUInt8)
                : n_experts <= 32768     ? ids_S.to(torch::kInt16)
                : n_experts <= (1LL << 31) ? ids_S.to(torch::kInt32)
                                         : ids_S;
  o.order_S = std::get<1>(keys_S.sort(c10::optional<bool>(/*stable=*/true), /*dim=*/0));
  o.inverse_S = torch::empty_like(o.order_S).scatter_(0, o.order_S, torch::arange(ids_S.size(0), o.order_S.options()));
  o.token_S = o.order_S.div(o.top_k, "floor");
  return o;
}

torch::Tensor dispatch_slots(const torch::Tensor& x_TD, const SlotOrder& o) {
  check(x_TD, o, "dispatch_slots");
  if (x_TD.size(0) * o.top_k != o.order_S.size(0))
    throw Error("dispatch_slots: " + std::to_string(x_TD.size(0)) + " tokens × K = " + std::to_string(o.top_k) +
                " is not the " + std::to_string(o.order_S.size(0)) + " slots of the order");
  return DispatchSlots::apply(x_TD, o.token_S, o.inverse_S, o.top_k, false);
}

torch::Tensor combine_slots(const torch::Tensor& y_SD, const torch::Tensor& gates_TK, const SlotOrder& o) {
  check(y_SD, o, "combine_slots");
  const int64_t T = gates_TK.size(0), K = o.top_k;
  if (gates_TK.dim() != 2 || gates_TK.size(1) != K || y_SD.size(0) != T * K)
    throw Error("combine_slots: gates must be [T, K] for T·K = " + std::to_string(y_SD.size(0)) + " slots");
  if (y_SD.size(0) != o.order_S.size(0))
    throw Error("combine_slots: " + std::to_string(y_SD.size(0)) + " slot outputs for an order of " +
                std::to_string(o.order_S.size(0)) + " slots");
  return CombineSlots::apply(y_SD, gates_TK, o.order_S, o.inverse_S, o.token_S);
}

torch::Tensor dispatch_slots_index_select(const torch::Tensor& x_TD, const SlotOrder& o) {
  check(x_TD, o, "dispatch_slots_index_select");
  return x_TD.index_select(0, o.token_S);
}

torch::Tensor combine_slots_index_add(const torch::Tensor& y_SD, const torch::Tensor& gates_TK, const SlotOrder& o) {
  check(y_SD, o, "combine_slots_index_add");
  auto gates_S = gates_TK.reshape({-1}).index_select(0, o.order_S).to(y_SD.scalar_type());
  return torch::zeros({gates_TK.size(0), y_SD.size(1)}, y_SD.options())
      .index_add(0, o.token_S, y_SD * gates_S.unsqueeze(1));
}

torch::Tensor dispatch_slots_cuda(const torch::Tensor& x_TD, const SlotOrder& o) {
  check(x_TD, o, "dispatch_slots_cuda");
  if (x_TD.size(0) * o.top_k != o.order_S.size(0))
    throw Error("dispatch_slots_cuda: " + std::to_string(x_TD.size(0)) + " tokens × K = " + std::to_string(o.top_k) +
                " is not the " + std::to_string(o.order_S.size(0)) + " slots of the order");
  if (!use_cuda_kernels(x_TD)) throw Error("dispatch_slots_cuda: needs fp32/bf16 CUDA rows and moecpt's CUDA kernels");
  return DispatchSlots::apply(x_TD, o.token_S, o.inverse_S, o.top_k, true);
}

torch::Tensor combine_slots_cuda(const torch::Tensor& y_SD, const torch::Tensor& gates_TK, const SlotOrder& o) {
  check(y_SD, o, "combine_slots_cuda");
  const int64_t T = gates_TK.size(0), K = o.top_k;
  if (gates_TK.dim() != 2 || gates_TK.size(1) != K || y_SD.size(0) != T * K || y_SD.size(0) != o.order_S.size(0))
    throw Error("combine_slots_cuda: gates must be [T, K] for T·K = " + std::to_string(y_SD.size(0)) +
                " slots of the order");
  if (!use_cuda_kernels(y_SD)) throw Error("combine_slots_cuda: needs fp32/bf16 CUDA rows and moecpt's CUDA kernels");
  return CombineSlotsCuda::apply(y_SD, gates_TK, o.inverse_S);
}

bool slot_sort_kernel_requested() {
  static const bool on = env_switch("MOECPT_SLOT_SORT_KERNEL", false);
  return on;
}

bool use_slot_sort_kernel(const torch::Tensor& ids, int64_t n_experts) {
  return slot_sort_kernel_requested() && ids.is_cuda() && cuda_kernels_enabled() && n_experts >= 1 &&
         n_experts <= cuda_slot_sort_max_experts();
}

SlotOps slot_ops_from_env() {
  static const SlotOps ops = [] {
    const char* v = std::getenv("MOECPT_MOE_COMBINE");
    const std::string s = v ? v : "";
    if (s.empty() || s == "gather") return SlotOps::kGather;
    if (s == "index_add") return SlotOps::kIndexAdd;
    if (s == "kernel") return SlotOps::kKernel;
    throw Error("MOECPT_MOE_COMBINE must be 'gather', 'index_add' or 'kernel', got '" + s + "'");
  }();
  return ops;
}

SlotOps slot_ops_for(SlotOps ops, const torch::Tensor& rows) {
  return ops == SlotOps::kKernel && !use_cuda_kernels(rows) ? SlotOps::kGather : ops;
}

const char* slot_ops_name(SlotOps ops) {
  switch (ops) {
    case SlotOps::kGather: return "gather";
    case SlotOps::kIndexAdd: return "index_add";
    case SlotOps::kKernel: return "kernel";
  }
  return "?";
}

torch::Tensor dispatch_slots_with(SlotOps ops, const torch::Tensor& x_TD, const SlotOrder& o) {
  switch (slot_ops_for(ops, x_TD)) {
    case SlotOps::kIndexAdd: return dispatch_slots_index_select(x_TD, o);
    case SlotOps::kKernel: return dispatch_slots_cuda(x_TD, o);
    case SlotOps::kGather: break;
  }
  return dispatch_slots(x_TD, o);
}

torch::Tensor combine_slots_with(SlotOps ops, const torch::Tensor& y_SD, const torch::Tensor& gates_TK,
                                 const SlotOrder& o) {
  switch (slot_ops_for(ops, y_SD)) {
    case SlotOps::kIndexAdd: return combine_slots_index_add(y_SD, gates_TK, o);
    case SlotOps::kKernel: return combine_slots_cuda(y_SD, gates_TK, o);
    case SlotOps::kGather: break;
  }
  return combine_slots(y_SD, gates_TK, o);
}

}  // namespace moecpt::model
