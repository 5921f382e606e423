// The fused output head + cross-entropy (model/fused_ce.h) against the unfused
// reference (logits = x Wᵀ, then cross_entropy), and finite differences.
#include <gtest/gtest.h>

#include <iostream>

#include "gradcheck.h"

#include "core/error.h"
#include "model/cuda_kernels.h"
#include "model/fused_ce.h"
#include "model/torch_compat.h"
#include "model/transformer.h"

using namespace moecpt;
using namespace moecpt::model;

namespace {

torch::Tensor reference_ce(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& t) {
  return torch::cross_entropy_loss(torch::mm(x, w.t()), t);
}

}  // namespace

TEST(FusedLinearCrossEntropy, LossAndGradientsEqualUnfusedForEveryChunking) {
  torch::manual_seed(3);
  const int64_t N = 37, D = 8, V = 29;
  auto x0 = torch::randn({N, D}, torch::kFloat64), w0 = torch::randn({V, D}, torch::kFloat64);
  auto t = torch::randint(V, {N}, torch::kInt64);
  auto xr = x0.clone().requires_grad_(), wr = w0.clone().requires_grad_();
  auto ref = reference_ce(xr, wr, t);
  ref.backward();
  // 1 thread: chunks in order; 2 and 3: chunks split over threads, each with
  // its own loss and dL/dW (summed after), including more threads than chunks.
  const int threads_before = torch::get_num_threads();
  for (int threads : {1, 2, 3})
    for (int64_t chunk : {1, 5, 16, 37, 100, 0}) {
      torch::set_num_threads(threads);
      auto x = x0.clone().requires_grad_(), w = w0.clone().requires_grad_();
      auto loss = fused_linear_cross_entropy(x, w, t, chunk);
      EXPECT_NEAR(loss.item<double>(), ref.item<double>(), 1e-12) << "chunk " << chunk << " threads " << threads;
      (2.5 * loss).backward();  // the incoming gradient scales both
      EXPECT_TRUE(torch::allclose(x.grad(), 2.5 * xr.grad(), 1e-12, 1e-12)) << "chunk " << chunk << " threads " << threads;
      EXPECT_TRUE(torch::allclose(w.grad(), 2.5 * wr.grad(), 1e-12, 1e-12)) << "chunk " << chunk << " threads " << threads;
    }
  torch::set_num_threads(threads_before);
  // Without grad mode: the same loss, no graph.
  torch::NoGradGuard no_grad;
  auto loss = fused_linear_cross_entropy(x0, w0, t, 7);
  EXPECT_NEAR(loss.item<double>(), ref.item<double>(), 1e-12);
  EXPECT_FALSE(loss.requires_grad());
}

TEST(FusedLinearCrossEntropy, HandComputedValue) {
  // x = [1, 0], w rows (1,0),(0,1),(−1,0) → logits (1, 0, −1); target 1:
  // loss = log(e + 1 + 1/e) − 0.
  auto x = torch::tensor({{1.0, 0.0}}, torch::kFloat64);
  auto w = torch::tensor({{1.0, 0.0}, {0.0, 1.0}, {-1.0, 0.0}}, torch::kFloat64);
  auto t = torch::tensor({1}, torch::kInt64);
  EXPECT_NEAR(fused_linear_cross_entropy(x, w, t).item<double>(), std::log(std::exp(1.0) + 1.0 + std::exp(-1.0)),
              1e-12);
}

TEST(FusedLinearCrossEntropy, GradientsMatchFiniteDifferences) {
  torch::manual_seed(4);
  auto x = torch::randn({9, 5}, torch::kFloat64).requires_grad_();
  auto w = torch::randn({11, 5}, torch::kFloat64).requires_grad_();
  auto t = torch::randint(11, {9}, torch::kInt64);
  auto f = [&] { return fused_linear_cross_entropy(x, w, t, 4); };
  moecpt::testing::expect_grad_matches_fd(f, x, {0, 7, 23, 44}, "x");
  moecpt::testing::expect_grad_matches_fd(f, w, {0, 13, 31, 54}, "w");
}

TEST(FusedLinearCrossEntropy, Bf16AutocastIsCloseToFp32) {
  torch::manual_seed(5);
  auto x = torch::randn({64, 32}), w = torch::randn({100, 32}) * 0.2;
  auto t = torch::randint(100, {64}, torch::kInt64);
  const double ref = reference_ce(x, w, t).item<double>();
  compat::Autocast autocast(torch::kCPU);
  auto xr = x.clone().requires_grad_(), wr = w.clone().requires_grad_();
  auto loss = fused_linear_cross_entropy(xr, wr, t);
  EXPECT_EQ(loss.scalar_type(), torch::kFloat32);
  EXPECT_NEAR(loss.item<double>(), ref, 0.02 * ref);
  loss.backward();
  EXPECT_EQ(xr.grad().scalar_type(), torch::kFloat32);
  EXPECT_EQ(wr.grad().scalar_type(), torch::kFloat32);
  // The gradients too, against the fp32 reference (bf16 products: ~1 %).
  auto x32 = x.clone().requires_grad_(), w32 = w.clone().requires_grad_();
  {
    compat::NoAutocast off;
    reference_ce(x32, w32, t).backward();
  }
  auto rel = [](const torch::Tensor& a, const torch::Tensor& b) { return ((a - b).norm() / b.norm()).item<double>(); };
  EXPECT_LT(rel(xr.grad(), x32.grad()), 0.02);
  EXPECT_LT(rel(wr.grad(), w32.grad()), 0.02);
}

TEST(FusedLinearCrossEntropy, ConfidentRowsKeepTheirSmallGradientUnderBf16) {
  // Row n: logit 11 for its target n, 0 for the other V − 1 = 63 classes, so
  // p_t = 1 / (1 + 63 e^−11) ≈ 1 − 1.05e-3 and the target's gradient entry is
  // p_t − 1 ≈ −1.05e-3. bf16 has steps of 2^-8 just below 1: exp to bf16 and
  // then − 1 would give 0 (or −3.9e-3). The head takes expm1 of the fp32
  // log-probability instead. 11 and 1 are exact in bf16.
  const int64_t N = 8, V = 64;
  auto x = torch::eye(N);
  auto w = torch::zeros({V, N});
  for (int64_t n = 0; n < N; ++n) w[n][n] = 11.0;
  auto t = torch::arange(N, torch::kInt64);
  auto xr = x.to(torch::kFloat64).requires_grad_();
  reference_ce(xr, w.to(torch::kFloat64), t).backward();
  compat::Autocast autocast(torch::kCPU);
  auto xb = x.clone().requires_grad_();
  fused_linear_cross_entropy(xb, w, t).backward();
  // dL/dx_n = Σ_v g_nv w_v / N; column n is non-zero only in w_n: g_nn · 11 / N
  for (int64_t n = 0; n < N; ++n) {
    const double want = xr.grad()[n][n].item<double>(), got = xb.grad()[n][n].item<double>();
    EXPECT_NEAR(want, -1.05e-3 * 11.0 / double(N), 0.02e-3 * 11.0 / double(N));
    EXPECT_NEAR(got, want, 0.01 * std::abs(want)) << "row " << n;
  }
}

// The GPU path (bf16 autocast, GPU chunking, fp32 logits from the matmul where
// LibTorch has mm.dtype_out) against the CPU fp64 reference. Skipped without
// a CUDA device; scripts/gpu-check.sh runs the suite on the GPU machine.
TEST(FusedLinearCrossEntropy, OnCudaUnderAutocastMatchesTheFp64Reference) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "needs a CUDA device";
  torch::manual_seed(6);
  const int64_t N = 300, D = 64, V = 5000;
  auto x = torch::randn({N, D}, torch::kFloat64), w = torch::randn({V, D}, torch::kFloat64) * 0.3;
  auto t = torch::randint(V, {N}, torch::kInt64);
  auto xr = x.clone().requires_grad_(), wr = w.clone().requires_grad_();
  auto ref = reference_ce(xr, wr, t);
  ref.backward();
  auto rel = [](const torch::Tensor& a, const torch::Tensor& b) {
    return ((a.to(torch::kCPU, torch::kFloat64) - b).norm() / b.norm()).item<double>();
  };
  for (int64_t chunk : {0, 128}) {  // 0: the GPU default (one chunk here); 128: three chunks
    auto xc = x.to(torch::kCUDA, torch::kFloat32).requires_grad_();
    auto wc = w.to(torch::kCUDA, torch::kFloat32).requires_grad_();
    torch::Tensor loss;
    {
      compat::Autocast autocast(torch::kCUDA);
      loss = fused_linear_cross_entropy(xc, wc, t.to(torch::kCUDA), chunk);
    }
    loss.backward();
    std::cout << "chunk " << chunk << ": fp32 logits from the matmul: " << fused_head_fp32_logits()
              << "; dL/dW accumulated by addmm.dtype_out: " << fused_head_fp32_dw()
              << "; cross-entropy kernel: " << fused_head_ce_kernel() << "\n";
    // Where LibTorch writes fp32 logits from the matmul it has addmm.dtype_out
    // too (both came with 2.x's mixed-dtype GEMMs): neither may have fallen back.
    EXPECT_EQ(fused_head_fp32_dw(), fused_head_fp32_logits()) << "chunk " << chunk;
    EXPECT_EQ(fused_head_ce_kernel(), cuda_kernels_enabled()) << "chunk " << chunk;
    EXPECT_NEAR(loss.item<double>(), ref.item<double>(), 0.01 * ref.item<double>()) << "chunk " << chunk;
    EXPECT_LT(rel(xc.grad(), xr.grad()), 0.03) << "chunk " << chunk;
    EXPECT_LT(rel(wc.grad(), wr.grad()), 0.03) << "chunk " << chunk;
  }
}

TEST(FusedLinearCrossEntropy, TransformerForwardLossEqualsLogitsPath) {
  for (bool tied : {false, true}) {
    ModelConfig mc;
    mc.vocab_size = 50;
    mc.d_model = 16;
    mc.n_layers = 2;
    mc.n_heads = 2;
    mc.seq_len = 10;
    mc.ffn_hidden = 24;
    mc.ffn = "moe";
    mc.n_experts = 4;
    mc.n_shared_experts = 1;
    mc.top_k = 2;
    mc.expert_hidden = 8;
    mc.tie_embeddings = tied;
    torch::manual_seed(6);
    Transformer model(mc, RouterConfig{});
    model->to(torch::kFloat64);
    auto tokens = torch::randint(mc.vocab_size, {3, mc.seq_len + 1}, torch::kInt64);
    auto in = tokens.narrow(1, 0, mc.seq_len), tgt = tokens.narrow(1, 1, mc.seq_len);

    auto ref_out = model(in);
    auto ref = torch::cross_entropy_loss(ref_out.logits_BTV.reshape({-1, mc.vocab_size}), tgt.reshape({-1}));
    (ref + ref_out.aux_loss).backward();
    std::vector<torch::Tensor> ref_grads;
    for (auto& p : model->parameters()) ref_grads.push_back(p.grad().clone());
    model->zero_grad();

    auto out = forward_loss(*model, in, tgt);
    EXPECT_NEAR(out.lm_loss.item<double>(), ref.item<double>(), 1e-12) << "tied " << tied;
    EXPECT_NEAR(out.aux_loss.item<double>(), ref_out.aux_loss.item<double>(), 1e-12);
    ASSERT_EQ(out.routing.size(), ref_out.routing.size());
    (out.lm_loss + out.aux_loss).backward();
    auto params = model->parameters();
    for (size_t i = 0; i < params.size(); ++i)
      EXPECT_TRUE(torch::allclose(params[i].grad(), ref_grads[i], 1e-9, 1e-12)) << "param " << i << " tied " << tied;
  }
}

TEST(FusedLinearCrossEntropy, ChunkRowsFollowTheDeviceAndTheOverride) {
  ::unsetenv("MOECPT_CE_CHUNK_ROWS");
  // CPU: 2^21 logits per chunk, at least 256 rows; GPU: 2^28 logits (1 GiB fp32).
  EXPECT_EQ(default_ce_chunk_rows(torch::kCPU, 8192), 256);
  EXPECT_EQ(default_ce_chunk_rows(torch::kCPU, 1024), 2048);
  EXPECT_EQ(default_ce_chunk_rows(torch::Device(torch::kCUDA, 0), 128256), (int64_t(1) << 28) / 128256);
  EXPECT_EQ(default_ce_chunk_rows(torch::Device(torch::kCUDA, 0), 1 << 22), 256);
  ::setenv("MOECPT_CE_CHUNK_ROWS", "7", 1);
  EXPECT_EQ(default_ce_chunk_rows(torch::kCPU, 8192), 7);
  // the override changes only how the rows are split, not the loss
  torch::manual_seed(5);
  auto x = torch::randn({37, 8}, torch::kFloat64), w = torch::randn({29, 8}, torch::kFloat64);
  auto t = torch::randint(29, {37}, torch::kInt64);
  EXPECT_NEAR(fused_linear_cross_entropy(x, w, t).item<double>(), reference_ce(x, w, t).item<double>(), 1e-12);
  for (const char* bad : {"0", "-3", "12x", "many"}) {
    ::setenv("MOECPT_CE_CHUNK_ROWS", bad, 1);
    try {
      default_ce_chunk_rows(torch::kCPU, 8192);
      ADD_FAILURE() << "accepted MOECPT_CE_CHUNK_ROWS=" << bad;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("MOECPT_CE_CHUNK_ROWS"), std::string::npos) << e.what();
    }
  }
  ::unsetenv("MOECPT_CE_CHUNK_ROWS");
}
