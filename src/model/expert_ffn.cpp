#include "model/expert_ffn.h"

#include <algorithm>
#include <functional>

#include "core/error.h"
#include "model/cpu_parallel.h"
#include "model/cuda_kernels.h"
#include "model/torch_compat.h"
#include "model/weight_casts.h"

namespace moecpt::model {

GatedActivation gated_activation_by_name(const std::string& name) {
  if (name == "geglu") return GatedActivation::kGelu;
  if (name == "swiglu") return GatedActivation::kSilu;
  throw Error("model.activation: unknown activation '" + name + "'");
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct Groups {
  std::vector<int64_t> offset, count;  // per expert
};

Groups groups_of(const torch::Tensor& counts_E, int64_t rows) {
  if (counts_E.device().type() != torch::kCPU || counts_E.scalar_type() != torch::kInt64 || counts_E.dim() != 1)
    throw Error("expert_ffn_loop: counts must be a 1-D int64 CPU tensor");
  auto c = counts_E.contiguous();
  const auto* p = c.data_ptr<int64_t>();
  Groups g;
  int64_t o = 0;
  for (int64_t e = 0; e < c.size(0); ++e) {
    if (p[e] < 0) throw Error("expert_ffn_loop: negative group size " + std::to_string(p[e]));
    g.offset.push_back(o);
    g.count.push_back(p[e]);
    o += p[e];
  }
  if (o != rows) {
    throw Error("moe: tokens_per_expert sums to " + std::to_string(o) + " but " + std::to_string(rows) +
                " slots were dispatched");
  }
  return g;
}

// A slice of one expert's rows, run by one thread.
struct Item {
  int64_t e, o, n;  // expert, first row, rows
};

// How the work is split over T threads: plan[t] = thread t's items.
//   E >= T: whole experts; expert e goes to the thread whose share of [0, S)
//           holds the middle of e's rows (dL/dW_e is written by one thread).
//   E <  T: (the dense FFN and shared experts, E = 1) each expert's rows are
//           cut into T blocks, block t to thread t; each thread then needs its
//           own dL/dW accumulator (split = true), summed afterwards.
// On the CPU with several intra-op threads, not inside a parallel region; each
// thread runs its items with single-threaded matmuls (the CPU policy of
// model/torch_compat.h: one BLAS thread). Elsewhere one thread does all.
struct Plan {
  std::vector<std::vector<Item>> per_thread;
  bool split = false;
};

Plan plan_work(const Groups& g, const torch::Tensor& like) {
  const int64_t E = int64_t(g.count.size());
  const int64_t S = E ? g.offset.back() + g.count.back() : 0;
  const int64_t T = cpu_workers(like, S, /*min rows per worker=*/32);
  Plan p;
  p.per_thread.resize(size_t(T));
  if (T == 1 || E >= T) {
    for (int64_t e = 0; e < E; ++e) {
      if (g.count[e] == 0) continue;
      const int64_t mid2 = 2 * g.offset[e] + g.count[e];  // 2 × the middle row
      p.per_thread[size_t(T == 1 ? 0 : std::min<int64_t>(T - 1, mid2 * T / (2 * S)))].push_back(
          {e, g.offset[e], g.count[e]});
    }
    return p;
  }
  p.split = true;
  for (int64_t e = 0; e < E; ++e)
    for (int64_t t = 0; t < T; ++t) {
      const auto [lo, hi] = share(g.count[e], T, t);
      if (hi > lo) p.per_thread[size_t(t)].push_back({e, g.offset[e] + lo, hi - lo});
    }
  return p;
}

// fn(item, t) for every item, worker t running plan.per_thread[t].
void run_plan(const Plan& p, const std::function<void(const Item&, int64_t)>& fn) {
  run_workers(int64_t(p.per_thread.size()), [&](int64_t t) {
    for (const auto& it : p.per_thread[size_t(t)]) fn(it, t);
  });
}

// a = act(h1) ⊙ h3, into `a` (h13 = [h1 | h3] along dim 1).
// On CUDA in fp32/bf16 one kernel (model/cuda_kernels.h) reads h13 once and
// writes a once; ATen's ops take two passes and an act(h1) temporary.
// On the CPU, LibTorch 1.13's GeLU is ~10x slower on this column slice than on
// contiguous rows (scalar erf), but a contiguous copy made a MoE step's heap
// grow without bound (docs/performance.md, session 14), so the slice stays.
void gated_forward(const torch::Tensor& h13, int64_t H, GatedActivation act, torch::Tensor& a) {
  if (use_cuda_kernels(h13)) return cuda_gated_forward(h13, H, act, a);
  auto h1 = h13.narrow(1, 0, H), h3 = h13.narrow(1, H, H);
  at::mul_out(a, act == GatedActivation::kGelu ? at::gelu(h1) : at::silu(h1), h3);
}

// dh13 = [act'(h1) · (da ⊙ h3) | da ⊙ act(h1)].
void gated_backward(const torch::Tensor& h13, const torch::Tensor& da, int64_t H, GatedActivation act,
                    torch::Tensor& dh13) {
  // CUDA kernel: reads h13 and da once, writes dh13 once (ATen: recomputes
  // act(h1), then three more passes and a da ⊙ h3 temporary).
  if (use_cuda_kernels(h13)) return cuda_gated_backward(h13, da, H, act, dh13);
  auto h1 = h13.narrow(1, 0, H), h3 = h13.narrow(1, H, H);
  auto dh1 = dh13.narrow(1, 0, H), dh3 = dh13.narrow(1, H, H);
  at::mul_out(dh3, da, act == GatedActivation::kGelu ? at::gelu(h1) : at::silu(h1));
  auto dg = da * h3;
  if (act == GatedActivation::kGelu)
    at::gelu_backward_out(dh1, dg, h1);
  else
    at::silu_backward_out(dh1, dg, h1);
}

// a = act(h1) ⊙ h3 as one autograd node that keeps only h13 for its backward
// (autograd over act() and mul would also keep act(h1)).
class GatedAct : public torch::autograd::Function<GatedAct> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& h13, int64_t H, int64_t act_code) {
    auto x = h13.stride(1) == 1 ? h13 : h13.contiguous();
    auto a = torch::empty({x.size(0), H}, x.options());
    gated_forward(x, H, GatedActivation(act_code), a);
    ctx->save_for_backward({x});
    ctx->saved_data["H"] = H;
    ctx->saved_data["act"] = act_code;
    return a;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto h13 = ctx->get_saved_variables()[0];
    const int64_t H = ctx->saved_data["H"].toInt();
    auto da = grads[0].stride(1) == 1 ? grads[0] : grads[0].contiguous();
    auto dh13 = torch::empty({h13.size(0), 2 * H}, h13.options());
    gated_backward(h13, da.to(h13.scalar_type()), H, GatedActivation(ctx->saved_data["act"].toInt()), dh13);
    return {dh13, torch::Tensor(), torch::Tensor()};
  }
};

class ExpertFFNLoop : public torch::autograd::Function<ExpertFFNLoop> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, torch::Tensor x, torch::Tensor w1, torch::Tensor w3,
                               torch::Tensor w2, torch::Tensor counts, int64_t act_code) {
    const auto act = GatedActivation(act_code);
    const int64_t S = x.size(0), E = w1.size(0), D = w1.size(1), H = w1.size(2);
    const Groups g = groups_of(counts, S);
    if (int64_t(g.count.size()) != E)
      throw Error("expert_ffn_loop: " + std::to_string(g.count.size()) + " group sizes for " + std::to_string(E) +
                  " experts");
    x = x.contiguous();
    auto w13 = torch::cat({w1, w3}, 2);  // [E, D, 2H]
    w2 = w2.contiguous();
    auto h13 = torch::empty({S, 2 * H}, x.options());
    auto a = torch::empty({S, H}, x.options());
    auto y = torch::empty({S, D}, x.options());
    run_plan(plan_work(g, x), [&](const Item& it, int64_t) {
      const int64_t e = it.e, o = it.o, n = it.n;
      auto h13_e = h13.narrow(0, o, n), a_e = a.narrow(0, o, n);
      mm_into(h13_e, x.narrow(0, o, n), w13[e]);
      gated_forward(h13_e, H, act, a_e);
      mm_into(y.narrow(0, o, n), a_e, w2[e]);
    });
    ctx->save_for_backward({x, w13, w2, h13, a});
    ctx->saved_data["counts"] = counts;
    ctx->saved_data["act"] = act_code;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &x = saved[0], &w13 = saved[1], &w2 = saved[2], &h13 = saved[3], &a = saved[4];
    const auto act = GatedActivation(ctx->saved_data["act"].toInt());
    const auto counts = ctx->saved_data["counts"].toTensor();
    const int64_t S = x.size(0), D = w13.size(1), H = w2.size(1);
    const Groups g = groups_of(counts, S);
    auto dy = grads[0].contiguous();

    const Plan plan = plan_work(g, x);
    // dL/dW: written once per expert (zeros for experts without tokens), or,
    // when experts' rows are split over threads, one accumulator per thread.
    const size_t n_acc = plan.split ? plan.per_thread.size() : 1;
    std::vector<torch::Tensor> dw2(n_acc), dw13(n_acc);
    if (plan.split) {
      for (size_t t = 0; t < n_acc; ++t) dw2[t] = torch::zeros_like(w2), dw13[t] = torch::zeros_like(w13);
    } else {
      dw2[0] = torch::empty_like(w2), dw13[0] = torch::empty_like(w13);
      for (size_t e = 0; e < g.count.size(); ++e)
        if (g.count[e] == 0) dw2[0][int64_t(e)].zero_(), dw13[0][int64_t(e)].zero_();
    }
    auto da = torch::empty({S, H}, x.options()), dh13 = torch::empty({S, 2 * H}, x.options());
    auto dx = torch::empty({S, D}, x.options());
    run_plan(plan, [&](const Item& it, int64_t t) {
      const int64_t e = it.e, o = it.o, n = it.n;
      const size_t acc = plan.split ? size_t(t) : 0;
      auto dy_e = dy.narrow(0, o, n), da_e = da.narrow(0, o, n), dh_e = dh13.narrow(0, o, n);
      auto x_e = x.narrow(0, o, n);
      mm_into(dw2[acc][e], a.narrow(0, o, n).t(), dy_e);
      mm_into(da_e, dy_e, w2[e].t());
      gated_backward(h13.narrow(0, o, n), da_e, H, act, dh_e);
      mm_into(dw13[acc][e], x_e.t(), dh_e);
      mm_into(dx.narrow(0, o, n), dh_e, w13[e].t());
    });
    for (size_t t = 1; t < n_acc; ++t) dw2[0] += dw2[t], dw13[0] += dw13[t];
    return {dx, dw13[0].narrow(2, 0, H).contiguous(), dw13[0].narrow(2, H, H).contiguous(), dw2[0],
            torch::Tensor(), torch::Tensor()};
  }
};

// [a | b] cast to one dtype in one buffer (concat_last_as).
class ConcatLastAs : public torch::autograd::Function<ConcatLastAs> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& a, const torch::Tensor& b,
                               int64_t dtype_code) {
    const int64_t Ha = a.size(-1), Hb = b.size(-1);
    auto sizes = a.sizes().vec();
    sizes.back() = Ha + Hb;
    auto out = torch::empty(sizes, a.options().dtype(c10::ScalarType(dtype_code)));
    out.narrow(-1, 0, Ha).copy_(a);
    out.narrow(-1, Ha, Hb).copy_(b);
    ctx->saved_data["Ha"] = Ha;
    ctx->saved_data["a_dtype"] = int64_t(a.scalar_type());
    ctx->saved_data["b_dtype"] = int64_t(b.scalar_type());
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto& g = grads[0];
    const int64_t Ha = ctx->saved_data["Ha"].toInt(), Hb = g.size(-1) - Ha;
    return {g.narrow(-1, 0, Ha).to(c10::ScalarType(ctx->saved_data["a_dtype"].toInt())),
            g.narrow(-1, Ha, Hb).to(c10::ScalarType(ctx->saved_data["b_dtype"].toInt())), torch::Tensor()};
  }
};

}  // namespace

torch::Tensor expert_ffn_loop(const torch::Tensor& x_SD, const torch::Tensor& w1_EDH, const torch::Tensor& w3_EDH,
                              const torch::Tensor& w2_EHD, const torch::Tensor& counts_E, GatedActivation act) {
  return ExpertFFNLoop::apply(x_SD, w1_EDH, w3_EDH, w2_EHD, counts_E, int64_t(act));
}

torch::Tensor concat_last_as(const torch::Tensor& a, const torch::Tensor& b, torch::ScalarType dtype) {
  if (a.dim() < 1 || a.dim() != b.dim() || a.sizes().slice(0, a.dim() - 1) != b.sizes().slice(0, b.dim() - 1) ||
      a.device() != b.device())
    throw Error("concat_last_as: the inputs must agree in every dim but the last and share a device");
  return ConcatLastAs::apply(a, b, int64_t(dtype));
}

torch::Tensor gated_activation(const torch::Tensor& h13_S2H, GatedActivation act) {
  if (h13_S2H.dim() != 2 || h13_S2H.size(1) % 2 != 0)
    throw Error("gated_activation: need [rows, 2H], got " + std::to_string(h13_S2H.dim()) + "-d, last size " +
                std::to_string(h13_S2H.dim() ? h13_S2H.size(-1) : 0));
  return GatedAct::apply(h13_S2H, h13_S2H.size(1) / 2, int64_t(act));
}

torch::Tensor gated_mlp(const torch::Tensor& x_ND, const torch::Tensor& w1_HD, const torch::Tensor& w3_HD,
                        const torch::Tensor& w2_DH, GatedActivation act) {
  const int64_t D = x_ND.size(-1);
  auto x = x_ND.reshape({-1, D});
  const auto dt = compat::autocast_enabled(x.device()) ? torch::kBFloat16 : x.scalar_type();
  compat::NoAutocast no_autocast;
  auto counts = torch::full({1}, x.size(0), torch::kInt64);
  auto y = expert_ffn_loop(x.to(dt), cached_to(w1_HD, dt).t().unsqueeze(0), cached_to(w3_HD, dt).t().unsqueeze(0),
                           cached_to(w2_DH, dt).t().unsqueeze(0), counts, act);
  auto shape = x_ND.sizes().vec();
  shape.back() = w2_DH.size(0);
  return y.view(shape);
}

}  // namespace moecpt::model
