#include "model/threaded_linear.h"

#include "model/cpu_parallel.h"
#include "model/torch_compat.h"
#include "model/weight_casts.h"

namespace moecpt::model {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kMinRowsPerWorker = 64;

class ThreadedLinear : public torch::autograd::Function<ThreadedLinear> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x_NI, const torch::Tensor& w_OI) {
    const int64_t N = x_NI.size(0);
    auto x = x_NI.contiguous();
    auto y = torch::empty({N, w_OI.size(0)}, x.options());
    const int64_t T = cpu_workers(x, N, kMinRowsPerWorker);
    run_workers(T, [&](int64_t t) {
      const auto [lo, hi] = share(N, T, t);
      if (hi > lo) mm_into(y.narrow(0, lo, hi - lo), x.narrow(0, lo, hi - lo), w_OI.t());
    });
    ctx->save_for_backward({x, w_OI});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &x = saved[0], &w = saved[1];
    auto dy = grads[0].contiguous();
    const int64_t N = x.size(0);
    const int64_t T = cpu_workers(x, N, kMinRowsPerWorker);
    auto dx = torch::empty_like(x);
    std::vector<torch::Tensor> dw(static_cast<size_t>(T));
    run_workers(T, [&](int64_t t) {
      const auto [lo, hi] = share(N, T, t);
      if (hi == lo) {
        dw[t] = torch::zeros_like(w);
        return;
      }
      dw[t] = torch::empty_like(w);  // written whole by the mm below
      auto dy_t = dy.narrow(0, lo, hi - lo);
      mm_into(dx.narrow(0, lo, hi - lo), dy_t, w);
      mm_into(dw[t], dy_t.t(), x.narrow(0, lo, hi - lo));
    });
    for (int64_t t = 1; t < T; ++t) dw[0] += dw[t];
    return {dx, dw[0]};
  }
};

}  // namespace

torch::Tensor threaded_linear(const torch::Tensor& x_ND, const torch::Tensor& w_OD) {
  // Under autocast the weight's bf16 copy is the one autocast would make, kept
  // for the step's micro-batches (model/weight_casts.h); autocast casts x.
  if (compat::autocast_enabled(x_ND.device()) && w_OD.scalar_type() == torch::kFloat32)
    return torch::linear(x_ND, cached_to(w_OD, torch::kBFloat16));
  if (!x_ND.is_cpu() || x_ND.scalar_type() != w_OD.scalar_type()) return torch::linear(x_ND, w_OD);
  auto y = ThreadedLinear::apply(x_ND.reshape({-1, x_ND.size(-1)}), w_OD);
  auto shape = x_ND.sizes().vec();
  shape.back() = w_OD.size(0);
  return y.view(shape);
}

}  // namespace moecpt::model
