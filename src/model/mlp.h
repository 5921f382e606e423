// Gated MLP (Shazeer 2020): y = (act(x W1) ⊙ x W3) W2, act = GeLU (GeGLU) or
// SiLU (SwiGLU). The dense FFN and the shared experts of an MoE layer.
#pragma once
#include "core/pch.h"
#include "model/expert_ffn.h"

namespace moecpt::model {

using Activation = torch::Tensor (*)(const torch::Tensor&);
// "geglu" → exact (erf) GeLU, "swiglu" → SiLU; throws moecpt::Error otherwise.
Activation activation_by_name(const std::string& name);

class GatedMLPImpl : public torch::nn::Module {
 public:
  // w1, w3 ~ N(0, init_std); w2 (the residual-out projection) ~ N(0, out_std).
  GatedMLPImpl(int64_t d_model, int64_t hidden, const std::string& activation, double init_std,
               double out_std);
  torch::Tensor forward(const torch::Tensor& x_ND);  // any leading dims

  torch::nn::Linear w1{nullptr}, w3{nullptr}, w2{nullptr};  // no biases

 private:
  GatedActivation act_;
};
TORCH_MODULE(GatedMLP);

}  // namespace moecpt::model
