#include "model/mlp.h"

#include "core/error.h"
#include "model/expert_ffn.h"

namespace moecpt::model {

namespace {
torch::Tensor gelu(const torch::Tensor& x) { return torch::gelu(x); }
torch::Tensor silu(const torch::Tensor& x) { return torch::silu(x); }

torch::nn::Linear make_linear(int64_t in, int64_t out, double std) {
  torch::nn::Linear lin(torch::nn::LinearOptions(in, out).bias(false));
  torch::NoGradGuard no_grad;
  lin->weight.normal_(0.0, std);
  return lin;
}
}  // namespace

Activation activation_by_name(const std::string& name) {
  static const std::map<std::string, Activation> table = {{"geglu", &gelu}, {"swiglu", &silu}};
  auto it = table.find(name);
  if (it == table.end()) throw Error("model.activation: unknown activation '" + name + "'");
  return it->second;
}

GatedMLPImpl::GatedMLPImpl(int64_t d_model, int64_t hidden, const std::string& activation,
                           double init_std, double out_std)
    : act_(gated_activation_by_name(activation)) {
  w1 = register_module("w1", make_linear(d_model, hidden, init_std));
  w3 = register_module("w3", make_linear(d_model, hidden, init_std));
  w2 = register_module("w2", make_linear(hidden, d_model, out_std));
}

torch::Tensor GatedMLPImpl::forward(const torch::Tensor& x_ND) {
  // One Function with a hand-written backward (model/expert_ffn.h): w1|w3 in
  // one matmul, rows split over the CPU's threads.
  return gated_mlp(x_ND, w1->weight, w3->weight, w2->weight, act_);
}

}  // namespace moecpt::model
