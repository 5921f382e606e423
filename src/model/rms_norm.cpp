#include "model/rms_norm.h"

#include "core/env.h"
#include "core/error.h"
#include "model/cuda_kernels.h"
#include "model/torch_compat.h"

namespace moecpt::model {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class RmsNormCuda : public torch::autograd::Function<RmsNormCuda> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& w, double eps) {
    const int64_t D = x.size(-1);
    auto x_ND = x.reshape({-1, D});
    if (x_ND.stride(1) != 1) x_ND = x_ND.contiguous();
    auto y_ND = torch::empty(x_ND.sizes(), x_ND.options());
    auto rstd_N = torch::empty({x_ND.size(0)}, x_ND.options().dtype(torch::kFloat32));
    cuda_rms_norm_forward(x_ND, w, eps, y_ND, rstd_N);
    ctx->save_for_backward({x_ND, w, rstd_N});
    return y_ND.view(x.sizes());
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &x_ND = saved[0], &w = saved[1], &rstd_N = saved[2];
    auto dy_ND = grads[0].reshape({-1, x_ND.size(1)}).to(x_ND.scalar_type());
    if (dy_ND.stride(1) != 1) dy_ND = dy_ND.contiguous();
    auto dx_ND = torch::empty(x_ND.sizes(), x_ND.options());
    auto dw = cuda_rms_norm_backward(x_ND, w, rstd_N, dy_ND, dx_ND);
    return {dx_ND.view(grads[0].sizes()), dw, torch::Tensor()};
  }
};

}  // namespace

bool rms_norm_kernel_requested() {
  static const bool on = env_switch("MOECPT_RMSNORM_KERNEL", false);
  return on;
}

bool use_rms_norm_kernel(const torch::Tensor& x, const torch::Tensor& w) {
  return rms_norm_kernel_requested() && use_cuda_kernels(x) && x.dim() >= 1 && w.dim() == 1 &&
         w.scalar_type() == torch::kFloat32 && w.device() == x.device() && w.size(0) == x.size(-1) &&
         x.size(-1) <= cuda_rms_norm_max_width();
}

torch::Tensor rms_norm_kernel(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  if (!use_cuda_kernels(x))
    throw Error("rms_norm_kernel: needs an fp32 or bf16 CUDA tensor and a build with moecpt's CUDA kernels");
  return RmsNormCuda::apply(x, w.contiguous(), eps);
}

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  return use_rms_norm_kernel(x, w) ? rms_norm_kernel(x, w, eps) : compat::rms_norm(x, w, eps);
}

}  // namespace moecpt::model
