// Weight casts kept across the micro-batches of one optimizer step
// (model/weight_casts.h): reused only inside an enabled scope, per grad mode,
// remade after an in-place write, gradients through a reused cast add up as
// through separate casts, and training with gradient accumulation under bf16
// autocast is bit-identical with and without the cache.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <optional>

#include "core/config.h"
#include "expect_error.h"
#include "model/expert_ffn.h"
#include "model/fused_ce.h"
#include "model/torch_compat.h"
#include "model/transformer.h"
#include "model/weight_casts.h"
#include "test_models.h"

using namespace moecpt;
using namespace moecpt::model;
using moecpt::testing::expect_error_containing;

namespace {

TEST(WeightCasts, ReusedInsideAnEnabledScopeOnlyPerGradModeAndVersion) {
  auto p = torch::randn({4, 3}).requires_grad_(true);
  // outside a scope, and in a disabled one: a new cast every time
  EXPECT_FALSE(cached_to(p, torch::kBFloat16).is_same(cached_to(p, torch::kBFloat16)));
  {
    StepCasts off(false);
    EXPECT_FALSE(cached_to(p, torch::kBFloat16).is_same(cached_to(p, torch::kBFloat16)));
  }
  EXPECT_TRUE(cached_to(p, torch::kFloat32).is_same(p));  // no cast needed: p itself
  const auto before = cast_cache_counts();
  torch::Tensor first;
  {
    StepCasts on(true);
    first = cached_to(p, torch::kBFloat16);
    EXPECT_TRUE(first.is_same(cached_to(p, torch::kBFloat16)));
    EXPECT_TRUE(first.grad_fn() != nullptr);  // made in grad mode: differentiable
    EXPECT_TRUE(torch::equal(first, p.detach().to(torch::kBFloat16)));
    {
      torch::NoGradGuard no_grad;  // the first pass of a checkpointed block
      auto ng = cached_to(p, torch::kBFloat16);
      EXPECT_FALSE(ng.is_same(first));
      EXPECT_TRUE(ng.is_same(cached_to(p, torch::kBFloat16)));
      p.add_(1.0);  // the parameter written in place: its version moves
    }
    auto after_write = cached_to(p, torch::kBFloat16);
    EXPECT_FALSE(after_write.is_same(first));
    EXPECT_TRUE(torch::equal(after_write, p.detach().to(torch::kBFloat16)));
    // two keys (the experts' w1 | w3 in one buffer)
    auto q = torch::randn({4, 2}).requires_grad_(true);
    auto make = [&] { return torch::cat({p, q}, 1).to(torch::kBFloat16); };
    auto pq = cached_cast({p, q}, torch::kBFloat16, make);
    EXPECT_TRUE(pq.is_same(cached_cast({p, q}, torch::kBFloat16, make)));
    EXPECT_FALSE(pq.is_same(cached_cast({q, p}, torch::kBFloat16, make)));  // another key
    expect_error_containing([&] { cached_cast({q}, torch::kBFloat16, [&] { return q * 2; }); },
                            "cached_cast: the cast made a Float tensor, not BFloat16");
  }
  const auto counts = cast_cache_counts();
  EXPECT_EQ(counts.misses - before.misses, 5);  // first, no-grad, after the write, {p, q}, {q, p}
  EXPECT_EQ(counts.hits - before.hits, 3);
  // the scope closed: nothing kept
  EXPECT_FALSE(cached_to(p, torch::kBFloat16).is_same(cached_to(p, torch::kBFloat16)));
}

TEST(WeightCasts, GradientsThroughAReusedCastAddUpAsThroughSeparateCasts) {
  torch::manual_seed(3);
  auto p = torch::randn({5, 4}, torch::kFloat32).requires_grad_(true);
  auto x1 = torch::randn({3, 5}, torch::kFloat64), x2 = torch::randn({3, 5}, torch::kFloat64);
  auto two_passes = [&](bool scope_on) {
    p.mutable_grad() = torch::Tensor();
    StepCasts scope(scope_on);
    for (const auto& x : {x1, x2}) {
      auto w = cached_to(p, torch::kFloat64);
      (x.mm(w).tanh().sum()).backward();  // one backward per micro-batch, through the same node when kept
    }
    return p.grad().clone();
  };
  const auto separate = two_passes(false), reused = two_passes(true);
  EXPECT_TRUE(torch::equal(separate, reused));
  // the grouped experts' w1 | w3 copy (concat_last_as, a custom autograd node) reused the same way
  auto q = torch::randn({5, 2}, torch::kFloat32).requires_grad_(true);
  auto concat_passes = [&](bool scope_on) {
    p.mutable_grad() = torch::Tensor();
    q.mutable_grad() = torch::Tensor();
    StepCasts scope(scope_on);
    for (const auto& x : {x1, x2}) {
      auto w = cached_cast({p, q}, torch::kFloat64, [&] { return concat_last_as(p, q, torch::kFloat64); });
      (x.mm(w).sin().sum()).backward();
    }
    return std::make_pair(p.grad().clone(), q.grad().clone());
  };
  const auto c_sep = concat_passes(false), c_kept = concat_passes(true);
  EXPECT_TRUE(torch::equal(c_sep.first, c_kept.first));
  EXPECT_TRUE(torch::equal(c_sep.second, c_kept.second));
  EXPECT_GT(c_kept.second.abs().sum().item<double>(), 0.0);
  // and both equal the analytic sum of the two micro-batches' gradients
  auto pd = p.detach().to(torch::kFloat64);
  auto g = [&](const torch::Tensor& x) { return x.t().mm(1 - x.mm(pd).tanh().pow(2)); };
  EXPECT_TRUE(torch::allclose(reused.to(torch::kFloat64), g(x1) + g(x2), 1e-6, 1e-6));
}

// Two optimizer steps of 3 micro-batches under bf16 autocast on the CPU, with
// the casts kept or not: the same parameters bit for bit. The tiny MoE model
// (experts, shared expert, attention projections, fused head: every cast site).
std::vector<torch::Tensor> train(const std::string& ffn, bool keep) {
  auto mc = moecpt::testing::tiny_model_config(ffn);
  torch::manual_seed(17);
  Transformer m(mc, RouterConfig{});
  torch::optim::AdamW opt(m->parameters(), torch::optim::AdamWOptions(1e-2));
  torch::manual_seed(9);
  const auto tokens = torch::randint(mc.vocab_size, {2, 3, 2, mc.seq_len + 1}, torch::kInt64);
  for (int64_t step = 0; step < 2; ++step) {
    opt.zero_grad();
    {
      StepCasts scope(keep);
      for (int64_t mb = 0; mb < 3; ++mb) {
        auto t = tokens[step][mb];
        torch::Tensor loss;
        {
          compat::Autocast autocast(torch::kCPU);
          auto out = forward_loss(*m, t.narrow(1, 0, mc.seq_len), t.narrow(1, 1, mc.seq_len));
          loss = (out.lm_loss + out.aux_loss + out.z_loss) / 3.0;
        }
        loss.backward();
      }
    }
    opt.step();
  }
  std::vector<torch::Tensor> params;
  for (const auto& p : m->parameters()) params.push_back(p.detach().clone());
  return params;
}

TEST(WeightCasts, TrainingWithAccumulationIsBitIdenticalWithAndWithoutTheCache) {
  for (const std::string ffn : {"moe", "dense"}) {
    SCOPED_TRACE(ffn);
    const auto before = cast_cache_counts();
    const auto kept = train(ffn, true);
    const auto counts = cast_cache_counts();
    const auto plain = train(ffn, false);
    // every cast site: per layer attention qkv + out and the FFN's w1, w3, w2
    // (MoE: experts and shared expert), plus the head; made once per step, reused twice
    const int64_t per_step = 2 * (2 + (ffn == "moe" ? 6 : 3)) + 1;
    EXPECT_EQ(counts.misses - before.misses, 2 * per_step);
    EXPECT_EQ(counts.hits - before.hits, 2 * 2 * per_step);
    ASSERT_EQ(kept.size(), plain.size());
    for (size_t i = 0; i < kept.size(); ++i) EXPECT_TRUE(torch::equal(kept[i], plain[i])) << "parameter " << i;
  }
}

TEST(WeightCasts, WantedOnlyWithAccumulationAndWithoutGraphsOrCheckpointing) {
  unsetenv("MOECPT_CAST_CACHE");
  EXPECT_TRUE(step_casts_wanted(2, false, false));
  EXPECT_FALSE(step_casts_wanted(1, false, false));
  EXPECT_FALSE(step_casts_wanted(4, true, false));
  EXPECT_FALSE(step_casts_wanted(4, false, true));
  setenv("MOECPT_CAST_CACHE", "0", 1);
  EXPECT_FALSE(step_casts_wanted(4, false, false));
  setenv("MOECPT_CAST_CACHE", "yes", 1);
  expect_error_containing([] { step_casts_wanted(4, false, false); }, "MOECPT_CAST_CACHE must be 0 or 1, got 'yes'");
  unsetenv("MOECPT_CAST_CACHE");
}

}  // namespace
