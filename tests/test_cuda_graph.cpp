// MicroStepGraphs: one micro-batch's forward + backward replayed as a
// CUDA graph. On the CPU: the eager mode's gradient semantics (the reference the
// graphs must match) and the refusal without CUDA; on a GPU: replayed steps
// equal eager steps of the same model, and a body that syncs is a clear error.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <optional>
#include <string>

#include "core/config.h"
#include "core/error.h"
#include "model/fused_ce.h"
#include "model/torch_compat.h"
#include "model/transformer.h"
#include "test_models.h"
#include "train/cuda_graph.h"
#include "train/optimizer.h"

namespace moecpt {
namespace {



model::Transformer make_model(const std::string& ffn, const torch::Device& dev, uint64_t seed) {
  torch::manual_seed(seed);
  auto mc = testing::tiny_model_config(ffn);
  mc.seq_len = 16;
  RouterConfig rc;  // top-k with aux and z losses: sync-free
  model::Transformer m(mc, rc);
  m->to(dev);
  m->train();
  return m;
}

// The loss of one micro-batch, as the trainer forms it (1/accum of the sum).
torch::Tensor micro_loss(model::Transformer& m, const torch::Tensor& inputs, const torch::Tensor& targets,
                         int64_t accum, bool bf16) {
  std::optional<compat::Autocast> autocast;
  if (bf16) autocast.emplace(inputs.device());
  auto out = model::forward_loss(*m, inputs, targets);
  return (out.lm_loss + out.aux_loss + out.z_loss) / double(accum);
}

std::vector<torch::Tensor> grads_of(model::Transformer& m) {
  std::vector<torch::Tensor> g;
  for (const auto& p : m->parameters()) g.push_back(p.grad().defined() ? p.grad().clone() : torch::Tensor());
  return g;
}

TEST(CudaGraph, EagerModeOverwritesThenAccumulatesTheGradients) {
  const torch::Device cpu(torch::kCPU);
  auto ref = make_model("moe", cpu, 5), ours = make_model("moe", cpu, 5);
  auto tokens = torch::randint(64, {2, 17}, torch::kInt64);
  auto in = torch::empty({2, 16}, torch::kInt64), tg = torch::empty({2, 16}, torch::kInt64);  // static inputs
  MicroStepGraphs runner(
      [&] {
        auto l = micro_loss(ours, in, tg, 3, false);
        l.backward();
        return l.detach();
      },
      ours->parameters(), MicroStepGraphs::Mode::kEager);
  // Stale gradients before the step: the first micro-batch must overwrite them.
  for (auto& p : ours->parameters()) p.mutable_grad() = torch::full_like(p, 7.0);
  std::vector<torch::Tensor> returned;
  for (int64_t a = 0; a < 3; ++a) {
    auto rows = tokens.roll(a, 0);
    in.copy_(rows.narrow(1, 0, 16));
    tg.copy_(rows.narrow(1, 1, 16));
    returned.push_back(runner.run(a == 0));
  }
  // The reference: zero_grad, then three backward passes.
  for (auto& p : ref->parameters()) p.mutable_grad() = torch::Tensor();
  for (int64_t a = 0; a < 3; ++a) {
    auto rows = tokens.roll(a, 0);
    auto l = micro_loss(ref, rows.narrow(1, 0, 16), rows.narrow(1, 1, 16), 3, false);
    l.backward();
    EXPECT_EQ(returned[size_t(a)].item<double>(), l.item<double>()) << "micro-batch " << a;
  }
  const auto g_ref = grads_of(ref), g_ours = grads_of(ours);
  ASSERT_EQ(g_ref.size(), g_ours.size());
  for (size_t i = 0; i < g_ref.size(); ++i) {
    ASSERT_EQ(g_ref[i].defined(), g_ours[i].defined()) << i;
    if (g_ref[i].defined()) {
      EXPECT_TRUE(torch::equal(g_ref[i], g_ours[i])) << "parameter " << i;
    }
  }
  EXPECT_EQ(runner.graphs_captured(), 0);
  EXPECT_EQ(runner.replays(), 0);
}

TEST(CudaGraph, TheResultIsACopyThatLaterRunsDoNotChange) {
  auto buffer = torch::zeros({2});  // a body that rewrites one static result in place
  MicroStepGraphs runner(
      [&] {
        buffer.add_(1.0);
        return buffer;
      },
      {}, MicroStepGraphs::Mode::kEager);
  auto first = runner.run(true), second = runner.run(false);
  EXPECT_EQ(first[0].item<float>(), 1.0f);
  EXPECT_EQ(second[0].item<float>(), 2.0f);
}

TEST(CudaGraph, GraphModeIsRefusedByABuildWithoutCuda) {
  if (MicroStepGraphs::compiled()) GTEST_SKIP() << "this LibTorch has CUDA";
  try {
    MicroStepGraphs g([] { return torch::zeros({1}); }, {});
    ADD_FAILURE() << "graph mode was accepted by a CPU build";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("CUDA build"), std::string::npos) << e.what();
  }
}

// Four optimizer steps of two micro-batches each, eagerly and through the
// graphs (two eager warm-up runs, then the first-micro-batch graph, then the
// accumulating one), from the same weights and data. Each step's gradients
// are compared before the optimizer; then the eager model's updated weights
// are copied into the graphed model in place, so every replay must read the
// current weights (lr 1e-2 moves them far enough for stale ones to show). A
// doubled or missing micro-batch gives a relative error of 0.5-1; the same
// kernels in the same order give 0; the bound leaves room for a kernel with
// atomics (attention's backward may have them).
void expect_graphs_equal_eager(const std::string& ffn) {
  const torch::Device gpu(torch::kCUDA);
  auto eager = make_model(ffn, gpu, 11), graphed = make_model(ffn, gpu, 11);
  OptimConfig oc;
  oc.lr = 1e-2;
  auto opt = make_adamw(*eager, oc);
  torch::manual_seed(12);
  auto data = torch::randint(64, {4, 2, 4, 17}, torch::kInt64).to(gpu);  // [step, micro, rows, T+1]
  auto in = torch::empty({4, 16}, data.options()), tg = torch::empty({4, 16}, data.options());
  MicroStepGraphs graphs(
      [&] {
        auto l = micro_loss(graphed, in, tg, 2, true);
        l.backward();
        return l.detach();
      },
      graphed->parameters());
  const auto pe = eager->parameters(), pg = graphed->parameters();
  for (int64_t s = 0; s < 4; ++s) {
    opt->zero_grad();
    for (int64_t a = 0; a < 2; ++a) {
      auto rows = data[s][a];
      auto le = micro_loss(eager, rows.narrow(1, 0, 16), rows.narrow(1, 1, 16), 2, true);
      le.backward();
      in.copy_(rows.narrow(1, 0, 16));
      tg.copy_(rows.narrow(1, 1, 16));
      auto lg = graphs.run(a == 0);
      EXPECT_NEAR(lg.item<double>(), le.item<double>(), 1e-3 * std::abs(le.item<double>()))
          << ffn << " step " << s << " micro-batch " << a;
    }
    double diff2 = 0, ref2 = 0;
    for (size_t i = 0; i < pe.size(); ++i) {
      ASSERT_EQ(pe[i].grad().defined(), pg[i].grad().defined()) << ffn << " parameter " << i;
      if (!pe[i].grad().defined()) continue;
      diff2 += (pg[i].grad() - pe[i].grad()).pow(2).sum().item<double>();
      ref2 += pe[i].grad().pow(2).sum().item<double>();
    }
    const double rel = std::sqrt(diff2 / ref2);
    std::printf("[ %s ] step %lld: |grad graphed - grad eager| / |grad eager| = %.3g\n", ffn.c_str(),
                (long long)s, rel);
    EXPECT_LE(rel, 1e-2) << ffn << " step " << s;
    clip_grad_norm_on_device(pe, 1.0, dynamic_cast<FusedAdamW*>(opt.get()));
    opt->step();
    torch::NoGradGuard no_grad;
    for (size_t i = 0; i < pe.size(); ++i) pg[i].copy_(pe[i]);  // in place: the graphs hold these addresses
  }
  EXPECT_EQ(graphs.graphs_captured(), 2) << ffn;
  EXPECT_EQ(graphs.replays(), 6) << ffn;  // 8 runs: 2 warm-up, then every one replayed
}

TEST(CudaGraph, ReplayedStepsEqualEagerStepsOnAGpu) {
  if (!torch::cuda::is_available() || !MicroStepGraphs::compiled()) GTEST_SKIP() << "needs a CUDA device";
  expect_graphs_equal_eager("dense");
  expect_graphs_equal_eager("moe");
}

TEST(CudaGraph, ABodyThatSyncsIsAClearErrorOnAGpu) {
  if (!torch::cuda::is_available() || !MicroStepGraphs::compiled()) GTEST_SKIP() << "needs a CUDA device";
  auto x = torch::ones({8}, torch::kCUDA);
  MicroStepGraphs graphs(
      [&] {
        const double host = x.sum().item<double>();  // a host read: not capturable
        return x * host;
      },
      {}, MicroStepGraphs::Mode::kGraph, /*warmup=*/1);
  EXPECT_EQ(graphs.run(true)[0].item<double>(), 8.0);  // eager warm-up
  try {
    graphs.run(true);
    ADD_FAILURE() << "a capture with a host sync did not fail";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("CUDA graph capture"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace moecpt
