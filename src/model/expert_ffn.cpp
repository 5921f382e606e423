#include "model/expert_ffn.h"

#include <functional>

#include "core/error.h"

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

// Runs fn(e) for every expert e. On the CPU with several intra-op threads (and
// not already inside a parallel region) the experts are split over the threads
// by rows, each thread running whole experts with single-threaded matmuls (the
// CPU policy of model/fused_runtime.h: one BLAS thread): expert e goes to the
// thread whose share of [0, S) holds the middle of e's rows. Elsewhere, in order.
void for_each_expert(const Groups& g, bool cpu, const std::function<void(int64_t)>& fn) {
  const int64_t E = int64_t(g.count.size());
  const int64_t S = E ? g.offset.back() + g.count.back() : 0;
  const int64_t T = cpu && !at::in_parallel_region() ? std::min<int64_t>(at::get_num_threads(), E) : 1;
  if (T <= 1 || S == 0) {
    for (int64_t e = 0; e < E; ++e) fn(e);
    return;
  }
  std::vector<std::vector<int64_t>> mine(static_cast<size_t>(T));
  for (int64_t e = 0; e < E; ++e) {
    if (g.count[e] == 0) {
      fn(e);  // empty expert: a zero fill, cheap
      continue;
    }
    const int64_t mid2 = 2 * g.offset[e] + g.count[e];  // 2 × the middle row
    mine[size_t(std::min<int64_t>(T - 1, mid2 * T / (2 * S)))].push_back(e);
  }
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t e : mine[size_t(t)]) fn(e);
  });
}

// at::mm_out wants an lvalue; our outputs are slices of preallocated buffers.
void mm_into(torch::Tensor out, const torch::Tensor& a, const torch::Tensor& b) { at::mm_out(out, a, b); }

// a = act(h1) ⊙ h3, into `a` (h13 = [h1 | h3] along dim 1).
void gated_forward(const torch::Tensor& h13, int64_t H, GatedActivation act, torch::Tensor& a) {
  auto h1 = h13.narrow(1, 0, H), h3 = h13.narrow(1, H, H);
  at::mul_out(a, act == GatedActivation::kGelu ? at::gelu(h1) : at::silu(h1), h3);
}

// dh13 = [act'(h1) · (da ⊙ h3) | da ⊙ act(h1)].
void gated_backward(const torch::Tensor& h13, const torch::Tensor& da, int64_t H, GatedActivation act,
                    torch::Tensor& dh13) {
  auto h1 = h13.narrow(1, 0, H), h3 = h13.narrow(1, H, H);
  auto dh1 = dh13.narrow(1, 0, H), dh3 = dh13.narrow(1, H, H);
  at::mul_out(dh3, da, act == GatedActivation::kGelu ? at::gelu(h1) : at::silu(h1));
  auto dg = da * h3;
  if (act == GatedActivation::kGelu)
    at::gelu_backward_out(dh1, dg, h1);
  else
    at::silu_backward_out(dh1, dg, h1);
}

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
    for_each_expert(g, x.is_cpu(), [&](int64_t e) {
      if (g.count[e] == 0) return;
      const int64_t o = g.offset[e], n = g.count[e];
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
    const int64_t S = x.size(0), E = w13.size(0), D = w13.size(1), H = w2.size(1);
    const Groups g = groups_of(counts, S);
    auto dy = grads[0].contiguous();

    auto dw2 = torch::empty_like(w2), dw13 = torch::empty_like(w13);
    auto da = torch::empty({S, H}, x.options()), dh13 = torch::empty({S, 2 * H}, x.options());
    auto dx = torch::empty({S, D}, x.options());
    for_each_expert(g, x.is_cpu(), [&](int64_t e) {
      if (g.count[e] == 0) {  // an expert with no tokens gets a zero gradient
        dw2[e].zero_();
        dw13[e].zero_();
        return;
      }
      const int64_t o = g.offset[e], n = g.count[e];
      auto dy_e = dy.narrow(0, o, n), da_e = da.narrow(0, o, n), dh_e = dh13.narrow(0, o, n);
      auto x_e = x.narrow(0, o, n);
      mm_into(dw2[e], a.narrow(0, o, n).t(), dy_e);
      mm_into(da_e, dy_e, w2[e].t());
      gated_backward(h13.narrow(0, o, n), da_e, H, act, dh_e);
      mm_into(dw13[e], x_e.t(), dh_e);
      mm_into(dx.narrow(0, o, n), dh_e, w13[e].t());
    });
    return {dx, dw13.narrow(2, 0, H).contiguous(), dw13.narrow(2, H, H).contiguous(), dw2, torch::Tensor(),
            torch::Tensor()};
  }
};

}  // namespace

torch::Tensor expert_ffn_loop(const torch::Tensor& x_SD, const torch::Tensor& w1_EDH, const torch::Tensor& w3_EDH,
                              const torch::Tensor& w2_EHD, const torch::Tensor& counts_E, GatedActivation act) {
  return ExpertFFNLoop::apply(x_SD, w1_EDH, w3_EDH, w2_EHD, counts_E, int64_t(act));
}

}  // namespace moecpt::model
