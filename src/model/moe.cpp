#include "model/moe.h"

#include <atomic>
#include <cstdlib>

#include "core/error.h"
#include "model/torch_compat.h"
#include "model/expert_ffn.h"
#include "model/grouped_gemm.h"
#include "model/moe_expert_parallel.h"
#include "model/moe_slots.h"
#include "model/weight_casts.h"

namespace moecpt::model {

GroupedExpertsImpl::GroupedExpertsImpl(int64_t n_experts, int64_t d_model, int64_t hidden,
                                       const std::string& activation, double init_std,
                                       double out_std)
    : act_kind_(gated_activation_by_name(activation)) {
  w1_EDH = register_parameter("w1", torch::randn({n_experts, d_model, hidden}) * init_std);
  w3_EDH = register_parameter("w3", torch::randn({n_experts, d_model, hidden}) * init_std);
  w2_EHD = register_parameter("w2", torch::randn({n_experts, hidden, d_model}) * out_std);
}

namespace {

std::atomic<int> g_mode{-1};  // -1: not yet read from the environment
std::atomic<int64_t> g_grouped_calls{0}, g_loop_calls{0};

}  // namespace

ExpertGemm parse_expert_gemm(const std::string& name) {
  if (name == "auto") return ExpertGemm::kAuto;
  if (name == "grouped") return ExpertGemm::kGrouped;
  if (name == "loop") return ExpertGemm::kLoop;
  throw Error("expert GEMM path must be auto, grouped or loop (MOECPT_EXPERT_GEMM / --expert-gemm), got '" + name +
              "'");
}

const char* expert_gemm_name(ExpertGemm mode) {
  switch (mode) {
    case ExpertGemm::kGrouped: return "grouped";
    case ExpertGemm::kLoop: return "loop";
    default: return "auto";
  }
}

ExpertGemm expert_gemm_mode() {
  int m = g_mode.load();
  if (m < 0) {
    const char* v = std::getenv("MOECPT_EXPERT_GEMM");
    m = int(v && *v ? parse_expert_gemm(v) : ExpertGemm::kAuto);
    g_mode.store(m);
  }
  return ExpertGemm(m);
}

void set_expert_gemm_mode(ExpertGemm mode) { g_mode.store(int(mode)); }

bool grouped_mm_compiled() {
#if MOECPT_TORCH_AT_LEAST(2, 8)
  return true;
#else
  return false;
#endif
}

ExpertGemmCalls expert_gemm_calls() { return {g_grouped_calls.load(), g_loop_calls.load()}; }

bool GroupedExpertsImpl::use_grouped(const torch::Tensor& x) const {
  const auto mode = expert_gemm_mode();
  if (mode != ExpertGemm::kAuto) return mode == ExpertGemm::kGrouped;
  return grouped_mm_compiled() && x.is_cuda() &&
         (x.scalar_type() == torch::kBFloat16 || compat::autocast_enabled(x.device()));
}

torch::ScalarType GroupedExpertsImpl::compute_dtype(const torch::Tensor& x) const {
  if (compat::autocast_enabled(x.device()) || (x.is_cuda() && use_grouped(x))) return torch::kBFloat16;
  return x.scalar_type();
}

torch::Tensor GroupedExpertsImpl::forward(const torch::Tensor& x_SD,
                                          const torch::Tensor& tokens_per_expert_E) {
  const auto dt = compute_dtype(x_SD);
  if (use_grouped(x_SD)) {
#if MOECPT_TORCH_AT_LEAST(2, 8)
    // One grouped GEMM per projection over all experts; group e is rows
    // [offs[e-1], offs[e]) of x (offs = inclusive cumsum of the counts, int32,
    // on the device: nothing is read back). Weights are [E, K, N] row-major,
    // as _grouped_mm's 2d × 3d form wants; autograd has its backward
    // (_grouped_mm_mat1/mat2_backward, themselves grouped GEMMs).
    // bf16 on CUDA (the fast kernel's only dtype) and under autocast; on the
    // CPU without autocast the input's dtype (fp32: ATen's reference loop,
    // which tests compare with ours).
    compat::NoAutocast no_autocast;  // explicit dtypes below
    auto offs_E = tokens_per_expert_E.cumsum(0, torch::kInt32);
    auto x = x_SD.to(dt);
    // w1 and w3 as one [E, D, 2H] weight: one wider grouped GEMM forward, and
    // backward one for dx (no sum of two); the gated activation is one node
    // (model/expert_ffn.h: on CUDA one kernel each way).
    // cast into one buffer (no cat pass), once per step with gradient accumulation (model/weight_casts.h)
    auto w13 = cached_cast({w1_EDH, w3_EDH}, dt, [&] { return concat_last_as(w1_EDH, w3_EDH, dt); });
    auto h13 = at::_grouped_mm(x, w13, offs_E);
    ++g_grouped_calls;
    return at::_grouped_mm(gated_activation(h13, act_kind_), cached_to(w2_EHD, dt), offs_E);
#else
    throw Error("MOECPT_EXPERT_GEMM=grouped needs LibTorch >= 2.8 (at::_grouped_mm); this build has LibTorch " +
                std::string(TORCH_VERSION));
#endif
  }
  ++g_loop_calls;
  // Loop (model/expert_ffn.h): one host copy of the E group sizes per layer
  // (not one sync per expert), then two mm per non-empty expert forward and
  // four backward, inside one autograd Function. Its mm_out calls are not
  // autocast ops, so the autocast cast happens here, visible to autograd.
  auto counts_E = tokens_per_expert_E.to(torch::kCPU);
  compat::NoAutocast no_autocast;
  return expert_ffn_loop(x_SD.to(dt), cached_to(w1_EDH, dt), cached_to(w3_EDH, dt), cached_to(w2_EHD, dt), counts_E,
                         act_kind_);
}

MoEImpl::MoEImpl(const ModelConfig& mc, const RouterConfig& rc, double out_std) {
  if (mc.expert_hidden < 1) throw Error("model.expert_hidden must be >= 1 for an MoE model");
  router = register_module("router", make_router(rc, mc));
  experts = register_module("experts", GroupedExperts(mc.n_experts, mc.d_model, mc.expert_hidden,
                                                      mc.activation, mc.init_std, out_std));
  if (mc.n_shared_experts > 0) {
    // S shared experts of width h are the same maths as one of width S·h.
    shared = register_module("shared", GatedMLP(mc.d_model, mc.n_shared_experts * mc.expert_hidden,
                                                mc.activation, mc.init_std, out_std));
  }
}

MoEOutput MoEImpl::forward(const torch::Tensor& x_BTD) {
  // 1. router: top-k experts and gates for every token
  // 2. dispatch: sort the T·K token slots by expert id, gather their inputs
  // 3. grouped experts: each expert runs on its contiguous group
  // 4. combine: back to token order, gate-weighted sum of each token's K outputs
  // 5. shared experts: applied to every token, added on top
  const int64_t D = x_BTD.size(-1);
  auto x_TD = x_BTD.reshape({-1, D});

  // Each phase is a profiler user scope (train/op_profile.h; free when no
  // profiler runs): `moecpt bench train --profile` shows where a step goes.
  // 1.
  MoEOutput out;
  {
    RECORD_USER_SCOPE("moe.router");
    out.routing = router->route(x_TD);
  }
  const auto& r = out.routing;

  // 2. Slot s = t·K + j holds token t's j-th choice; a stable sort groups by
  // expert (model/moe_slots.h: gathers forward and backward, no atomics).
  // The slots are gathered in the experts' dtype (bf16 under autocast): the
  // K-fold copy and its backward move half the bytes of fp32.
  const SlotOps slot_ops = slot_ops_from_env();  // MOECPT_MOE_COMBINE
  SlotOrder slots;
  torch::Tensor x_SD;
  {
    RECORD_USER_SCOPE("moe.dispatch");
    slots = sort_slots_by_expert(r.topk_ids_TK, router->n_experts());
    auto x_in = x_TD.to(experts->compute_dtype(x_TD));
    x_SD = dispatch_slots_with(slot_ops, x_in, slots);
  }

  // 3. (expert parallel: on the experts' ranks, model/moe_expert_parallel.h)
  torch::Tensor y_SD;
  {
    RECORD_USER_SCOPE("moe.experts");
    y_SD = expert_parallel ? expert_parallel->run(*experts, x_SD, r.tokens_per_expert_E)
                           : experts(x_SD, r.tokens_per_expert_E);
  }

  // 4.
  torch::Tensor y_TD;
  {
    RECORD_USER_SCOPE("moe.combine");
    y_TD = combine_slots_with(slot_ops, y_SD, r.gates_TK, slots);
  }

  // 5.
  if (shared) {
    RECORD_USER_SCOPE("moe.shared");
    y_TD = y_TD + shared(x_TD);
  }

  out.y_BTD = y_TD.view(x_BTD.sizes());
  return out;
}

}  // namespace moecpt::model
