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

TEST(RotaryQKV, SeqMajorLayoutHasTheSameValuesAndGradients) {
  // The layout changes where q and k live, not what they hold: bit-equal values
  // and input gradients, in fp64 and in bf16 (the same roundings in the same
  // order), and q, k are transposed views of contiguous [B, T, H, Dh].
  torch::manual_seed(15);
  const int64_t B = 2, T = 5, H = 3, Dh = 4;
  auto rope = rotary_tables(T, Dh, 10000.0, torch::kCPU);
  for (auto dt : {torch::kFloat64, torch::kBFloat16}) {
    auto x0 = torch::randn({B, T, 3 * H * Dh}, torch::kFloat64).to(dt);
    const auto probe = make_probe(B, H, T, Dh, dt);
    auto xh = x0.clone().requires_grad_(), xs = x0.clone().requires_grad_();
    auto head = rotary_qkv(xh, H, rope, QKVLayout::kHeadMajor), seq = rotary_qkv(xs, H, rope, QKVLayout::kSeqMajor);
    EXPECT_TRUE(head.q.is_contiguous());
    EXPECT_FALSE(seq.q.is_contiguous());
    EXPECT_TRUE(seq.q.transpose(1, 2).is_contiguous());
    EXPECT_TRUE(seq.k.transpose(1, 2).is_contiguous());
    EXPECT_EQ(seq.q.sizes(), head.q.sizes());
    EXPECT_TRUE(torch::equal(seq.q, head.q));
    EXPECT_TRUE(torch::equal(seq.k, head.k));
    EXPECT_TRUE(torch::equal(seq.v, head.v));
    // the attention output's [B, T, H·Dh] view: free for seq-major q
    probe(head).backward();
    probe(seq).backward();
    EXPECT_TRUE(torch::equal(xs.grad(), xh.grad())) << torch::toString(dt);
  }
  // the gradient checked against finite differences through the new layout too
  auto x = torch::randn({1, 4, 3 * 2 * 4}, torch::kFloat64).requires_grad_();
  auto rope4 = rotary_tables(4, 4, 100.0, torch::kCPU);
  const auto probe = make_probe(1, 2, 4, 4, torch::kFloat64);
  expect_grad_matches_fd([&] { return probe(rotary_qkv(x, 2, rope4, QKVLayout::kSeqMajor)); }, x,
                         {0, 5, 9, 14, 18, 23, 3 * 24 + 2, 3 * 24 + 13}, "qkv (seq-major)");
}

TEST(RotaryQKV, SeqMajorAttentionOutputIsSeqMajorOnAGpu) {
  // What the layout is for: LibTorch 2.x's fused attention returns its output
  // in q's layout (cuDNN) or seq-major (flash, memory-efficient), so the
  // out-projection's [B, T, H·Dh] view of it is free. Same values and
  // gradients as head-major, within bf16 rounding.
  if (!torch::cuda::is_available()) GTEST_SKIP() << "needs a CUDA device";
  torch::manual_seed(16);
  const int64_t B = 2, T = 128, H = 4, Dh = 64;
  auto opts = torch::TensorOptions().dtype(torch::kBFloat16).device(torch::kCUDA);
  auto r = rotary_tables(T, Dh, 10000.0, torch::kCUDA);
  RotaryTables rope{r.cos_TR.to(opts), r.sin_TR.to(opts)};
  auto x0 = torch::randn({B, T, 3 * H * Dh}, opts);
  auto w = torch::randn({B, T, H * Dh}, opts);
  std::vector<torch::Tensor> y, dx;
  for (auto layout : {QKVLayout::kHeadMajor, QKVLayout::kSeqMajor}) {
    auto x = x0.clone().requires_grad_();
    const auto out = rotary_qkv(x, H, rope, layout);
    auto o = compat::causal_attention(out.q, out.k, out.v);
    if (layout == QKVLayout::kSeqMajor && MOECPT_TORCH_AT_LEAST(2, 0)) {
      EXPECT_TRUE(o.transpose(1, 2).is_contiguous()) << "the output's strides: " << o.strides();
    }
    auto flat = o.transpose(1, 2).reshape({B, T, H * Dh});
    (flat.to(torch::kFloat32) * w.to(torch::kFloat32)).sum().backward();
    y.push_back(flat.detach().to(torch::kFloat32));
    dx.push_back(x.grad().to(torch::kFloat32));
  }
  auto rel = [](const torch::Tensor& a, const torch::Tensor& b) {
    return (a - b).abs().max().item<double>() / std::max(1e-30, b.abs().max().item<double>());
  };
  EXPECT_LT(rel(y[1], y[0]), 1e-2);
  EXPECT_LT(rel(dx[1], dx[0]), 2e-2);
}

TEST(RotaryQKV, LayoutSwitchIsParsedAndCpuStaysHeadMajor) {
  EXPECT_EQ(parse_qkv_layout(nullptr), QKVLayout::kHeadMajor);
  EXPECT_EQ(parse_qkv_layout(""), QKVLayout::kHeadMajor);
  EXPECT_EQ(parse_qkv_layout("head_major"), QKVLayout::kHeadMajor);
  EXPECT_EQ(parse_qkv_layout("seq_major"), QKVLayout::kSeqMajor);
  expect_error_containing([] { parse_qkv_layout("BSHD"); }, "MOECPT_QKV_LAYOUT='BSHD'");
  EXPECT_EQ(qkv_layout_for(torch::Device(torch::kCPU)), QKVLayout::kHeadMajor);  // whatever the variable says
  EXPECT_STREQ(qkv_layout_name(QKVLayout::kSeqMajor), "seq_major");
}

TEST(RotaryQKV, BadShapesAreRefusedByName) {
  auto rope = rotary_tables(5, 4, 10000.0, torch::kCPU);
  expect_error_containing([&] { rotary_qkv(torch::zeros({2, 5, 25}), 2, rope); }, "3·H·Dh");
  expect_error_containing([&] { rotary_qkv(torch::zeros({2, 5, 24}), 1, rope); }, "rotary tables must be [5, 4]");
  expect_error_containing([&] { rotary_qkv(torch::zeros({2, 6, 24}), 2, rope); }, "rotary tables must be [6, 2]");
  expect_error_containing([&] { rotary_qkv(torch::zeros({5, 24}), 2, rope); }, "3·H·Dh");
}
