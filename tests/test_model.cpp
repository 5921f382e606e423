// Model maths against independent reference computations and finite differences.
#include <gtest/gtest.h>

#include "gradcheck.h"
#include "test_models.h"

#include <ATen/autocast_mode.h>

#include "model/attention.h"
#include "model/causal_attention.h"
#include "core/error.h"
#include "model/expert_ffn.h"
#include "model/flops.h"
#include "model/grouped_gemm.h"
#include "model/moe.h"
#include "model/torch_compat.h"
#include "model/router_bias.h"
#include "model/threaded_linear.h"
#include "model/transformer.h"

using namespace moecpt;
using namespace moecpt::model;

namespace {

using moecpt::testing::tiny_model_config;

torch::Tensor act(const std::string& name, const torch::Tensor& x) {
  return name == "geglu" ? torch::gelu(x) : torch::silu(x);
}

using moecpt::testing::expect_grad_matches_fd;

}  // namespace

struct MoECase {
  int64_t E, k, S;
  std::string activation;
  bool renormalize;
};
// Readable parameter in test listings (gtest would otherwise print raw bytes).
void PrintTo(const MoECase& c, std::ostream* os) {
  *os << "E=" << c.E << " k=" << c.k << " S=" << c.S << " " << c.activation << (c.renormalize ? " renorm" : "");
}

class ModelMoEDropless : public ::testing::TestWithParam<MoECase> {};

TEST_P(ModelMoEDropless, MatchesNaivePerTokenLoop) {
  const auto c = GetParam();
  auto mc = tiny_model_config("moe");
  mc.n_experts = c.E;
  mc.top_k = c.k;
  mc.n_shared_experts = c.S;
  mc.activation = c.activation;
  RouterConfig rc;
  rc.renormalize = c.renormalize;
  torch::manual_seed(10 + c.E + c.k);
  MoE moe(mc, rc, /*out_std=*/0.1);
  const int64_t T = 24, D = mc.d_model;
  auto x_TD = torch::randn({T, D});
  {
    // Make the last expert unreachable so an empty group is exercised.
    torch::NoGradGuard no_grad;
    x_TD.select(1, 0).abs_().add_(1.0);
    moe->router->weight_ED[c.E - 1].zero_();
    moe->router->weight_ED[c.E - 1][0] = -100.0;
  }
  auto out = moe(x_TD.view({2, T / 2, D}));
  ASSERT_EQ(out.y_BTD.sizes(), (std::vector<int64_t>{2, T / 2, D}));
  if (c.k < c.E) {
    EXPECT_EQ(out.routing.tokens_per_expert_E[c.E - 1].item<int64_t>(), 0);
  }
  EXPECT_EQ(out.routing.tokens_per_expert_E.sum().item<int64_t>(), T * c.k);  // dropless

  // Reference: route each token by hand and loop over its experts.
  torch::NoGradGuard no_grad;
  auto p_TE = torch::softmax(torch::matmul(x_TD, moe->router->weight_ED.t()), -1);
  auto [top_p, top_i] = p_TE.topk(c.k, -1);
  if (c.renormalize && c.k > 1) top_p = top_p / top_p.sum(-1, true);
  const auto& ex = moe->experts;
  auto y_ref = torch::zeros({T, D});
  for (int64_t t = 0; t < T; ++t) {
    auto x_D = x_TD[t];
    for (int64_t j = 0; j < c.k; ++j) {
      const int64_t e = top_i[t][j].item<int64_t>();
      auto h = act(c.activation, torch::matmul(x_D, ex->w1_EDH[e])) * torch::matmul(x_D, ex->w3_EDH[e]);
      y_ref[t] += top_p[t][j] * torch::matmul(h, ex->w2_EHD[e]);
    }
    if (c.S > 0) {
      auto& sh = moe->shared;
      auto h = act(c.activation, torch::mv(sh->w1->weight, x_D)) * torch::mv(sh->w3->weight, x_D);
      y_ref[t] += torch::mv(sh->w2->weight, h);
    }
  }
  EXPECT_TRUE(torch::allclose(out.y_BTD.view({T, D}), y_ref, 1e-4, 1e-5));
}

INSTANTIATE_TEST_SUITE_P(ModelMoE, ModelMoEDropless,
                         ::testing::Values(MoECase{4, 1, 0, "geglu", false}, MoECase{4, 2, 1, "swiglu", false},
                                           MoECase{8, 3, 2, "geglu", true}, MoECase{6, 6, 0, "swiglu", false}),
                         [](const ::testing::TestParamInfo<MoECase>& info) {
                           const auto& c = info.param;
                           return "E" + std::to_string(c.E) + "k" + std::to_string(c.k) + "S" +
                                  std::to_string(c.S) + "_" + c.activation + (c.renormalize ? "_renorm" : "");
                         });

TEST(ModelMoE, GradientsMatchFiniteDifferences) {
  auto mc = tiny_model_config("moe");
  mc.d_model = 6;
  mc.n_experts = 3;
  mc.top_k = 2;
  mc.expert_hidden = 5;
  RouterConfig rc;
  rc.aux_alpha = 0.5;  // large, so the aux/z gradients are visible in the check
  rc.z_beta = 0.1;
  torch::manual_seed(4);
  MoE moe(mc, rc, 0.3);
  moe->to(torch::kFloat64);
  auto x = (torch::randn({1, 7, mc.d_model}, torch::kFloat64)).requires_grad_(true);
  auto R = torch::randn({1, 7, mc.d_model}, torch::kFloat64);
  auto f = [&] {
    auto out = moe(x);
    return (out.y_BTD * R).sum() + out.routing.aux_loss + out.routing.z_loss;
  };
  expect_grad_matches_fd(f, x, {0, 5, 13, 40}, "x");
  expect_grad_matches_fd(f, moe->router->weight_ED, {0, 4, 11, 17}, "router");
  expect_grad_matches_fd(f, moe->experts->w1_EDH, {0, 31, 77}, "experts.w1");
  expect_grad_matches_fd(f, moe->experts->w2_EHD, {2, 40, 88}, "experts.w2");
  expect_grad_matches_fd(f, moe->shared->w3->weight, {1, 20}, "shared.w3");
}

// model/expert_ffn.h's hand-written backward against autograd through the
// textbook formula (separate mm per projection and expert, torch::gelu/silu),
// in double: outputs and all gradients, with empty groups at the start, middle
// and end, on 1 thread, with whole experts split over 2 threads, and with one
// expert's rows split over 2 and 3 threads (per-thread dL/dW summed); then
// finite differences of the Function itself.
TEST(ModelMoE, ExpertFfnLoopMatchesAutogradReference) {
  struct Case {
    std::vector<int64_t> sizes;
    int threads;
  };
  const std::vector<Case> cases{{{0, 4, 0, 9, 0}, 1}, {{0, 40, 0, 50, 0}, 2}, {{90}, 2}, {{97}, 3}, {{0, 70, 30}, 3}};
  const int threads_before = torch::get_num_threads();
  auto opts = torch::dtype(torch::kFloat64);
  const int64_t D = 6, H = 7;
  for (const auto& c : cases) {
    const int64_t E = int64_t(c.sizes.size());
    int64_t S = 0;
    for (auto n : c.sizes) S += n;
    SCOPED_TRACE("E=" + std::to_string(E) + " S=" + std::to_string(S) + " threads=" + std::to_string(c.threads));
    torch::manual_seed(21);
    auto counts = torch::tensor(c.sizes, torch::kInt64);
    auto x = torch::randn({S, D}, opts).requires_grad_(true);
    auto w1 = (0.5 * torch::randn({E, D, H}, opts)).requires_grad_(true);
    auto w3 = (0.5 * torch::randn({E, D, H}, opts)).requires_grad_(true);
    auto w2 = (0.5 * torch::randn({E, H, D}, opts)).requires_grad_(true);
    auto R = torch::randn({S, D}, opts);
    const std::vector<torch::Tensor> wrt{x, w1, w3, w2};
    for (const std::string name : {"geglu", "swiglu"}) {
      SCOPED_TRACE(name);
      torch::set_num_threads(c.threads);
      auto y = expert_ffn_loop(x, w1, w3, w2, counts, gated_activation_by_name(name));
      auto g = torch::autograd::grad({(y * R).sum()}, wrt);
      torch::set_num_threads(threads_before);
      std::vector<torch::Tensor> rows;
      int64_t o = 0;
      for (int64_t e = 0; e < E; ++e) {
        auto xe = x.narrow(0, o, c.sizes[e]);
        rows.push_back(torch::mm(act(name, torch::mm(xe, w1[e])) * torch::mm(xe, w3[e]), w2[e]));
        o += c.sizes[e];
      }
      auto y_ref = torch::cat(rows, 0);
      auto g_ref = torch::autograd::grad({(y_ref * R).sum()}, wrt);
      EXPECT_TRUE(torch::allclose(y, y_ref, 1e-12, 1e-12));
      for (size_t i = 0; i < wrt.size(); ++i)
        EXPECT_TRUE(torch::allclose(g[i], g_ref[i], 1e-12, 1e-12)) << "grad " << i;
      for (int64_t e = 0; e < E; ++e)  // experts without tokens: exactly zero gradients, not garbage
        if (c.sizes[e] == 0) {
          EXPECT_EQ(g[1][e].abs().max().item<double>() + g[3][e].abs().max().item<double>(), 0.0);
        }
      if (c.threads != 1) continue;
      auto f = [&] { return (expert_ffn_loop(x, w1, w3, w2, counts, gated_activation_by_name(name)) * R).sum(); };
      expect_grad_matches_fd(f, x, {0, 11, 40, 77}, "x");
      expect_grad_matches_fd(f, w1, {6 * 7 + 3, 3 * 42 + 20}, "w1");
      expect_grad_matches_fd(f, w3, {42 + 1, 3 * 42 + 41}, "w3");
      expect_grad_matches_fd(f, w2, {42 + 5, 3 * 42 + 30}, "w2");
    }
  }
  auto x = torch::randn({13, D}, opts);
  auto w = torch::randn({5, D, H}, opts), w2 = torch::randn({5, H, D}, opts);
  EXPECT_THROW(expert_ffn_loop(x, w, w, w2, torch::tensor({1, 4, 0, 9, 0}, torch::kInt64), GatedActivation::kGelu),
               moecpt::Error);  // sizes sum to 14, not 13
  EXPECT_THROW(gated_activation_by_name("relu"), moecpt::Error);
}

// The dense gated MLP (model/mlp.h, through gated_mlp) equals the textbook
// Linear formula on a 3-D input, outputs and gradients, rows split over 2 threads.
TEST(ModelMLP, GatedMlpMatchesLinearFormula) {
  torch::manual_seed(8);
  GatedMLP mlp(12, 20, "swiglu", 0.3, 0.2);
  mlp->to(torch::kFloat64);
  auto x = torch::randn({3, 40, 12}, torch::kFloat64).requires_grad_(true);
  auto R = torch::randn({3, 40, 12}, torch::kFloat64);
  const std::vector<torch::Tensor> wrt{x, mlp->w1->weight, mlp->w3->weight, mlp->w2->weight};
  const int threads_before = torch::get_num_threads();
  torch::set_num_threads(2);
  auto y = mlp(x);
  auto g = torch::autograd::grad({(y * R).sum()}, wrt);
  torch::set_num_threads(threads_before);
  auto y_ref = torch::matmul(torch::silu(torch::matmul(x, mlp->w1->weight.t())) * torch::matmul(x, mlp->w3->weight.t()),
                             mlp->w2->weight.t());
  auto g_ref = torch::autograd::grad({(y_ref * R).sum()}, wrt);
  ASSERT_EQ(y.sizes(), x.sizes());
  EXPECT_TRUE(torch::allclose(y, y_ref, 1e-12, 1e-12));
  for (size_t i = 0; i < wrt.size(); ++i) EXPECT_TRUE(torch::allclose(g[i], g_ref[i], 1e-12, 1e-12)) << "grad " << i;
}

// model/threaded_linear.h: rows split over 1–3 threads (per-thread dL/dW
// summed) equal torch::linear, outputs and gradients, in double.
TEST(ModelAttention, ThreadedLinearMatchesLinear) {
  torch::manual_seed(9);
  auto x = torch::randn({2, 150, 10}, torch::kFloat64).requires_grad_(true);
  auto w = torch::randn({7, 10}, torch::kFloat64).requires_grad_(true);
  auto R = torch::randn({2, 150, 7}, torch::kFloat64);
  auto y_ref = torch::linear(x, w);
  auto g_ref = torch::autograd::grad({(y_ref * R).sum()}, {x, w});
  const int threads_before = torch::get_num_threads();
  for (int threads : {1, 2, 3}) {
    torch::set_num_threads(threads);
    auto y = threaded_linear(x, w);
    auto g = torch::autograd::grad({(y * R).sum()}, {x, w});
    torch::set_num_threads(threads_before);
    ASSERT_EQ(y.sizes(), y_ref.sizes());
    EXPECT_TRUE(torch::allclose(y, y_ref, 1e-12, 1e-12)) << threads << " threads";
    EXPECT_TRUE(torch::allclose(g[0], g_ref[0], 1e-12, 1e-12)) << threads << " threads";
    EXPECT_TRUE(torch::allclose(g[1], g_ref[1], 1e-12, 1e-12)) << threads << " threads";
  }
}

// model/causal_attention.h against the maths spelled out (matmul, scale,
// causal mask, softmax, matmul) with autograd, in double, on 1–3 threads
// (heads split over threads), plus finite differences.
TEST(ModelAttention, ThreadedCausalAttentionMatchesReference) {
  torch::manual_seed(12);
  auto opts = torch::dtype(torch::kFloat64);
  auto q = torch::randn({2, 3, 9, 4}, opts).requires_grad_(true);
  auto k = torch::randn({2, 3, 9, 4}, opts).requires_grad_(true);
  auto v = torch::randn({2, 3, 9, 4}, opts).requires_grad_(true);
  auto R = torch::randn({2, 3, 9, 4}, opts);
  auto scores = torch::matmul(q, k.transpose(-2, -1)) / 2.0;  // √Dh = 2
  scores = scores.masked_fill(torch::ones({9, 9}, torch::kBool).triu(1), -INFINITY);
  auto y_ref = torch::matmul(torch::softmax(scores, -1), v);
  auto g_ref = torch::autograd::grad({(y_ref * R).sum()}, {q, k, v});
  const int threads_before = torch::get_num_threads();
  for (int threads : {1, 2, 3}) {
    torch::set_num_threads(threads);
    auto y = causal_attention_threaded(q, k.transpose(-2, -1).transpose(-2, -1), v);
    auto g = torch::autograd::grad({(y * R).sum()}, {q, k, v});
    torch::set_num_threads(threads_before);
    EXPECT_TRUE(torch::allclose(y, y_ref, 1e-12, 1e-12)) << threads << " threads";
    for (int i = 0; i < 3; ++i) EXPECT_TRUE(torch::allclose(g[i], g_ref[i], 1e-12, 1e-12)) << "grad " << i;
  }
  auto f = [&] { return (causal_attention_threaded(q, k, v) * R).sum(); };
  expect_grad_matches_fd(f, q, {0, 37, 200}, "q");
  expect_grad_matches_fd(f, k, {5, 99, 210}, "k");
  expect_grad_matches_fd(f, v, {3, 120, 215}, "v");
  EXPECT_THROW(causal_attention_threaded(q, k.narrow(2, 0, 8), v), moecpt::Error);
}

// The grouped expert GEMM (at::_grouped_mm, LibTorch >= 2.8) computes the same
// layer as the per-expert loop: outputs and gradients, in fp32 on the CPU (ATen's
// reference implementation; the CUDA kernel is compared by `moecpt bench
// moe-layer` on a GPU). Builds without it refuse the forced mode by name.
TEST(ModelMoE, ExpertGemmPathsAgree) {
  auto mc = tiny_model_config("moe");
  mc.n_experts = 5;
  mc.top_k = 2;
  mc.expert_hidden = 8;  // multiples of 8: _grouped_mm's 16-byte rows
  RouterConfig rc;
  torch::manual_seed(11);
  MoE moe(mc, rc, 0.3);
  auto x = torch::randn({2, 9, mc.d_model}).requires_grad_(true);
  auto R = torch::randn({2, 9, mc.d_model});
  const std::vector<torch::Tensor> wrt{x, moe->experts->w1_EDH, moe->experts->w3_EDH, moe->experts->w2_EHD};
  auto run = [&](ExpertGemm mode) {
    set_expert_gemm_mode(mode);
    auto y = moe(x).y_BTD;
    auto g = torch::autograd::grad({(y * R).sum()}, wrt);
    g.insert(g.begin(), y.detach());
    return g;
  };
  EXPECT_THROW(parse_expert_gemm("fast"), moecpt::Error);
  EXPECT_EQ(parse_expert_gemm("grouped"), ExpertGemm::kGrouped);
  const auto loop = run(ExpertGemm::kLoop);
#if MOECPT_TORCH_AT_LEAST(2, 8)
  const auto before = expert_gemm_calls();
  const auto grouped = run(ExpertGemm::kGrouped);
  set_expert_gemm_mode(ExpertGemm::kAuto);
  EXPECT_EQ(expert_gemm_calls().grouped, before.grouped + 1);
  ASSERT_EQ(grouped.size(), loop.size());
  for (size_t i = 0; i < loop.size(); ++i)
    EXPECT_TRUE(torch::allclose(grouped[i], loop[i], 1e-5, 1e-6)) << "output " << i;
#else
  EXPECT_FALSE(grouped_mm_compiled());
  try {
    run(ExpertGemm::kGrouped);
    ADD_FAILURE() << "grouped mode ran without at::_grouped_mm";
  } catch (const moecpt::Error& e) {
    EXPECT_NE(std::string(e.what()).find(">= 2.8"), std::string::npos) << e.what();
  }
  set_expert_gemm_mode(ExpertGemm::kAuto);
#endif
}

TEST(ModelAttention, GradientsMatchFiniteDifferences) {
  torch::manual_seed(5);
  Attention attn(/*d_model=*/8, /*n_heads=*/2, /*init_std=*/0.4, /*out_std=*/0.4);
  attn->to(torch::kFloat64);
  auto x = torch::randn({2, 5, 8}, torch::kFloat64).requires_grad_(true);
  auto R = torch::randn({2, 5, 8}, torch::kFloat64);
  auto rope = rotary_tables(5, 4, 10000.0, torch::kCPU);
  auto f = [&] { return (attn(x, rope) * R).sum(); };
  expect_grad_matches_fd(f, x, {0, 9, 33, 79}, "x");
  expect_grad_matches_fd(f, attn->qkv->weight, {0, 70, 150, 191}, "qkv");
  expect_grad_matches_fd(f, attn->out->weight, {3, 60}, "out");
}

TEST(ModelAttention, RotaryKeepsNormsAndIsRelative) {
  auto rope = rotary_tables(6, 4, 10000.0, torch::kCPU);
  auto q = torch::randn({1, 1, 1, 4}).expand({1, 1, 6, 4});
  auto k = torch::randn({1, 1, 1, 4}).expand({1, 1, 6, 4});
  auto rq = apply_rotary(q, rope), rk = apply_rotary(k, rope);
  EXPECT_TRUE(torch::allclose(rq.norm(2, -1), q.norm(2, -1), 1e-5));
  // <R_i q, R_j k> depends on i - j only.
  auto dot = [&](int64_t i, int64_t j) { return (rq[0][0][i] * rk[0][0][j]).sum().item<double>(); };
  EXPECT_NEAR(dot(3, 1), dot(5, 3), 1e-5);
  EXPECT_NEAR(dot(0, 0), dot(4, 4), 1e-5);
}

TEST(ModelTransformer, FutureTokensDoNotChangeEarlierLogits) {
  for (const std::string router : {"none", "topk", "sinkhorn", "bias"}) {
    auto mc = tiny_model_config(router == "none" ? "dense" : "moe");
    RouterConfig rc;
    if (router != "none") rc.type = router;
    torch::manual_seed(6);
    Transformer model(mc, rc);
    model->eval();  // Sinkhorn balances over the batch in training, by design
    auto tokens = torch::randint(mc.vocab_size, {2, 10}, torch::kInt64);
    auto changed = tokens.clone();
    changed.select(1, 6).fill_((tokens[0][6].item<int64_t>() + 1) % mc.vocab_size);
    torch::NoGradGuard no_grad;
    auto a = model(tokens).logits_BTV, b = model(changed).logits_BTV;
    EXPECT_TRUE(torch::allclose(a.narrow(1, 0, 6), b.narrow(1, 0, 6), 1e-5, 1e-6)) << router;
    EXPECT_FALSE(torch::allclose(a.narrow(1, 6, 1), b.narrow(1, 6, 1))) << router;
  }
}

TEST(ModelTransformer, OutputsAndRoutingPerMoELayer) {
  auto mc = tiny_model_config("moe");
  mc.n_layers = 4;
  mc.moe_every = 2;
  mc.norm = "layernorm";
  mc.tie_embeddings = true;
  torch::manual_seed(7);
  Transformer model(mc, RouterConfig{});
  EXPECT_EQ(model->moe_layer_indices(), (std::vector<int64_t>{1, 3}));
  EXPECT_EQ(model->routers().size(), 2u);
  auto out = model(torch::randint(mc.vocab_size, {3, 8}, torch::kInt64));
  EXPECT_EQ(out.logits_BTV.sizes(), (std::vector<int64_t>{3, 8, mc.vocab_size}));
  ASSERT_EQ(out.routing.size(), 2u);
  EXPECT_EQ(out.routing[0].topk_ids_TK.sizes(), (std::vector<int64_t>{24, 2}));
  EXPECT_NEAR(out.aux_loss.item<double>(),
              (out.routing[0].aux_loss + out.routing[1].aux_loss).item<double>(), 1e-9);
  EXPECT_GT(out.z_loss.item<double>(), 0.0);
  EXPECT_FALSE(model->head);

  Transformer dense(tiny_model_config("dense"), RouterConfig{});
  auto dout = dense(torch::randint(64, {1, 4}, torch::kInt64));
  EXPECT_TRUE(dout.routing.empty());
  EXPECT_EQ(dout.aux_loss.item<double>(), 0.0);
  EXPECT_EQ(dout.aux_loss.dim(), 0);
}

TEST(ModelTransformer, Bf16AutocastKeepsRouterFp32) {
  torch::manual_seed(8);
  Transformer model(tiny_model_config("moe"), RouterConfig{});
  struct CpuAutocast {  // restores the global autocast state even if the forward throws
    CpuAutocast() {
      at::autocast::set_cpu_enabled(true);
      at::autocast::set_autocast_cpu_dtype(torch::kBFloat16);
    }
    ~CpuAutocast() {
      at::autocast::set_cpu_enabled(false);
      at::autocast::clear_cache();
    }
  };
  ModelOutput out;
  {
    CpuAutocast autocast;
    out = model(torch::randint(64, {2, 6}, torch::kInt64));
  }
  EXPECT_EQ(out.routing[0].gates_TK.scalar_type(), torch::kFloat32);
  EXPECT_EQ(out.routing[0].scores_TE.scalar_type(), torch::kFloat32);
  EXPECT_TRUE(torch::isfinite(out.logits_BTV).all().item<bool>());
}

TEST(ModelTransformer, FitsAToyBatchWithEveryRouter) {
  for (const std::string router : {"none", "topk", "sinkhorn", "bias"}) {
    auto mc = tiny_model_config(router == "none" ? "dense" : "moe");
    RouterConfig rc;
    if (router != "none") rc.type = router;
    torch::manual_seed(9);
    Transformer model(mc, rc);
    model->train();
    torch::optim::Adam opt(model->parameters(), torch::optim::AdamOptions(1e-2));
    auto tokens = torch::randint(mc.vocab_size, {4, 13}, torch::kInt64);
    auto inputs = tokens.narrow(1, 0, 12), targets = tokens.narrow(1, 1, 12);
    double first = 0, last = 0;
    for (int step = 0; step < 25; ++step) {
      auto out = model(inputs);
      auto lm = torch::cross_entropy_loss(out.logits_BTV.reshape({-1, mc.vocab_size}), targets.reshape({-1}));
      opt.zero_grad();
      (lm + out.aux_loss + out.z_loss).backward();
      opt.step();
      std::vector<torch::Tensor> loads;
      for (const auto& r : out.routing) loads.push_back(r.tokens_per_expert_E);
      model->update_router_biases(loads);
      (step == 0 ? first : last) = lm.item<double>();
    }
    EXPECT_LT(last, 0.5 * first) << router;
  }
}

TEST(ModelTransformer, BiasRouterBufferIsCheckpointedNotTrained) {
  auto mc = tiny_model_config("moe");
  RouterConfig rc;
  rc.type = "bias";
  Transformer model(mc, rc);
  int64_t n_bias_buffers = 0;
  for (const auto& b : model->named_buffers()) n_bias_buffers += b.key().find("expert_bias") != std::string::npos;
  EXPECT_EQ(n_bias_buffers, mc.n_layers);
  for (const auto& p : model->named_parameters()) EXPECT_EQ(p.key().find("expert_bias"), std::string::npos);
}
