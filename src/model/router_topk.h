// Top-k softmax router with auxiliary losses ("Z+Aux", the paper's PBTk; SPEC §3).
#pragma once
#include "model/router.h"

namespace moecpt::model {

class TopKRouter : public Router {
 public:
  TopKRouter(const RouterConfig& rc, const ModelConfig& mc);
  // p = softmax(z); ids = top-k of p; gates = p at ids;
  // aux = α·E·Σ_i f_i·P_i (f_i = count_i/(k·T), no gradient; P_i = mean_x p_i(x));
  // z   = β·mean_x (logsumexp_j z_j(x))².
  RoutingInfo route(const torch::Tensor& x_TD) override;

 private:
  double aux_alpha_;
  double z_beta_;
};

}  // namespace moecpt::model
