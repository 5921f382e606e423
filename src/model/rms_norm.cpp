#include "model/rms_norm.h"

#include "core/env.h"
#include "core/error.h"
#include "model/cuda_kernels.h"
#include "model/torch_compat.h"

namespace moecpt::model {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Rows [N, D] of t with contiguous rows (a view when t's rows already are).
torch::Tensor rows_of(const torch::Tensor& t, int64_t D) {
  auto t_ND = t.reshape({-1, D});
  return t_ND.stride(1) == 1 ? t_ND : t_ND.contiguous();
}

// y's dtype: the one asked for where the kernels take it (rms_norm_dtype_pairs), else x's.
torch::ScalarType y_dtype_for(const torch::Tensor& x, NormOutDtype y_dtype) {
  return y_dtype && rms_norm_dtype_pairs(*y_dtype, x.scalar_type()) ? *y_dtype : x.scalar_type();
}

// dy as the backward kernel reads it: as it comes where its dtype pairs with x's, else in x's.
torch::Tensor dy_rows(const torch::Tensor& gy, const torch::Tensor& x_ND) {
  const bool as_is = rms_norm_dtype_pairs(gy.scalar_type(), x_ND.scalar_type());
  return rows_of(as_is ? gy : gy.to(x_ND.scalar_type()), x_ND.size(1));
}

class RmsNormCuda : public torch::autograd::Function<RmsNormCuda> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& w, double eps,
                               torch::ScalarType y_dtype) {
    const auto x_ND = rows_of(x, x.size(-1));
    auto y_ND = torch::empty(x_ND.sizes(), x_ND.options().dtype(y_dtype));
    auto rstd_N = torch::empty({x_ND.size(0)}, x_ND.options().dtype(torch::kFloat32));
    cuda_rms_norm_forward(x_ND, w, eps, y_ND, rstd_N);
    ctx->save_for_backward({x_ND, w, rstd_N});
    return y_ND.view(x.sizes());
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &x_ND = saved[0], &w = saved[1], &rstd_N = saved[2];
    const auto dy_ND = dy_rows(grads[0], x_ND);
    auto dx_ND = torch::empty(x_ND.sizes(), x_ND.options());
    auto dw = cuda_rms_norm_backward(x_ND, w, rstd_N, dy_ND, dx_ND);
    return {dx_ND.view(grads[0].sizes()), dw, torch::Tensor(), torch::Tensor()};
  }
};

class AddRmsNormCuda : public torch::autograd::Function<AddRmsNormCuda> {
 public:
  static variable_list forward(AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& a,
                               const torch::Tensor& w, double eps, torch::ScalarType y_dtype) {
    const int64_t D = x.size(-1);
    const auto x_ND = rows_of(x, D), a_ND = rows_of(a, D);
    auto h_ND = torch::empty(x_ND.sizes(), x_ND.options());
    auto y_ND = torch::empty(x_ND.sizes(), x_ND.options().dtype(y_dtype));
    auto rstd_N = torch::empty({x_ND.size(0)}, x_ND.options().dtype(torch::kFloat32));
    cuda_rms_norm_forward(x_ND, w, eps, y_ND, rstd_N, a_ND, h_ND);
    auto h = h_ND.view(x.sizes());
    ctx->save_for_backward({h_ND, w, rstd_N});
    return {h, y_ND.view(x.sizes())};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &h_ND = saved[0], &w = saved[1], &rstd_N = saved[2];
    const int64_t D = h_ND.size(1);
    const auto &gh = grads[0], &gy = grads[1];
    if (!gy.defined()) return {gh, gh, torch::Tensor(), torch::Tensor(), torch::Tensor()};  // y unused
    const auto dy_ND = dy_rows(gy, h_ND);
    const auto dres_ND = gh.defined() ? rows_of(gh.to(h_ND.scalar_type()), D) : torch::Tensor();
    auto dx_ND = torch::empty(h_ND.sizes(), h_ND.options());
    auto dw = cuda_rms_norm_backward(h_ND, w, rstd_N, dy_ND, dx_ND, dres_ND);
    // one gradient for x and a (the engine casts a's copy to a's dtype)
    auto dx = dx_ND.view(gy.sizes());
    return {dx, dx, dw, torch::Tensor(), torch::Tensor()};
  }
};

// The kernel's conditions on x and w, the switch aside.
bool rms_norm_kernel_fits(const torch::Tensor& x, const torch::Tensor& w) {
  return use_cuda_kernels(x) && x.dim() >= 1 && w.dim() == 1 && w.scalar_type() == torch::kFloat32 &&
         w.device() == x.device() && w.size(0) == x.size(-1) && x.size(-1) <= cuda_rms_norm_max_width();
}

bool add_operand_fits(const torch::Tensor& x, const torch::Tensor& a) {
  return a.device() == x.device() && a.sizes() == x.sizes() && rms_norm_dtype_pairs(a.scalar_type(), x.scalar_type());
}

}  // namespace

bool rms_norm_kernel_requested() {
  static const bool on = env_switch("MOECPT_RMSNORM_KERNEL", false);
  return on;
}

bool use_rms_norm_kernel(const torch::Tensor& x, const torch::Tensor& w) {
  return rms_norm_kernel_requested() && rms_norm_kernel_fits(x, w);
}

torch::Tensor rms_norm_kernel(const torch::Tensor& x, const torch::Tensor& w, double eps, NormOutDtype y_dtype) {
  if (!use_cuda_kernels(x))
    throw Error("rms_norm_kernel: needs an fp32 or bf16 CUDA tensor and a build with moecpt's CUDA kernels");
  return RmsNormCuda::apply(x, w.contiguous(), eps, y_dtype_for(x, y_dtype));
}

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps, NormOutDtype y_dtype) {
  return use_rms_norm_kernel(x, w) ? rms_norm_kernel(x, w, eps, y_dtype) : compat::rms_norm(x, w, eps);
}

bool add_rms_norm_kernel_requested() {
  static const bool on = env_switch("MOECPT_ADD_RMSNORM_KERNEL", false);
  return on;
}

bool use_add_rms_norm_kernel(const torch::Tensor& x, const torch::Tensor& a, const torch::Tensor& w) {
  return add_rms_norm_kernel_requested() && rms_norm_kernel_fits(x, w) && add_operand_fits(x, a);
}

std::pair<torch::Tensor, torch::Tensor> add_rms_norm_kernel(const torch::Tensor& x, const torch::Tensor& a,
                                                            const torch::Tensor& w, double eps, NormOutDtype y_dtype) {
  if (!use_cuda_kernels(x))
    throw Error("add_rms_norm_kernel: needs an fp32 or bf16 CUDA tensor and a build with moecpt's CUDA kernels");
  if (!add_operand_fits(x, a))
    throw Error("add_rms_norm_kernel: a must have x's shape and device, in x's dtype or bf16 with an fp32 x");
  auto outs = AddRmsNormCuda::apply(x, a, w.contiguous(), eps, y_dtype_for(x, y_dtype));
  return {outs[0], outs[1]};
}

std::pair<torch::Tensor, torch::Tensor> add_rms_norm(const torch::Tensor& x, const torch::Tensor& a,
                                                     const torch::Tensor& w, double eps, NormOutDtype y_dtype) {
  if (use_add_rms_norm_kernel(x, a, w)) return add_rms_norm_kernel(x, a, w, eps, y_dtype);
  auto h = x + a;
  return {h, rms_norm(h, w, eps, y_dtype)};
}

}  // namespace moecpt::model
