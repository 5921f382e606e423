// The optimizer (train/optimizer.h) against an independent, hand-written AdamW
// in double precision, the fused multi-tensor AdamW against LibTorch's loop,
// and the on-device gradient clipping against its definition.
#include <gtest/gtest.h>

#include <cmath>
#include <sstream>

#include "core/config.h"
#include "core/error.h"
#include "model/torch_compat.h"
#include "train/optimizer.h"

using namespace moecpt;

namespace {

// A module with the three kinds of parameters make_adamw sorts: a matrix
// (decayed), a vector (a norm weight: not decayed), the token embedding (not decayed).
struct Toy : torch::nn::Module {
  Toy() {
    w = register_parameter("w", torch::randn({4, 3}, torch::kFloat64));
    norm = register_parameter("norm", torch::randn({3}, torch::kFloat64));
    tok_emb = register_parameter("tok_emb", torch::randn({5, 3}, torch::kFloat64));
  }
  torch::Tensor w, norm, tok_emb;
};

OptimConfig optim_config() {
  OptimConfig o;
  o.lr = 0.05;
  o.beta1 = 0.8;
  o.beta2 = 0.9;
  o.eps = 1e-6;
  o.weight_decay = 0.3;
  return o;
}

void set_grads(Toy& m, int step) {
  torch::manual_seed(100 + step);
  for (auto& p : m.parameters()) p.mutable_grad() = torch::randn_like(p);
}

}  // namespace

TEST(Optimizer, AdamWMatchesTheHandWrittenUpdate) {
  torch::manual_seed(1);
  Toy m;
  std::map<std::string, torch::Tensor> p0;
  for (const auto& p : m.named_parameters()) p0[p.key()] = p.value().detach().clone();
  const auto o = optim_config();
  auto opt = make_adamw(m, o);
  // Reference: decoupled decay on matrices only, bias-corrected moments.
  std::map<std::string, torch::Tensor> p = p0, mom, vel;
  for (const auto& [k, v] : p0) mom[k] = torch::zeros_like(v), vel[k] = torch::zeros_like(v);
  for (int t = 1; t <= 4; ++t) {
    set_grads(m, t);
    opt->step();
    for (auto& [k, x] : p) {
      const auto g = m.named_parameters()[k].grad();
      const double wd = k == "w" ? o.weight_decay : 0.0;
      x = x * (1 - o.lr * wd);
      mom[k] = o.beta1 * mom[k] + (1 - o.beta1) * g;
      vel[k] = o.beta2 * vel[k] + (1 - o.beta2) * g * g;
      const double bc1 = 1 - std::pow(o.beta1, t), bc2 = 1 - std::pow(o.beta2, t);
      x = x - (o.lr / bc1) * mom[k] / (vel[k].sqrt() / std::sqrt(bc2) + o.eps);
    }
    for (const auto& q : m.named_parameters())
      EXPECT_TRUE(torch::allclose(q.value(), p[q.key()], 1e-12, 1e-12)) << q.key() << " step " << t;
  }
  // The decayed matrix moved differently from an undecayed one would have.
  EXPECT_GT((m.w - p0["w"]).abs().max().item<double>(), 0.0);
}

TEST(Optimizer, FusedAdamWEqualsLibTorchsLoopAndSharesItsState) {
  if (!FusedAdamW::compiled()) {
    // LibTorch 1.13 (this dev machine): asking for the fused kernel is a clear error…
    torch::manual_seed(2);
    Toy m;
    std::vector<torch::optim::OptimizerParamGroup> groups{torch::optim::OptimizerParamGroup(m.parameters())};
    try {
      FusedAdamW bad(groups, torch::optim::AdamWOptions(0.1), FusedAdamW::Mode::kFused);
      ADD_FAILURE() << "kFused was accepted without at::_fused_adamw_";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("LibTorch >= 2.4"), std::string::npos) << e.what();
    }
    // …and auto is LibTorch's loop.
    auto opt = make_adamw(m, optim_config());
    set_grads(m, 1);
    opt->step();
    EXPECT_STREQ(dynamic_cast<FusedAdamW&>(*opt).last_path(), "loop");
    GTEST_SKIP() << "at::_fused_adamw_ needs LibTorch >= 2.4; this is " << TORCH_VERSION;
  }
  // Same parameters, two optimizers: the fused kernel (on the CPU from 2.4) vs the loop.
  auto run = [](FusedAdamW::Mode mode, int steps, const std::string& load_from, std::string* save_to) {
    torch::manual_seed(3);
    Toy m;
    for (auto& q : m.parameters()) q.set_data(q.data().to(torch::kFloat32));
    auto made = make_adamw(m, optim_config(), mode);
    auto& opt = dynamic_cast<FusedAdamW&>(*made);
    if (!load_from.empty()) {
      std::istringstream is(load_from);
      torch::serialize::InputArchive a;
      a.load_from(is);
      opt.load(a);
    }
    for (int t = 1; t <= steps; ++t) {
      set_grads(m, t);
      for (auto& q : m.parameters()) q.mutable_grad() = q.grad().to(torch::kFloat32);
      opt.step();
    }
    EXPECT_STREQ(opt.last_path(), mode == FusedAdamW::Mode::kFused ? "fused" : "loop");
    if (save_to) {
      std::ostringstream os;
      torch::serialize::OutputArchive a;
      opt.save(a);
      a.save_to(os);
      *save_to = os.str();
    }
    return std::vector<torch::Tensor>{m.w.detach().clone(), m.norm.detach().clone(), m.tok_emb.detach().clone()};
  };
  const auto loop = run(FusedAdamW::Mode::kLoop, 5, "", nullptr);
  const auto fused = run(FusedAdamW::Mode::kFused, 5, "", nullptr);
  for (size_t i = 0; i < loop.size(); ++i)
    EXPECT_TRUE(torch::allclose(loop[i], fused[i], 1e-5, 1e-6)) << i << ": " << (loop[i] - fused[i]).abs().max();
  // The state is LibTorch's: 3 fused steps saved, loaded into the loop (and
  // the other way round), both continue as if uninterrupted (params restart
  // from the same seed; only the moments and step counts come from the file).
  std::string state;
  run(FusedAdamW::Mode::kFused, 3, "", &state);
  const auto cont_loop = run(FusedAdamW::Mode::kLoop, 2, state, nullptr);
  const auto cont_fused = run(FusedAdamW::Mode::kFused, 2, state, nullptr);
  for (size_t i = 0; i < loop.size(); ++i)
    EXPECT_TRUE(torch::allclose(cont_loop[i], cont_fused[i], 1e-5, 1e-6)) << i;
}

TEST(Optimizer, ClipGradNormOnDeviceFollowsItsDefinition) {
  auto a = torch::zeros({2, 2}, torch::requires_grad()), b = torch::zeros({3}, torch::requires_grad()),
       c = torch::zeros({1}, torch::requires_grad());
  a.mutable_grad() = torch::full({2, 2}, 3.0);  // Σ g² = 36
  b.mutable_grad() = torch::full({3}, 2.0);     // 12
  // c has no gradient: skipped.
  c.mutable_grad() = torch::Tensor();
  // total = √48; clipped to 2: every gradient × 2 / (√48 + 1e-6)
  auto total = clip_grad_norm_on_device({a, b, c}, 2.0);
  EXPECT_NEAR(total.item<double>(), std::sqrt(48.0), 1e-5);
  const double coef = 2.0 / (std::sqrt(48.0) + 1e-6);
  EXPECT_TRUE(torch::allclose(a.grad(), torch::full({2, 2}, 3.0 * coef), 1e-6));
  EXPECT_TRUE(torch::allclose(b.grad(), torch::full({3}, 2.0 * coef), 1e-6));
  // Below the limit nothing changes.
  auto again = clip_grad_norm_on_device({a, b}, 100.0);
  EXPECT_NEAR(again.item<double>(), 2.0, 1e-5);
  EXPECT_TRUE(torch::allclose(b.grad(), torch::full({3}, 2.0 * coef), 1e-6));
  EXPECT_FALSE(clip_grad_norm_on_device({c}, 1.0).defined());  // no gradients at all
}

TEST(Optimizer, APendingGradDivisorScalesOnlyTheNextStep) {
  // Two optimizers from the same start: one is handed divisor 4 for its first
  // step, the other gets gradients already divided by 4. Their second steps
  // (no divisor) must agree as well: the divisor is consumed.
  torch::manual_seed(7);
  Toy a, b;
  {
    torch::NoGradGuard ng;
    for (size_t i = 0; i < a.parameters().size(); ++i) b.parameters()[i].copy_(a.parameters()[i]);
  }
  auto oa = make_adamw(a, optim_config(), FusedAdamW::Mode::kLoop);
  auto ob = make_adamw(b, optim_config(), FusedAdamW::Mode::kLoop);
  for (int step = 0; step < 2; ++step) {
    set_grads(a, step);
    set_grads(b, step);
    if (step == 0) {
      static_cast<FusedAdamW&>(*oa).set_pending_grad_divisor(torch::full({}, 4.0, torch::kFloat32));
      for (auto& p : b.parameters()) p.mutable_grad().div_(4.0);
    }
    oa->step();
    ob->step();
    for (size_t i = 0; i < a.parameters().size(); ++i)
      EXPECT_TRUE(torch::allclose(a.parameters()[i], b.parameters()[i], 1e-12, 1e-12)) << "step " << step;
    if (step == 0) {
      EXPECT_TRUE(torch::allclose(a.w.grad(), b.w.grad(), 1e-12, 1e-12));  // scaled in place
    }
  }
}

TEST(Optimizer, ClipFoldedIntoTheFusedStepOnAGpuEqualsClipThenStep) {
  if (!torch::cuda::is_available() || !FusedAdamW::compiled()) GTEST_SKIP() << "needs a CUDA device and LibTorch >= 2.4";
  torch::manual_seed(8);
  auto make = [] {
    auto m = std::make_shared<Toy>();
    m->to(torch::kCUDA, torch::kFloat32);
    return m;
  };
  auto a = make(), b = make();
  {
    torch::NoGradGuard ng;
    for (size_t i = 0; i < a->parameters().size(); ++i) b->parameters()[i].copy_(a->parameters()[i]);
  }
  auto oa = make_adamw(*a, optim_config()), ob = make_adamw(*b, optim_config());
  for (int step = 0; step < 3; ++step) {
    set_grads(*a, step);
    set_grads(*b, step);
    for (auto& p : a->parameters()) p.mutable_grad() = p.grad().to(torch::kCUDA, torch::kFloat32) * 10;
    for (auto& p : b->parameters()) p.mutable_grad() = p.grad().to(torch::kCUDA, torch::kFloat32) * 10;
    auto na = clip_grad_norm_on_device(a->parameters(), 1.0, dynamic_cast<FusedAdamW*>(oa.get()));
    auto nb = clip_grad_norm_on_device(b->parameters(), 1.0);
    EXPECT_EQ(na.item<float>(), nb.item<float>());
    oa->step();
    ob->step();
    EXPECT_STREQ(static_cast<FusedAdamW&>(*oa).last_path(), "fused");
    for (size_t i = 0; i < a->parameters().size(); ++i)
      EXPECT_TRUE(torch::allclose(a->parameters()[i], b->parameters()[i], 1e-6, 1e-7)) << "step " << step;
  }
}
