// The fused q/k rotation + q/k/v split (model/rotary_qkv.h) against a rotation
// written out by hand, autograd over the composite ops (apply_rotary), and
// finite differences.
#include <gtest/gtest.h>

#include <cmath>

#include "expect_error.h"
#include "gradcheck.h"

#include "core/error.h"
#include "model/rotary_qkv.h"
#include "model/torch_compat.h"

using namespace moecpt;
using namespace moecpt::model;
using moecpt::testing::expect_error_containing;
using moecpt::testing::expect_grad_matches_fd;

namespace {

// Sum of each output against its own random weight: a loss whose gradient
// reaches q, k and v with different upstream values.
struct Probe {
  torch::Tensor wq, wk, wv;
  torch::Tensor operator()(const RotatedQKV& o) const { return (o.q * wq).sum() + (o.k * wk).sum() + (o.v * wv).sum(); }
};

Probe make_probe(int64_t B, int64_t H, int64_t T, int64_t Dh, torch::ScalarType dt) {
  auto opts = torch::TensorOptions().dtype(dt);
  return {torch::randn({B, H, T, Dh}, opts), torch::randn({B, H, T, Dh}, opts), torch::randn({B, H, T, Dh}, opts)};
}

}  // namespace

TEST(RotaryQKV, RotatesEachPairByItsPositionsAngle) {
  // One head of size 4: pairs (x0, x2) at frequency θ^0 = 1 and (x1, x3) at
  // θ^(-1/2) = 0.01 (θ = 10^4); position t turns pair i by t·freq_i.
  const int64_t T = 3, H = 1, Dh = 4;
  auto rope = rotary_tables(T, Dh, 10000.0, torch::kCPU);
  auto qkv = torch::zeros({1, T, 3 * H * Dh}, torch::kFloat64);
  const double x[4] = {0.5, -1.0, 2.0, 0.25};
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < Dh; ++i) {
      qkv[0][t][i] = x[i];                // q
      qkv[0][t][Dh + i] = -x[i];          // k
      qkv[0][t][2 * Dh + i] = x[i] + t;  // v: passed through
    }
  auto out = rotary_qkv(qkv, H, rope);
  const double freq[2] = {1.0, 0.01};
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < 2; ++i) {
      const double c = std::cos(double(t) * freq[i]), s = std::sin(double(t) * freq[i]);
      const double y1 = x[i] * c - x[i + 2] * s, y2 = x[i + 2] * c + x[i] * s;
      EXPECT_NEAR(out.q[0][0][t][i].item<double>(), y1, 1e-6) << "t " << t << " pair " << i;
      EXPECT_NEAR(out.q[0][0][t][i + 2].item<double>(), y2, 1e-6) << "t " << t << " pair " << i;
      EXPECT_NEAR(out.k[0][0][t][i].item<double>(), -y1, 1e-6);
      EXPECT_NEAR(out.k[0][0][t][i + 2].item<double>(), -y2, 1e-6);
    }
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < Dh; ++i) EXPECT_EQ(out.v[0][0][t][i].item<double>(), x[i] + double(t));
}

TEST(RotaryQKV, EqualsAutogradOverTheCompositeOpsInValueAndGradient) {
  torch::manual_seed(11);
  const int64_t B = 2, T = 7, H = 3, Dh = 6;
  auto rope = rotary_tables(T, Dh, 10000.0, torch::kCPU);
  auto x0 = torch::randn({B, T, 3 * H * Dh}, torch::kFloat64);
  const auto probe = make_probe(B, H, T, Dh, torch::kFloat64);
  auto xf = x0.clone().requires_grad_(), xc = x0.clone().requires_grad_();
  auto fused = rotary_qkv(xf, H, rope), composite = rotary_qkv_composite(xc, H, rope);
  EXPECT_TRUE(fused.q.is_contiguous());
  EXPECT_TRUE(fused.k.is_contiguous());
  EXPECT_TRUE(torch::allclose(fused.q, composite.q, 0, 1e-14));
  EXPECT_TRUE(torch::allclose(fused.k, composite.k, 0, 1e-14));
  EXPECT_TRUE(torch::equal(fused.v, composite.v));
  probe(fused).backward();
  probe(composite).backward();
  EXPECT_TRUE(torch::allclose(xf.grad(), xc.grad(), 0, 1e-14))
      << "max |Δ| " << (xf.grad() - xc.grad()).abs().max().item<double>();
}

TEST(RotaryQKV, GradientMatchesFiniteDifferences) {
  torch::manual_seed(12);
  const int64_t B = 1, T = 4, H = 2, Dh = 4;
  auto rope = rotary_tables(T, Dh, 100.0, torch::kCPU);
  auto x = torch::randn({B, T, 3 * H * Dh}, torch::kFloat64).requires_grad_();
  const auto probe = make_probe(B, H, T, Dh, torch::kFloat64);
  auto f = [&] { return probe(rotary_qkv(x, H, rope)); };
  // entries in q (0, 5), k (9, 14), v (18, 23) of row 0 and q/k of the last row
  expect_grad_matches_fd(f, x, {0, 5, 9, 14, 18, 23, 3 * 24 + 2, 3 * 24 + 13}, "qkv");
}

TEST(RotaryQKV, OnlySomeOutputsUsedGivesZeroGradientToTheRest) {
  torch::manual_seed(13);
  const int64_t B = 2, T = 3, H = 2, Dh = 2;
  auto rope = rotary_tables(T, Dh, 10000.0, torch::kCPU);
  auto x = torch::randn({B, T, 3 * H * Dh}, torch::kFloat64).requires_grad_();
  auto out = rotary_qkv(x, H, rope);
  out.k.sum().backward();
  auto g = x.grad().view({B, T, 3, H, Dh});
  EXPECT_EQ(g.select(2, 0).abs().max().item<double>(), 0.0);
  EXPECT_EQ(g.select(2, 2).abs().max().item<double>(), 0.0);
  EXPECT_GT(g.select(2, 1).abs().min().item<double>(), 0.0);
}

TEST(RotaryQKV, Bfloat16StaysWithinRoundingOfTheCompositeOps) {
  // bf16 in and out (as under autocast). The fused path rounds once per
  // multiply-add where the composite rounds each product; both against fp64.
  torch::manual_seed(14);
  const int64_t B = 2, T = 16, H = 4, Dh = 8;
  auto rope = rotary_tables(T, Dh, 10000.0, torch::kCPU);
  auto x0 = torch::randn({B, T, 3 * H * Dh}, torch::kFloat64);
  const auto probe = make_probe(B, H, T, Dh, torch::kFloat64);
  auto exact = rotary_qkv_composite(x0, H, rope);
  auto xf = x0.to(torch::kBFloat16).requires_grad_(), xc = x0.to(torch::kBFloat16).requires_grad_();
  auto fused = rotary_qkv(xf, H, rope), composite = rotary_qkv_composite(xc, H, rope);
  EXPECT_EQ(fused.q.scalar_type(), torch::kBFloat16);
  auto err = [&](const torch::Tensor& a) { return (a.to(torch::kFloat64) - exact.q).abs().max().item<double>(); };
  EXPECT_LE(err(fused.q), 2 * err(composite.q));
  EXPECT_LT(err(fused.q), 0.05);
  auto to_bf16 = [](Probe p) {
    return Probe{p.wq.to(torch::kBFloat16), p.wk.to(torch::kBFloat16), p.wv.to(torch::kBFloat16)};
  };
  to_bf16(probe)(fused).backward();
  to_bf16(probe)(composite).backward();
  EXPECT_EQ(xf.grad().scalar_type(), torch::kBFloat16);
  const auto d = (xf.grad().to(torch::kFloat64) - xc.grad().to(torch::kFloat64)).abs().max().item<double>();
  EXPECT_LT(d, 0.05 * xc.grad().abs().max().to(torch::kFloat64).item<double>()) << d;
}

TEST(RotaryQKV, BadShapesAreRefusedByName) {
  auto rope = rotary_tables(5, 4, 10000.0, torch::kCPU);
  expect_error_containing([&] { rotary_qkv(torch::zeros({2, 5, 25}), 2, rope); }, "3·H·Dh");
  expect_error_containing([&] { rotary_qkv(torch::zeros({2, 5, 24}), 1, rope); }, "rotary tables must be [5, 4]");
  expect_error_containing([&] { rotary_qkv(torch::zeros({2, 6, 24}), 2, rope); }, "rotary tables must be [6, 2]");
  expect_error_containing([&] { rotary_qkv(torch::zeros({5, 24}), 2, rope); }, "3·H·Dh");
}
