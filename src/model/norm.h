// Pre-norm layer, RMSNorm or LayerNorm by ModelConfig.norm. Header-only: it is
// two lines of maths and every block owns two of them.
#pragma once
#include "core/error.h"
#include "core/pch.h"
#include "model/rms_norm.h"
#include "model/torch_compat.h"

namespace moecpt::model {

class NormImpl : public torch::nn::Module {
 public:
  NormImpl(const std::string& kind, int64_t d_model, double eps) : eps_(eps) {
    if (kind != "rmsnorm" && kind != "layernorm") throw Error("model.norm: unknown norm '" + kind + "'");
    weight_D = register_parameter("weight", torch::ones({d_model}));
    // LayerNorm has a bias, RMSNorm does not (Llama): counts differ, see flops.cpp.
    if (kind == "layernorm") bias_D = register_parameter("bias", torch::zeros({d_model}));
  }
  torch::Tensor forward(const torch::Tensor& x_BTD) {
    if (!bias_D.defined()) return rms_norm(x_BTD, weight_D, eps_, out_dtype(x_BTD));  // model/rms_norm.h
    // In fp32 (LibTorch 1.13's CPU kernel wants x and the weights in one dtype),
    // back in the stream's dtype (bf16 with run.residual_dtype = "bfloat16").
    return torch::layer_norm(x_BTD.to(weight_D.scalar_type()), {weight_D.size(0)}, weight_D, bias_D, eps_)
        .to(x_BTD.scalar_type());
  }
  // A pre-norm block's residual add and this norm: {h, norm(h)} with h = x + a
  // (RMSNorm: one fused Function on CUDA when switched on, model/rms_norm.h).
  std::pair<torch::Tensor, torch::Tensor> add_forward(const torch::Tensor& x_BTD, const torch::Tensor& a_BTD) {
    if (!bias_D.defined()) return add_rms_norm(x_BTD, a_BTD, weight_D, eps_, out_dtype(x_BTD));
    auto h_BTD = x_BTD + a_BTD;
    return {h_BTD, forward(h_BTD)};
  }

  torch::Tensor weight_D, bias_D;
  // Set on a norm whose one reader is a matmul (the attention's): under autocast
  // its RMSNorm kernel path then writes bf16, the dtype autocast would cast to.
  bool feeds_a_matmul = false;

 private:
  NormOutDtype out_dtype(const torch::Tensor& x) const {
    return feeds_a_matmul && compat::autocast_enabled(x.device()) ? NormOutDtype(torch::kBFloat16) : NormOutDtype();
  }
  double eps_;
};
TORCH_MODULE(Norm);

}  // namespace moecpt::model
