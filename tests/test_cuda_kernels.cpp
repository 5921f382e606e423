// The gated activation's autograd node (model/expert_ffn.h: gated_activation)
// against autograd over act() and mul, and finite differences; moecpt's CUDA
// kernels (model/cuda_kernels.h) against fp64 references computed on the CPU
// from the same (rounded) inputs. The GPU tests skip without a CUDA device or
// a build without the kernels (CI); scripts/gpu-check.sh runs them.
#include <gtest/gtest.h>

#include <cmath>

#include "expect_error.h"
#include "gradcheck.h"

#include "model/cuda_kernels.h"
#include "model/expert_ffn.h"
#include "model/moe_slots.h"
#include "model/norm.h"
#include "model/rms_norm.h"
#include "model/rotary_qkv.h"
#include "model/router_sinkhorn.h"

using namespace moecpt;
using namespace moecpt::model;
using moecpt::testing::expect_error_containing;
using moecpt::testing::expect_grad_matches_fd;

namespace {

torch::Tensor act_of(const torch::Tensor& x, GatedActivation act) {
  return act == GatedActivation::kGelu ? torch::gelu(x) : torch::silu(x);
}

// a = act(h1) ⊙ h3 through autograd's own ops.
torch::Tensor composite(const torch::Tensor& h13, GatedActivation act) {
  const int64_t H = h13.size(1) / 2;
  return act_of(h13.narrow(1, 0, H), act) * h13.narrow(1, H, H);
}

// fp64 reference of the forward and of the backward for upstream da (CPU).
struct GatedRef {
  torch::Tensor a, dh13;
};
GatedRef gated_reference(const torch::Tensor& h13, const torch::Tensor& da, GatedActivation act) {
  auto x = h13.to(torch::kCPU, torch::kFloat64).detach().requires_grad_(true);
  auto a = composite(x, act);
  a.backward(da.to(torch::kCPU, torch::kFloat64));
  return {a.detach(), x.grad()};
}

// max |got − ref| / max |ref|, got moved to the CPU in fp64.
double rel_err(const torch::Tensor& got, const torch::Tensor& ref) {
  auto g = got.to(torch::kCPU, torch::kFloat64);
  return (g - ref).abs().max().item<double>() / std::max(1e-30, ref.abs().max().item<double>());
}

bool gpu_kernels() { return torch::cuda::is_available() && cuda_kernels_compiled(); }

}  // namespace

TEST(GatedActivation, MatchesAutogradOverTheCompositeOps) {
  torch::manual_seed(3);
  for (auto act : {GatedActivation::kGelu, GatedActivation::kSilu}) {
    auto h13 = torch::randn({7, 10}, torch::kFloat64).requires_grad_(true);
    auto w = torch::randn({7, 5}, torch::kFloat64);
    auto a = gated_activation(h13, act);
    auto ref = composite(h13, act);
    EXPECT_LT((a - ref).abs().max().item<double>(), 1e-15);
    auto g = torch::autograd::grad({(a * w).sum()}, {h13})[0];
    auto g_ref = torch::autograd::grad({(ref * w).sum()}, {h13})[0];
    EXPECT_LT((g - g_ref).abs().max().item<double>(), 1e-14) << (act == GatedActivation::kGelu ? "gelu" : "silu");
  }
}

TEST(GatedActivation, GradientsMatchFiniteDifferences) {
  torch::manual_seed(4);
  auto h13 = torch::randn({4, 6}, torch::kFloat64).requires_grad_(true);
  auto w = torch::randn({4, 3}, torch::kFloat64);
  for (auto act : {GatedActivation::kGelu, GatedActivation::kSilu})
    expect_grad_matches_fd([&] { return (gated_activation(h13, act) * w).sum(); }, h13, {0, 2, 4, 9, 17, 23},
                           "h13");
}

// fp32 at the mini and paper models' expert widths (h_e = 88, 352, 704), where
// ATen's vectorised CPU kernels run: against the fp64 composite. It guards the
// CPU path's layouts: LibTorch 1.13's gelu_backward writes a strided out as if it
// were contiguous when its inputs are contiguous, and an out= into dh13's column
// slice from a contiguous copy of h1 gave errors of order 1 here.
TEST(GatedActivation, Fp32AtModelWidthsMatchesAnFp64Reference) {
  torch::manual_seed(6);
  for (const int64_t H : {88, 352, 704})
    for (auto act : {GatedActivation::kGelu, GatedActivation::kSilu}) {
      auto h13 = torch::randn({37, 2 * H}).requires_grad_(true);
      auto da = torch::randn({37, H});
      auto a = gated_activation(h13, act);
      a.backward(da);
      const auto ref = gated_reference(h13.detach(), da, act);
      const char* name = act == GatedActivation::kGelu ? "gelu" : "silu";
      EXPECT_LT(rel_err(a, ref.a), 1e-6) << name << " H " << H;
      EXPECT_LT(rel_err(h13.grad(), ref.dh13), 1e-6) << name << " H " << H;
    }
}

TEST(GatedActivation, RefusesAnOddWidth) {
  expect_error_containing([] { gated_activation(torch::randn({3, 5}), GatedActivation::kGelu); },
                          "gated_activation: need [rows, 2H]");
}

// concat_last_as (the grouped experts' w1 | w3 under autocast) equals cat of
// the casts, forward and backward, in fp64 and into bf16; FD in fp64.
TEST(GatedActivation, ConcatLastAsEqualsCatOfTheCasts) {
  torch::manual_seed(5);
  for (auto dt : {torch::kFloat64, torch::kBFloat16}) {
    auto a = torch::randn({3, 4, 5}, torch::kFloat64).requires_grad_(true);
    auto b = torch::randn({3, 4, 2}, torch::kFloat64).requires_grad_(true);
    auto y = concat_last_as(a, b, dt);
    auto ref = torch::cat({a.to(dt), b.to(dt)}, 2);
    EXPECT_EQ(y.scalar_type(), dt);
    EXPECT_TRUE(torch::equal(y, ref));
    auto w = torch::randn({3, 4, 7}, torch::kFloat64).to(dt);
    auto g = torch::autograd::grad({(y * w).sum()}, {a, b});
    auto g_ref = torch::autograd::grad({(ref * w).sum()}, {a, b});
    EXPECT_TRUE(torch::equal(g[0], g_ref[0]) && torch::equal(g[1], g_ref[1]));
    EXPECT_EQ(g[0].scalar_type(), torch::kFloat64);
  }
  auto a = torch::randn({2, 3}, torch::kFloat64).requires_grad_(true);
  auto b = torch::randn({2, 2}, torch::kFloat64);
  auto w = torch::randn({2, 5}, torch::kFloat64);
  expect_grad_matches_fd([&] { return (concat_last_as(a, b, torch::kFloat64) * w).sum(); }, a, {0, 3, 5}, "a");
  expect_error_containing([] { concat_last_as(torch::zeros({2, 3}), torch::zeros({3, 3}), torch::kFloat32); },
                          "must agree in every dim but the last");
}

TEST(CudaKernels, AreNotUsedForCpuTensorsAndCheckTheirInputs) {
  auto h13 = torch::randn({3, 8});
  EXPECT_FALSE(use_cuda_kernels(h13));
  auto a = torch::empty({3, 4});
  expect_error_containing([&] { cuda_gated_forward(h13, 4, GatedActivation::kGelu, a); }, "CUDA tensors");
}

// RMSNorm (model/rms_norm.h): off CUDA the norms run ATen's op whatever the
// switch says, and the kernel path refuses CPU tensors by name.
TEST(RmsNorm, CpuRunsAtenAndTheKernelPathRefusesCpuTensors) {
  torch::manual_seed(2);
  auto x = torch::randn({2, 5, 16}), w = torch::randn({16});
  EXPECT_FALSE(use_rms_norm_kernel(x, w));
  EXPECT_TRUE(torch::equal(rms_norm(x, w, 1e-5), compat::rms_norm(x, w, 1e-5)));
  // a bf16 output is the kernel path's: ATen's ignores the request
  EXPECT_TRUE(torch::equal(rms_norm(x, w, 1e-5, torch::kBFloat16), compat::rms_norm(x, w, 1e-5)));
  Norm norm("rmsnorm", 16, 1e-5);
  EXPECT_TRUE(torch::equal(norm(x), compat::rms_norm(x, norm->weight_D, 1e-5)));
  expect_error_containing([&] { rms_norm_kernel(x, w, 1e-5); },
                          "rms_norm_kernel: needs an fp32 or bf16 CUDA tensor");
}

// The blocks' residual add + norm (model/rms_norm.h add_rms_norm): off CUDA it
// is ATen's add and norm, to the bit, with h's two uses (the stream and the
// norm) both reaching x and a (against the maths in fp64); the LayerNorm models' add_forward is the same
// composition; the kernel path refuses CPU tensors and mismatched operands.
TEST(RmsNorm, ResidualAddOnTheCpuIsAtensAddThenNorm) {
  torch::manual_seed(3);
  auto x = torch::randn({2, 5, 16}, torch::kFloat64).requires_grad_(true);
  auto a = torch::randn({2, 5, 16}, torch::kFloat64).requires_grad_(true);
  auto w = (1 + 0.3 * torch::randn({16}, torch::kFloat64)).requires_grad_(true);
  auto gh = torch::randn({2, 5, 16}, torch::kFloat64), gy = torch::randn({2, 5, 16}, torch::kFloat64);
  EXPECT_FALSE(use_add_rms_norm_kernel(x, a, w));
  auto [h, y] = add_rms_norm(x, a, w, 1e-5);
  EXPECT_TRUE(torch::equal(h, x + a));
  EXPECT_TRUE(torch::equal(y, compat::rms_norm(x + a, w, 1e-5)));
  auto g = torch::autograd::grad({(h * gh).sum() + (y * gy).sum()}, {x, a, w});
  // against the maths spelled out in fp64 (LibTorch 1.13's norm computes in fp32)
  auto h64 = x + a;
  auto y64 = h64 * torch::rsqrt(h64.pow(2).mean(-1, true) + 1e-5) * w;
  auto g64 = torch::autograd::grad({(h64 * gh).sum() + (y64 * gy).sum()}, {x, a, w});
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_LT((g[i] - g64[i]).abs().max().item<double>(), 1e-5 * g64[i].abs().max().item<double>()) << "input " << i;
  }
  EXPECT_TRUE(torch::equal(g[0], g[1]));  // one gradient for both addends

  Norm layer_norm("layernorm", 16, 1e-5);
  auto xf = x.detach().to(torch::kFloat32), af = a.detach().to(torch::kFloat32);
  auto [hl, yl] = layer_norm->add_forward(xf, af);
  EXPECT_TRUE(torch::equal(hl, xf + af));
  EXPECT_TRUE(torch::equal(yl, layer_norm(xf + af)));

  expect_error_containing([&] { add_rms_norm_kernel(xf, af, w.detach().to(torch::kFloat32), 1e-5); },
                          "add_rms_norm_kernel: needs an fp32 or bf16 CUDA tensor");
}

// The kernels' forward and gradients (x and w) against ATen's RMSNorm in fp64,
// through autograd; strided rows come in as a view of a wider tensor.
TEST(CudaKernels, RmsNormMatchesAnFp64ReferenceOnAGpu) {
  if (!gpu_kernels()) GTEST_SKIP() << "needs a CUDA device and a build with MOECPT_CUDA_KERNELS";
  torch::manual_seed(6);
  const int64_t shapes[][3] = {{2, 37, 1024}, {3, 5, 1001}, {1, 9, 2048}, {4, 3, 96}};  // B, T, D
  for (auto dt : {torch::kFloat32, torch::kBFloat16})
    for (const auto& sh : shapes) {
      const std::string what = std::string(dt == torch::kBFloat16 ? "bf16" : "fp32") + " D " + std::to_string(sh[2]);
      auto opts = torch::TensorOptions().device(torch::kCUDA).dtype(dt);
      auto x = (torch::randn({sh[0], sh[1], sh[2] + 8}, opts) * 2).narrow(2, 0, sh[2]).detach().requires_grad_(true);
      auto w = (1 + 0.3 * torch::randn({sh[2]}, opts.dtype(torch::kFloat32))).requires_grad_(true);
      auto dy = torch::randn({sh[0], sh[1], sh[2]}, opts);
      auto y = rms_norm_kernel(x, w, 1e-5);
      EXPECT_EQ(y.scalar_type(), dt) << what;
      y.backward(dy);
      auto x64 = x.detach().to(torch::kCPU, torch::kFloat64).requires_grad_(true);
      auto w64 = w.detach().to(torch::kCPU, torch::kFloat64).requires_grad_(true);
      auto y64 = compat::rms_norm(x64, w64, 1e-5);
      y64.backward(dy.to(torch::kCPU, torch::kFloat64));
      const double tol = dt == torch::kBFloat16 ? std::ldexp(1.0, -7) : 1e-5;
      EXPECT_LT(rel_err(y, y64), tol) << what;
      EXPECT_LT(rel_err(x.grad(), x64.grad()), tol) << what << " dx";
      EXPECT_LT(rel_err(w.grad(), w64.grad()), dt == torch::kBFloat16 ? 1e-2 : 1e-5) << what << " dw";
    }
}

// The fused residual add + norm on a GPU: h, y and the gradients of x, a and w
// through both outputs against ATen in fp64, for an fp32 stream with an fp32
// or bf16 sublayer output and for a bf16 stream; a's gradient in a's dtype;
// strided rows; fp32 a with a bf16 stream refused by name.
TEST(CudaKernels, ResidualAddWithRmsNormMatchesAnFp64ReferenceOnAGpu) {
  if (!gpu_kernels()) GTEST_SKIP() << "needs a CUDA device and a build with MOECPT_CUDA_KERNELS";
  torch::manual_seed(7);
  const int64_t shapes[][3] = {{2, 37, 1024}, {3, 5, 1001}, {1, 9, 2048}};  // B, T, D
  const std::pair<torch::ScalarType, torch::ScalarType> pairs[] = {
      {torch::kFloat32, torch::kFloat32}, {torch::kFloat32, torch::kBFloat16}, {torch::kBFloat16, torch::kBFloat16}};
  for (const auto& [dx_t, da_t] : pairs)
    for (const auto& sh : shapes) {
      const std::string what = std::string(dx_t == torch::kBFloat16 ? "bf16" : "fp32") + " + " +
                               (da_t == torch::kBFloat16 ? "bf16" : "fp32") + " D " + std::to_string(sh[2]);
      auto opts = torch::TensorOptions().device(torch::kCUDA);
      auto x = (torch::randn({sh[0], sh[1], sh[2] + 8}, opts.dtype(dx_t)) * 2).narrow(2, 0, sh[2]).detach();
      auto a = torch::randn({sh[0], sh[1], sh[2]}, opts.dtype(da_t));
      x.requires_grad_(true), a.requires_grad_(true);
      auto w = (1 + 0.3 * torch::randn({sh[2]}, opts.dtype(torch::kFloat32))).requires_grad_(true);
      auto gh = torch::randn({sh[0], sh[1], sh[2]}, opts.dtype(dx_t)), gy = torch::randn_like(gh);
      auto [h, y] = add_rms_norm_kernel(x, a, w, 1e-5);
      EXPECT_EQ(h.scalar_type(), dx_t) << what;
      EXPECT_EQ(y.scalar_type(), dx_t) << what;
      EXPECT_TRUE(torch::equal(h, x + a)) << what << ": h is ATen's add to the bit";
      ((h * gh).sum() + (y * gy).sum()).backward();
      EXPECT_EQ(a.grad().scalar_type(), da_t) << what;
      auto to64 = [](const torch::Tensor& t) { return t.detach().to(torch::kCPU, torch::kFloat64); };
      auto x64 = to64(x).requires_grad_(true), a64 = to64(a).requires_grad_(true), w64 = to64(w).requires_grad_(true);
      auto h64 = x64 + a64;
      auto y64 = compat::rms_norm(h64, w64, 1e-5);
      ((h64 * to64(gh)).sum() + (y64 * to64(gy)).sum()).backward();
      const double tol = dx_t == torch::kBFloat16 ? std::ldexp(1.0, -7) : 1e-5;
      EXPECT_LT(rel_err(y, y64), tol) << what;
      EXPECT_LT(rel_err(x.grad(), x64.grad()), tol) << what << " dx";
      EXPECT_LT(rel_err(a.grad(), a64.grad()), da_t == torch::kBFloat16 ? std::ldexp(1.0, -7) : tol) << what << " da";
      EXPECT_LT(rel_err(w.grad(), w64.grad()), dx_t == torch::kBFloat16 ? 1e-2 : 1e-5) << what << " dw";
    }
  auto xb = torch::randn({4, 64}, torch::TensorOptions().device(torch::kCUDA).dtype(torch::kBFloat16));
  auto w = torch::ones({64}, torch::TensorOptions().device(torch::kCUDA));
  expect_error_containing([&] { add_rms_norm_kernel(xb, xb.to(torch::kFloat32), w, 1e-5); },
                          "add_rms_norm_kernel: a must have x's shape and device");
}

// The counting-sort slot order on a GPU against ATen's stable sort of the same
// ids: order, inverse and token to the element, counts against bincount;
// uniform and skewed ids, a partial last chunk, the widest expert count.
TEST(CudaKernels, SlotSortMatchesAStableSortOnAGpu) {
  if (!gpu_kernels()) GTEST_SKIP() << "needs a CUDA device and a build with MOECPT_CUDA_KERNELS";
  torch::manual_seed(8);
  const int64_t cases[][3] = {{16384, 31, 3}, {16384 + 5, 31, 3}, {999, 256, 2}, {77, 1, 1}, {40000, 64, 8}};
  for (const auto& c : cases) {
    const int64_t T = c[0], E = c[1], K = c[2];
    for (bool skew : {false, true}) {
      const std::string what = "T " + std::to_string(T) + " E " + std::to_string(E) + (skew ? " skewed" : "");
      auto ids = torch::randint(E, {T * K}, torch::TensorOptions().device(torch::kCUDA).dtype(torch::kInt64));
      if (skew) ids = torch::where(torch::rand({T * K}, ids.options().dtype(torch::kFloat32)) < 0.8,
                                   torch::zeros_like(ids), ids);
      const auto r = cuda_slot_sort(ids, E, K);
      const auto order = std::get<1>(ids.sort(c10::optional<bool>(true), 0));
      EXPECT_TRUE(torch::equal(r.order_S, order)) << what;
      EXPECT_TRUE(torch::equal(r.order_S.index_select(0, r.inverse_S), torch::arange(T * K, ids.options()))) << what;
      EXPECT_TRUE(torch::equal(r.token_S, order.div(K, "floor"))) << what;
      EXPECT_TRUE(torch::equal(r.counts_E, ids.bincount({}, E))) << what;
      EXPECT_TRUE(torch::equal(cuda_expert_counts(ids, E), r.counts_E)) << what;
    }
  }
}

// A norm feeding a bf16 matmul writes bf16 directly: the same bits as the fp32
// output cast, and through a bf16 gradient the same gradients as the fp32 path
// fed that gradient in fp32 (plain and with the residual add).
TEST(CudaKernels, RmsNormWritesBf16ForAMatmulAsACastWouldOnAGpu) {
  if (!gpu_kernels()) GTEST_SKIP() << "needs a CUDA device and a build with MOECPT_CUDA_KERNELS";
  torch::manual_seed(9);
  auto opts = torch::TensorOptions().device(torch::kCUDA);
  for (bool add : {false, true}) {
    const std::string what = add ? "with the add" : "plain";
    auto x0 = (torch::randn({2, 37, 1024 + 8}, opts) * 2).narrow(2, 0, 1024);
    auto a0 = torch::randn({2, 37, 1024}, opts.dtype(torch::kBFloat16));
    auto w0 = 1 + 0.3 * torch::randn({1024}, opts);
    auto dy = torch::randn({2, 37, 1024}, opts.dtype(torch::kBFloat16));
    auto run = [&](NormOutDtype y_dtype) {
      auto x = x0.detach().requires_grad_(true), a = a0.detach().requires_grad_(true);
      auto w = w0.detach().requires_grad_(true);
      auto y = add ? add_rms_norm_kernel(x, a, w, 1e-5, y_dtype).second : rms_norm_kernel(x, w, 1e-5, y_dtype);
      y.backward(y_dtype ? dy : dy.to(torch::kFloat32));
      return std::vector<torch::Tensor>{y.detach(), x.grad(), w.grad(), add ? a.grad() : torch::Tensor()};
    };
    const auto b = run(torch::kBFloat16), f = run(std::nullopt);
    EXPECT_EQ(b[0].scalar_type(), torch::kBFloat16) << what;
    EXPECT_TRUE(torch::equal(b[0], f[0].to(torch::kBFloat16))) << what;
    EXPECT_TRUE(torch::equal(b[1], f[1])) << what << " dx";
    EXPECT_TRUE(torch::equal(b[2], f[2])) << what << " dw";
    if (add) {
      EXPECT_TRUE(torch::equal(b[3], f[3])) << what << " da";
    }
  }
}

TEST(CudaKernels, GatedActivationMatchesAnFp64ReferenceOnAGpu) {
  if (!gpu_kernels()) GTEST_SKIP() << "needs a CUDA device and a build with MOECPT_CUDA_KERNELS";
  torch::manual_seed(5);
  // (rows, H, row padding): 16-byte vectors; odd H (scalar path); vectors
  // with padded (strided) rows; an odd row stride (scalar path).
  const int64_t shapes[][3] = {{37, 2816, 0}, {5, 13, 0}, {9, 64, 8}, {6, 32, 3}};
  for (auto dt : {torch::kFloat32, torch::kBFloat16})
    for (auto act : {GatedActivation::kGelu, GatedActivation::kSilu})
      for (const auto& sh : shapes) {
        const int64_t S = sh[0], H = sh[1], pad = sh[2];
        auto opts = torch::TensorOptions().device(torch::kCUDA).dtype(dt);
        auto h13 = (torch::randn({S, 2 * H + pad}, opts) * 3).narrow(1, 0, 2 * H);
        auto da = torch::randn({S, H + pad}, opts).narrow(1, 0, H);
        auto a = torch::empty({S, H}, opts), dh13 = torch::empty({S, 2 * H}, opts);
        cuda_gated_forward(h13, H, act, a);
        cuda_gated_backward(h13, da, H, act, dh13);
        const auto ref = gated_reference(h13, da, act);
        // One rounding of an fp32 result: half an ulp of the output dtype,
        // plus fp32 erf/exp error; relative to the largest value.
        const double tol = dt == torch::kBFloat16 ? std::ldexp(1.0, -8) : 2e-6;
        const std::string what = std::string(dt == torch::kBFloat16 ? "bf16" : "fp32") +
                                 (act == GatedActivation::kGelu ? " gelu" : " silu") + " S " + std::to_string(S) +
                                 " H " + std::to_string(H) + " pad " + std::to_string(pad);
        EXPECT_LT(rel_err(a, ref.a), tol) << what;
        EXPECT_LT(rel_err(dh13.narrow(1, 0, H), ref.dh13.narrow(1, 0, H)), tol) << what << " dh1";
        EXPECT_LT(rel_err(dh13.narrow(1, H, H), ref.dh13.narrow(1, H, H)), tol) << what << " dh3";
      }
}

TEST(CudaKernels, RotaryQKVMatchesAnFp64ReferenceOnAGpu) {
  if (!gpu_kernels()) GTEST_SKIP() << "needs a CUDA device and a build with MOECPT_CUDA_KERNELS";
  torch::manual_seed(6);
  // Head size 64 (16-byte vectors) and 6 (scalar path); q, k written
  // head-major and seq-major (MOECPT_QKV_LAYOUT).
  for (int64_t Dh : {64, 6})
    for (auto dt : {torch::kFloat32, torch::kBFloat16})
      for (auto layout : {QKVLayout::kHeadMajor, QKVLayout::kSeqMajor}) {
        const int64_t B = 2, T = 24, H = 3;
        auto rope64 = rotary_tables(T, Dh, 10000.0, torch::kCPU);
        auto qkv = torch::randn({B, T, 3 * H * Dh}, torch::TensorOptions().dtype(dt).device(torch::kCUDA));
        std::vector<torch::Tensor> w;
        for (int i = 0; i < 3; ++i) w.push_back(torch::randn({B, H, T, Dh}, qkv.options()));
        // GPU, the tables in qkv's dtype, as the model passes them.
        auto x = qkv.detach().requires_grad_(true);
        RotaryTables rope{rope64.cos_TR.to(qkv.options()), rope64.sin_TR.to(qkv.options())};
        auto out = rotary_qkv(x, H, rope, layout);
        auto loss = (out.q * w[0]).sum() + (out.k * w[1]).sum() + (out.v * w[2]).sum();
        auto dx = torch::autograd::grad({loss}, {x})[0];
        // fp64 CPU reference from the same rounded inputs and tables.
        auto x64 = qkv.to(torch::kCPU, torch::kFloat64).requires_grad_(true);
        RotaryTables r64{rope.cos_TR.to(torch::kCPU, torch::kFloat64), rope.sin_TR.to(torch::kCPU, torch::kFloat64)};
        auto ref = rotary_qkv_composite(x64, H, r64);
        auto loss64 = (ref.q * w[0].to(torch::kCPU, torch::kFloat64)).sum() +
                      (ref.k * w[1].to(torch::kCPU, torch::kFloat64)).sum() +
                      (ref.v * w[2].to(torch::kCPU, torch::kFloat64)).sum();
        auto dx64 = torch::autograd::grad({loss64}, {x64})[0];
        const double tol = dt == torch::kBFloat16 ? std::ldexp(1.0, -7) : 2e-6;
        const std::string what = std::string(dt == torch::kBFloat16 ? "bf16" : "fp32") + " Dh " + std::to_string(Dh) +
                                 " " + qkv_layout_name(layout);
        EXPECT_LT(rel_err(out.q, ref.q.detach()), tol) << what << " q";
        EXPECT_LT(rel_err(out.k, ref.k.detach()), tol) << what << " k";
        EXPECT_EQ(rel_err(out.v, ref.v.detach()), 0.0) << what << " v";
        EXPECT_LT(rel_err(dx, dx64), tol) << what << " dqkv";
      }
}

TEST(CudaKernels, CrossEntropyRowsMatchAnFp64ReferenceOnAGpu) {
  if (!gpu_kernels()) GTEST_SKIP() << "needs a CUDA device and a build with MOECPT_CUDA_KERNELS";
  torch::manual_seed(7);
  // (rows, V, row padding): float4 path with padded rows; odd V (scalar path).
  const int64_t shapes[][3] = {{4, 4096, 12}, {5, 1003, 0}};
  for (const auto& sh : shapes) {
    const int64_t R = sh[0], V = sh[1], pad = sh[2];
    auto opts = torch::TensorOptions().device(torch::kCUDA).dtype(torch::kFloat32);
    auto logits = (torch::randn({R, V + pad}, opts) * 4).narrow(1, 0, V);
    auto targets = torch::randint(V, {R}, opts.dtype(torch::kInt64));
    {  // row 0: a confident prediction, 1 − p_t ≈ e^-7 ≈ 1e-3: its gradient −(1 − p_t)
      // must survive (the fp32 log-softmax resolves it; a bf16 exp − 1 would not)
      torch::NoGradGuard ng;
      logits[0].normal_(0, 0.1);
      logits[0][targets[0].item<int64_t>()] = std::log(double(V)) + 7.0;
    }
    auto grad = torch::empty({R, V}, opts.dtype(torch::kBFloat16));
    auto loss = torch::empty({R}, opts);
    cuda_cross_entropy_rows(logits, targets, grad, loss);
    auto x = logits.to(torch::kCPU, torch::kFloat64);
    auto t = targets.to(torch::kCPU);
    auto logp = torch::log_softmax(x, 1);
    auto ref_loss = -logp.gather(1, t.unsqueeze(1)).squeeze(1);
    auto ref_grad = logp.exp().scatter_add(1, t.unsqueeze(1), -torch::ones({R, 1}, torch::kFloat64));
    const std::string what = "V " + std::to_string(V);
    EXPECT_LT((loss.to(torch::kCPU, torch::kFloat64) - ref_loss).abs().max().item<double>(), 1e-4) << what;
    // every entry within bf16 rounding (plus the fp32 log-softmax's own error)
    // of its own value: relative to the entry, not to the row's largest
    auto g = grad.to(torch::kCPU, torch::kFloat64);
    EXPECT_TRUE(((g - ref_grad).abs() <= ref_grad.abs() * std::ldexp(1.0, -7)).all().item<bool>())
        << what << ": max rel " << ((g - ref_grad).abs() / ref_grad.abs().clamp_min(1e-38)).max().item<double>();
    const double gt = g[0][t[0].item<int64_t>()].item<double>(), gt_ref = ref_grad[0][t[0].item<int64_t>()].item<double>();
    EXPECT_NEAR(gt, gt_ref, std::abs(gt_ref) * std::ldexp(1.0, -7)) << what << ": the confident row's target";
  }
  // no gradient asked for: losses only; a target outside [0, V) gives NaN
  auto logits = torch::randn({2, 64}, torch::TensorOptions().device(torch::kCUDA));
  auto targets = torch::tensor({3, 64}, torch::TensorOptions().device(torch::kCUDA).dtype(torch::kInt64));
  auto loss = torch::empty({2}, logits.options());
  cuda_cross_entropy_rows(logits, targets, torch::Tensor(), loss);
  EXPECT_NEAR(loss[0].item<double>(), -torch::log_softmax(logits[0], 0)[3].item<double>(), 1e-5);
  EXPECT_TRUE(std::isnan(loss[1].item<double>()));
}

TEST(CudaKernels, SinkhornMatchesTheCpuIterationOnAGpu) {
  if (!gpu_kernels()) GTEST_SKIP() << "needs a CUDA device and a build with MOECPT_CUDA_KERNELS";
  torch::manual_seed(8);
  const double tol = 1e-3, eps = 1e-8;
  for (int64_t E : {31, 8, 64}) {
    const int64_t T = 4096;
    auto z = torch::randn({T, E}) * 2;  // skewed scores: several iterations to balance
    // the CPU path tests the error every iteration, as the kernel does
    auto ref = sinkhorn_balance(z, tol, 100, eps);
    auto C = torch::exp(z - std::get<0>(z.max(-1, true)));
    auto k = cuda_sinkhorn(C.to(torch::kCUDA), tol, 100, eps);
    auto stats = k.stats_2.cpu();
    const int64_t iters = int64_t(stats[0].item<float>());
    const std::string what = "E " + std::to_string(E) + ": " + std::to_string(iters) + " iterations, CPU " +
                             std::to_string(ref.iters);
    // fp32 sums in another order: the count may differ by one where the error is at tol
    EXPECT_LE(std::abs(iters - ref.iters), 1) << what;
    EXPECT_GE(iters, 2) << what;
    auto S = (k.d0_T.unsqueeze(1) * C.to(torch::kCUDA) * k.d1_E.unsqueeze(0)).cpu();
    const double rel = (S - ref.S_TE).abs().max().item<double>() / ref.S_TE.abs().max().item<double>();
    EXPECT_LT(rel, iters == ref.iters ? 1e-4 : 2e-2) << what;
    if (iters == ref.iters) {
      EXPECT_NEAR(stats[1].item<float>(), ref.error, 1e-6 + 1e-3 * ref.error) << what;
    }
    EXPECT_LT(stats[1].item<float>(), tol) << what;
    // balanced: column sums ≈ 1/E
    EXPECT_LT((S.sum(0) * double(E) - 1).abs().max().item<double>(), 0.05) << what;
  }
  // tol 0: every iteration up to max_iters; E > 64 refused by name
  auto C = torch::rand({128, 5}, torch::kCUDA) + 0.1;
  auto k = cuda_sinkhorn(C, 0.0, 7, eps);
  EXPECT_EQ(k.stats_2[0].item<float>(), 7.f);
  expect_error_containing([] { cuda_sinkhorn(torch::ones({4, 65}, torch::kCUDA), 1e-3, 10, 1e-8); },
                          "1 <= E <= 64");
}

// The MoE slot kernels (model/moe_slots.h: dispatch_slots_cuda,
// combine_slots_cuda) against the gather ops in fp64 on the CPU from the same
// rounded inputs: forward and every gradient, K = 1..3, the vector (D = 1024)
// and scalar (D = 100) paths, fp32 and bf16.
TEST(CudaKernels, MoESlotGathersMatchAnFp64ReferenceOnAGpu) {
  if (!gpu_kernels()) GTEST_SKIP() << "needs a CUDA device and a build with MOECPT_CUDA_KERNELS";
  torch::manual_seed(9);
  const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  for (auto dt : {torch::kFloat32, torch::kBFloat16}) {
    // one rounding of an fp32 result: half an ulp of the dtype, plus fp32 sums
    const double tol = dt == torch::kBFloat16 ? 1.0 / 256 : 1e-6;
    for (int64_t D : {1024, 100}) {
      for (int64_t K : {1, 2, 3}) {
        const int64_t T = 257, E = 7;
        const std::string what = std::string(dt == torch::kBFloat16 ? "bf16" : "fp32") + " D " + std::to_string(D) +
                                 " K " + std::to_string(K);
        auto ids = torch::randint(E, {T, K}, torch::kInt64);
        const auto o_cpu = sort_slots_by_expert(ids);
        const auto o = sort_slots_by_expert(ids.to(torch::kCUDA));
        EXPECT_TRUE(torch::equal(o.inverse_S.cpu(), o_cpu.inverse_S)) << what;
        auto x = torch::randn({T, D}).to(torch::kCUDA, dt).requires_grad_(true);
        auto y = torch::randn({T * K, D}).to(torch::kCUDA, dt).requires_grad_(true);
        auto gates = torch::rand({T, K}, torch::kCUDA).requires_grad_(true);
        auto up_S = torch::randn({T * K, D}).to(torch::kCUDA, dt), up_T = torch::randn({T, D}).to(torch::kCUDA, dt);

        auto x_SD = dispatch_slots_cuda(x, o);
        auto out = combine_slots_cuda(y, gates, o);
        EXPECT_EQ(out.scalar_type(), dt) << what;
        EXPECT_TRUE(torch::equal(x_SD, x.index_select(0, o.token_S))) << what;
        torch::autograd::backward({x_SD, out}, {up_S, up_T});

        auto x64 = x.detach().to(torch::kCPU, torch::kFloat64).requires_grad_(true);
        auto y64 = y.detach().to(torch::kCPU, torch::kFloat64).requires_grad_(true);
        auto g64 = gates.detach().to(torch::kCPU, torch::kFloat64).requires_grad_(true);
        auto ref_out = combine_slots(y64, g64, o_cpu);
        torch::autograd::backward({dispatch_slots(x64, o_cpu), ref_out},
                                  {up_S.to(torch::kCPU, torch::kFloat64), up_T.to(torch::kCPU, torch::kFloat64)});
        // each error against the scale of its sum of |terms|
        auto sum_abs_out = combine_slots(y64.detach().abs(), g64.detach(), o_cpu);
        EXPECT_LT(((out.to(torch::kCPU, torch::kFloat64) - ref_out).abs() / (sum_abs_out + 1e-30)).max().item<double>(),
                  tol)
            << what;
        EXPECT_LT(rel_err(y.grad(), y64.grad()), tol) << what << " (dy)";
        auto up_S64 = up_S.to(torch::kCPU, torch::kFloat64);
        auto dx_abs = torch::zeros({T, D}, f64).index_add(0, o_cpu.token_S, up_S64.abs());
        EXPECT_LT(((x.grad().to(torch::kCPU, torch::kFloat64) - x64.grad()).abs() / (dx_abs + 1e-30)).max().item<double>(),
                  tol)
            << what << " (dx)";
        // the gate gradients: fp32 sums of exact products of rounded values
        auto g_S = up_T.to(torch::kCPU, torch::kFloat64).index_select(0, o_cpu.token_S);
        auto dg_abs = (g_S * y64.detach()).abs().sum(1).index_select(0, o_cpu.inverse_S).view({T, K});
        EXPECT_EQ(gates.grad().scalar_type(), torch::kFloat32) << what;
        EXPECT_LT(((gates.grad().to(torch::kCPU, torch::kFloat64) - g64.grad()).abs() / (dg_abs + 1e-30)).max().item<double>(),
                  1e-5)
            << what << " (dgates)";
      }
    }
  }
  // the wrong shapes and a CPU tensor refused by name
  const auto o = sort_slots_by_expert(torch::zeros({4, 2}, torch::TensorOptions().dtype(torch::kInt64).device(torch::kCUDA)));
  expect_error_containing([&] { combine_slots_cuda(torch::zeros({8, 3}, torch::kCUDA), torch::zeros({3, 2}, torch::kCUDA), o); },
                          "gates must be [T, K]");
  expect_error_containing([&] { dispatch_slots_cuda(torch::zeros({4, 3}, torch::kFloat64).cuda(), o); },
                          "needs fp32/bf16 CUDA rows");
}

