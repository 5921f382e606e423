// Routers against hand computations and independent re-implementations.
#include <gtest/gtest.h>

#include "gradcheck.h"

#include <cmath>

#include "core/error.h"
#include "model/router.h"
#include "model/router_bias.h"
#include "model/router_sinkhorn.h"
#include "model/router_topk.h"

using namespace moecpt;
using namespace moecpt::model;

namespace {

ModelConfig moe_config(int64_t d, int64_t E, int64_t k) {
  ModelConfig mc;
  mc.d_model = d;
  mc.ffn = "moe";
  mc.n_experts = E;
  mc.top_k = k;
  mc.expert_hidden = 8;
  return mc;
}

// A router with W = I (d = E), so the input rows are the logits.
template <class R>
std::shared_ptr<R> identity_router(const RouterConfig& rc, int64_t E, int64_t k) {
  auto r = std::make_shared<R>(rc, moe_config(E, E, k));
  torch::NoGradGuard no_grad;
  r->weight_ED.copy_(torch::eye(E));
  return r;
}

}  // namespace

TEST(RouterTopK, AuxAndZLossMatchHandComputation) {
  RouterConfig rc;
  rc.aux_alpha = 0.01;
  rc.z_beta = 0.001;
  auto router = identity_router<TopKRouter>(rc, /*E=*/2, /*k=*/1);
  const double l3 = std::log(3.0);
  // softmax rows: (.75,.25) (.75,.25) (.25,.75) (.75,.25) → top-1 = 0,0,1,0
  auto z = torch::tensor({l3, 0.0, l3, 0.0, 0.0, l3, l3, 0.0}, torch::kFloat32).view({4, 2});
  auto r = router->route(z);

  EXPECT_TRUE(torch::equal(r.topk_ids_TK.view({-1}), torch::tensor({0, 0, 1, 0}, torch::kInt64)));
  EXPECT_TRUE(torch::equal(r.tokens_per_expert_E, torch::tensor({3, 1}, torch::kInt64)));
  EXPECT_TRUE(torch::allclose(r.gates_TK.view({-1}), torch::full({4}, 0.75f)));
  // f = (3/4, 1/4); P = (2.5/4, 1.5/4); aux = α·E·Σ f·P = 0.01·2·(0.46875 + 0.09375)
  EXPECT_NEAR(r.aux_loss.item<double>(), 0.01 * 2 * 0.5625, 1e-7);
  // every row: logsumexp = log(3 + 1) = log 4
  EXPECT_NEAR(r.z_loss.item<double>(), 0.001 * std::pow(std::log(4.0), 2), 1e-8);
  EXPECT_EQ(r.gates_TK.scalar_type(), torch::kFloat32);
  EXPECT_EQ(r.topk_ids_TK.scalar_type(), torch::kInt64);
  EXPECT_FALSE(r.sinkhorn_stats.defined());  // Sinkhorn did not run
}

TEST(RouterTopK, AuxGradientFlowsOnlyThroughMeanProbability) {
  RouterConfig rc;
  auto router = identity_router<TopKRouter>(rc, /*E=*/3, /*k=*/2);
  torch::manual_seed(0);
  auto z = torch::randn({5, 3}, torch::kFloat64).requires_grad_(true);
  auto r = router->route(z);
  auto g = torch::autograd::grad({r.aux_loss}, {z})[0];
  // Reference: f as a constant.
  auto z2 = z.detach().clone().requires_grad_(true);
  auto f = r.tokens_per_expert_E.to(torch::kFloat64) / (2.0 * 5);
  auto ref = rc.aux_alpha * 3 * (f * torch::softmax(z2, -1).mean(0)).sum();
  auto g_ref = torch::autograd::grad({ref}, {z2})[0];
  EXPECT_TRUE(torch::allclose(g, g_ref, 1e-10, 1e-12));
}

TEST(RouterTopK, RenormalizedGatesSumToOne) {
  RouterConfig rc;
  rc.renormalize = true;
  torch::manual_seed(1);
  auto router = std::make_shared<TopKRouter>(rc, moe_config(16, 6, 3));
  auto x = torch::randn({32, 16});
  auto r = router->route(x);
  EXPECT_TRUE(torch::allclose(r.gates_TK.sum(-1), torch::ones({32})));
  EXPECT_EQ(r.tokens_per_expert_E.sum().item<int64_t>(), 32 * 3);
  // ids, gates and counts against an independent computation
  auto p = torch::softmax(torch::matmul(x, router->weight_ED.t()), -1);
  auto [top_p, top_i] = p.topk(3, -1);
  EXPECT_TRUE(torch::equal(r.topk_ids_TK, top_i));
  EXPECT_TRUE(torch::allclose(r.gates_TK, top_p / top_p.sum(-1, true)));
  EXPECT_TRUE(torch::equal(r.tokens_per_expert_E, torch::bincount(top_i.reshape({-1}), {}, 6)));
}

TEST(RouterTopK, LogitsStayFp32UnderBf16Input) {
  RouterConfig rc;
  auto router = std::make_shared<TopKRouter>(rc, moe_config(8, 4, 2));
  auto r = router->route(torch::randn({6, 8}).to(torch::kBFloat16));
  EXPECT_EQ(router->weight_ED.scalar_type(), torch::kFloat32);
  EXPECT_EQ(r.gates_TK.scalar_type(), torch::kFloat32);
  EXPECT_EQ(r.scores_TE.scalar_type(), torch::kFloat32);
}

// Independent double-precision Sinkhorn, written from SPEC §3 with explicit loops.
static torch::Tensor reference_sinkhorn(const torch::Tensor& z_TE, double tol, int64_t max_iters) {
  auto z = z_TE.to(torch::kFloat64);
  const int64_t T = z.size(0), E = z.size(1);
  auto C = torch::exp(z);
  std::vector<double> d0(T, 1.0), d1(E, 1.0);
  auto Ca = C.accessor<double, 2>();
  for (int64_t it = 0; it < max_iters; ++it) {
    for (int64_t t = 0; t < T; ++t) {
      double s = 0;
      for (int64_t e = 0; e < E; ++e) s += Ca[t][e] * d1[e];
      d0[t] = (1.0 / T) / (s + 1e-8);
    }
    double err = 0;
    for (int64_t e = 0; e < E; ++e) {
      double s = 0;
      for (int64_t t = 0; t < T; ++t) s += Ca[t][e] * d0[t];
      double nd1 = (1.0 / E) / (s + 1e-8);
      err += std::abs(nd1 - d1[e]) / E;
      d1[e] = nd1;
    }
    if (err < tol) break;
  }
  auto S = C.clone();
  auto Sa = S.accessor<double, 2>();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t e = 0; e < E; ++e) Sa[t][e] = d0[t] * Ca[t][e] * d1[e];
  return S;
}

TEST(RouterSinkhorn, BalanceMatchesReferenceAndMarginals) {
  torch::manual_seed(2);
  const int64_t T = 64, E = 4;
  // Skewed scores: every token prefers expert 0 under plain top-k.
  auto z = torch::randn({T, E}) * 0.5 + torch::tensor({3.0f, 0.f, 0.f, 0.f});
  auto res = sinkhorn_balance(z, /*tol=*/1e-6, /*max_iters=*/500);
  auto S_ref = reference_sinkhorn(z, 1e-6, 500);
  EXPECT_TRUE(torch::allclose(res.S_TE.to(torch::kFloat64), S_ref, 1e-3, 1e-6));
  // Column sums are exactly 1/E after the d1 update; row sums 1/T at convergence.
  EXPECT_TRUE(torch::allclose(res.S_TE.sum(0), torch::full({E}, 1.0f / E), 1e-4, 1e-6));
  EXPECT_TRUE(torch::allclose(res.S_TE.sum(1), torch::full({T}, 1.0f / T), 1e-3, 1e-6));
  EXPECT_LT(res.error, 1e-6);
  EXPECT_GE(res.iters, 2);
}

TEST(RouterSinkhorn, TrainingChoiceIsBalancedGatesAreRawSoftmax) {
  RouterConfig rc;
  rc.sinkhorn_tol = 1e-4;
  rc.sinkhorn_max_iters = 200;
  const int64_t T = 256, E = 4, k = 2;
  auto router = identity_router<SinkhornRouter>(rc, E, k);
  router->train();
  torch::manual_seed(3);
  auto z = torch::randn({T, E}) + torch::tensor({2.0f, 1.0f, 0.f, 0.f});
  auto r = router->route(z);

  // Choice = top-k of the (independently computed) balanced matrix.
  auto S_ref = reference_sinkhorn(z, rc.sinkhorn_tol, rc.sinkhorn_max_iters);
  auto ids_ref = std::get<1>(S_ref.topk(k, -1));
  EXPECT_TRUE(torch::equal(std::get<0>(r.topk_ids_TK.sort(-1)), std::get<0>(ids_ref.sort(-1))));
  // Much more balanced than plain top-k, which sends every token's slots to 0 and 1 mostly.
  const auto max_load = r.tokens_per_expert_E.max().item<int64_t>();
  auto raw_ids = std::get<1>(z.topk(k, -1)).reshape({-1});
  const auto raw_max = torch::bincount(raw_ids, {}, E).max().item<int64_t>();
  EXPECT_LT(max_load, raw_max);
  EXPECT_LE(max_load, T * k / E * 3 / 2);
  // Gates: raw softmax at the chosen ids.
  auto p = torch::softmax(z, -1);
  EXPECT_TRUE(torch::allclose(r.gates_TK, p.gather(1, r.topk_ids_TK)));
  // Iterations and final error, as a device tensor for the trainer's one host copy per step.
  ASSERT_TRUE(r.sinkhorn_stats.defined());
  EXPECT_EQ(r.sinkhorn_stats.scalar_type(), torch::kFloat64);
  const auto sk_iters = int64_t(r.sinkhorn_stats[0].item<double>());
  const double sk_error = r.sinkhorn_stats[1].item<double>();
  EXPECT_EQ(double(sk_iters), r.sinkhorn_stats[0].item<double>());  // a whole count
  EXPECT_GE(sk_iters, 1);
  EXPECT_LE(sk_iters, rc.sinkhorn_max_iters);
  EXPECT_TRUE(sk_error < rc.sinkhorn_tol || sk_iters == rc.sinkhorn_max_iters);
  EXPECT_EQ(r.aux_loss.item<double>(), 0.0);
  EXPECT_EQ(r.z_loss.item<double>(), 0.0);
}

TEST(RouterSinkhorn, TopOneGatesAreSigmoid) {
  RouterConfig rc;
  auto router = identity_router<SinkhornRouter>(rc, /*E=*/3, /*k=*/1);
  router->train();
  auto z = torch::randn({10, 3});
  auto r = router->route(z);
  EXPECT_TRUE(torch::allclose(r.gates_TK, torch::sigmoid(z).gather(1, r.topk_ids_TK)));
}

TEST(RouterSinkhorn, EvalModeIsPlainTopK) {
  RouterConfig rc;
  auto router = identity_router<SinkhornRouter>(rc, /*E=*/4, /*k=*/2);
  router->eval();
  auto z = torch::randn({32, 4}) + torch::tensor({3.0f, 0.f, 0.f, 0.f});
  auto r = router->route(z);
  EXPECT_TRUE(torch::equal(r.topk_ids_TK, std::get<1>(z.topk(2, -1))));
  EXPECT_FALSE(r.sinkhorn_stats.defined());  // Sinkhorn did not run
  EXPECT_TRUE(torch::allclose(r.gates_TK, torch::softmax(z, -1).gather(1, r.topk_ids_TK)));
}

TEST(RouterBias, UpdateMovesBiasTowardUnderloadedExperts) {
  RouterConfig rc;
  rc.bias_gamma = 0.01;
  auto router = std::make_shared<BiasRouter>(rc, moe_config(8, 4, 1));
  EXPECT_EQ(router->parameters().size(), 1u);  // the bias is a buffer, not a parameter
  EXPECT_EQ(router->named_buffers().size(), 1u);
  router->update_bias(torch::tensor({10, 2, 6, 6}, torch::kInt64));  // mean 6
  EXPECT_TRUE(torch::allclose(router->expert_bias_E, torch::tensor({-0.01f, 0.01f, 0.f, 0.f})));
}

TEST(RouterBias, SelectionUsesBiasGatesDoNot) {
  RouterConfig rc;
  auto router = identity_router<BiasRouter>(rc, /*E=*/4, /*k=*/1);
  {
    torch::NoGradGuard no_grad;
    router->expert_bias_E.copy_(torch::tensor({0.f, 0.f, 0.f, 2.f}));  // > any sigmoid gap
  }
  auto z = torch::randn({16, 4});
  auto r = router->route(z);
  EXPECT_TRUE(torch::equal(r.topk_ids_TK, torch::full({16, 1}, 3, torch::kInt64)));
  EXPECT_TRUE(torch::allclose(r.gates_TK, torch::sigmoid(z).narrow(1, 3, 1)));
  EXPECT_EQ(r.tokens_per_expert_E[3].item<int64_t>(), 16);
}

TEST(RouterFactory, BuildsByTypeAndRejectsUnknown) {
  RouterConfig rc;
  auto mc = moe_config(8, 4, 2);
  rc.type = "topk";
  EXPECT_NE(std::dynamic_pointer_cast<TopKRouter>(make_router(rc, mc)), nullptr);
  rc.type = "sinkhorn";
  EXPECT_NE(std::dynamic_pointer_cast<SinkhornRouter>(make_router(rc, mc)), nullptr);
  rc.type = "bias";
  EXPECT_NE(std::dynamic_pointer_cast<BiasRouter>(make_router(rc, mc)), nullptr);
  rc.type = "hash";
  EXPECT_THROW(make_router(rc, mc), Error);
}

// ---- Balance at the optimum, gradients, skewed batches -------------------------------

TEST(RouterTopK, AuxLossEqualsAlphaAtPerfectlyUniformRouting) {
  // Circulant logits: token t scores expert e with a[(e - t) mod E]. Over E
  // consecutive tokens every expert sees every value of a once, so the mean
  // probability P_i = 1/E and every expert is chosen exactly k times in each
  // cycle: f_i = 1/E. Then α·E·Σ f_i P_i = α·E·E·(1/E²) = α.
  RouterConfig rc;
  rc.aux_alpha = 0.01;
  const int64_t E = 6, k = 2, cycles = 3;
  auto router = identity_router<TopKRouter>(rc, E, k);
  const std::vector<float> a = {2.0f, 1.3f, 0.4f, -0.2f, -0.9f, -1.5f};  // distinct: no ties in top-k
  auto z = torch::empty({cycles * E, E});
  for (int64_t t = 0; t < cycles * E; ++t)
    for (int64_t e = 0; e < E; ++e) z[t][e] = a[((e - t) % E + E) % E];
  auto r = router->route(z);
  EXPECT_TRUE(torch::equal(r.tokens_per_expert_E, torch::full({E}, cycles * k, torch::kInt64)));
  EXPECT_NEAR(r.aux_loss.item<double>(), rc.aux_alpha, 1e-9);

  // Any imbalance costs more: the same tokens all shifted onto expert 0 first.
  auto skewed = z.clone();
  skewed.select(1, 0).add_(5.0);
  EXPECT_GT(router->route(skewed).aux_loss.item<double>(), 1.5 * rc.aux_alpha);
}

namespace {

// Router gradients are smaller than the model's: a tighter absolute tolerance.
void expect_router_grad_matches_fd(const std::function<torch::Tensor()>& f, torch::Tensor p,
                                   const std::vector<int64_t>& flat_idx, const std::string& what) {
  moecpt::testing::expect_grad_matches_fd(f, p, flat_idx, what, 1e-7);
}

// Gradient check of one router in double precision: the gates weighted by a
// random R plus the router's own losses, w.r.t. its weight and its input. The
// discrete choice is locally constant, so the loss is smooth at a random point.
void check_router_gradients(Router& router, const std::string& what) {
  router.to(torch::kFloat64);
  torch::manual_seed(11);
  const int64_t T = 9, D = router.weight_ED.size(1);
  auto x = torch::randn({T, D}, torch::kFloat64).requires_grad_(true);
  auto R = torch::randn({T, router.top_k()}, torch::kFloat64);
  auto f = [&] {
    auto r = router.route(x);
    return (r.gates_TK * R).sum() + r.aux_loss + r.z_loss;
  };
  expect_router_grad_matches_fd(f, router.weight_ED, {0, 5, 13, 22}, what + " weight");
  expect_router_grad_matches_fd(f, x, {0, 7, 30, 44}, what + " input");
}

}  // namespace

TEST(RouterGradients, MatchFiniteDifferencesForEveryRouter) {
  for (const std::string type : {"topk", "sinkhorn", "bias"}) {
    for (int64_t k : {1, 2}) {
      RouterConfig rc;
      rc.type = type;
      rc.aux_alpha = 0.3;  // large, so the loss gradients are visible in the check
      rc.z_beta = 0.1;
      rc.renormalize = (k == 2);
      torch::manual_seed(10);
      auto router = make_router(rc, moe_config(/*d=*/6, /*E=*/4, k));
      router->train();
      check_router_gradients(*router, type + " k=" + std::to_string(k));
    }
  }
}

TEST(RouterSinkhorn, BalancesASkewedBatchWherePlainTopKDoesNot) {
  // Every token strongly prefers experts 0 and 1. MRI = max_i share of tokens
  // choosing i, from k/E (balanced) to 1 (SPEC §5).
  const int64_t T = 512, E = 8, k = 2;
  torch::manual_seed(12);
  auto z = torch::randn({T, E}) + torch::tensor({4.0f, 3.0f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f});
  auto mri = [&](const torch::Tensor& tokens_per_expert_E) {
    return tokens_per_expert_E.max().item<double>() / double(T);
  };
  const double balanced = double(k) / double(E);

  RouterConfig topk_rc;
  auto topk = identity_router<TopKRouter>(topk_rc, E, k);
  const double mri_topk = mri(topk->route(z).tokens_per_expert_E);
  EXPECT_GT(mri_topk, 0.9);  // nearly every token picks expert 0

  RouterConfig rc;
  rc.sinkhorn_tol = 1e-4;
  rc.sinkhorn_max_iters = 1000;
  auto sinkhorn = identity_router<SinkhornRouter>(rc, E, k);
  sinkhorn->train();
  auto r = sinkhorn->route(z);
  const double mri_sinkhorn = mri(r.tokens_per_expert_E);
  EXPECT_LT(mri_sinkhorn, 1.25 * balanced) << "plain top-k MRI " << mri_topk;
  EXPECT_GE(mri_sinkhorn, balanced);
  // The same router at evaluation is plain top-k, as unbalanced as the top-k router.
  sinkhorn->eval();
  EXPECT_NEAR(mri(sinkhorn->route(z).tokens_per_expert_E), mri_topk, 1e-12);
}
