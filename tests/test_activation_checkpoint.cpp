// Activation checkpointing (model/activation_checkpoint.h, TransformerImpl::
// set_activation_checkpointing): the recomputed model must give the same
// losses and the same gradient for every parameter as the plain one — the
// router's included, through the aux and z losses that leave the recomputed
// blocks — and must really drop the blocks' intermediates from the graph.
#include <gtest/gtest.h>

#include <functional>
#include <optional>
#include <set>

#include "core/config.h"
#include "core/error.h"
#include "model/fused_ce.h"
#include "model/torch_compat.h"
#include "model/transformer.h"
#include "test_models.h"

using namespace moecpt;
using namespace moecpt::model;

namespace {

// Three blocks, so that every = 2 and 3 recompute some blocks and keep others.
ModelConfig small_model(const std::string& ffn) {
  auto mc = moecpt::testing::tiny_model_config(ffn);
  mc.n_layers = 3;
  return mc;
}

RouterConfig router_of(const std::string& type) {
  RouterConfig rc;
  rc.type = type;
  rc.aux_alpha = 0.5;  // large, so that the aux/z gradients are a visible share of the router's
  rc.z_beta = 0.05;
  return rc;
}

struct StepResult {
  double lm = 0, aux = 0, z = 0;
  std::map<std::string, torch::Tensor> grads;
  std::vector<torch::Tensor> counts;  // tokens per expert, per MoE layer
};

// One forward + backward of lm + aux + z (fused head, or forward() + cross-entropy);
// bf16: the forward under bf16 autocast, the backward outside it, as the trainer does.
StepResult step(Transformer& m, const torch::Tensor& tokens, const torch::Tensor& targets, bool fused,
                bool lm_only = false, bool bf16 = false) {
  m->zero_grad();
  torch::Tensor lm, aux, z;
  std::vector<RoutingInfo> routing;
  std::optional<compat::Autocast> autocast;
  if (bf16) autocast.emplace(torch::kCPU);
  if (fused) {
    auto out = forward_loss(*m, tokens, targets);
    lm = out.lm_loss, aux = out.aux_loss, z = out.z_loss, routing = out.routing;
  } else {
    auto out = m(tokens);
    lm = torch::cross_entropy_loss(out.logits_BTV.reshape({-1, m->config().vocab_size}).to(torch::kFloat32),
                                   targets.reshape({-1}));
    aux = out.aux_loss, z = out.z_loss, routing = out.routing;
  }
  autocast.reset();
  (lm_only ? lm : lm + aux + z).backward();
  StepResult r{lm.item<double>(), aux.item<double>(), z.item<double>(), {}, {}};
  for (const auto& p : m->named_parameters())
    r.grads[p.key()] = p.value().grad().defined() ? p.value().grad().clone() : torch::Tensor();
  for (const auto& ri : routing) r.counts.push_back(ri.tokens_per_expert_E.clone());
  return r;
}

// B random sequences of the small model's vocabulary: inputs and next-token targets, [B, 10].
std::pair<torch::Tensor, torch::Tensor> random_batch(uint64_t seed, int64_t B) {
  torch::manual_seed(seed);
  auto tokens = torch::randint(64, {B, 11}, torch::kInt64);
  return {tokens.narrow(1, 0, 10), tokens.narrow(1, 1, 10)};
}

Transformer make_model(const ModelConfig& mc, const RouterConfig& rc, int64_t every) {
  torch::manual_seed(11);
  Transformer m(mc, rc);
  m->set_activation_checkpointing(every);
  m->train();
  return m;
}

// Exact equality: the rerun does the same operations on the same inputs, and
// every gradient is accumulated in the same order.
void expect_same(const StepResult& a, const StepResult& b, const std::string& what) {
  EXPECT_EQ(a.lm, b.lm) << what;
  EXPECT_EQ(a.aux, b.aux) << what;
  EXPECT_EQ(a.z, b.z) << what;
  ASSERT_EQ(a.grads.size(), b.grads.size()) << what;
  for (const auto& [name, g] : a.grads) {
    const auto& h = b.grads.at(name);
    ASSERT_EQ(g.defined(), h.defined()) << what << " " << name;
    if (g.defined()) {
      EXPECT_TRUE(torch::equal(g, h)) << what << " " << name << ": max |diff| " << (g - h).abs().max().item<double>();
    }
  }
  ASSERT_EQ(a.counts.size(), b.counts.size()) << what;
  for (size_t i = 0; i < a.counts.size(); ++i) EXPECT_TRUE(torch::equal(a.counts[i], b.counts[i])) << what;
}

// Every autograd node reachable from `root`.
std::vector<std::string> graph_nodes(const torch::Tensor& root) {
  std::vector<std::string> names;
  std::set<torch::autograd::Node*> seen;
  std::function<void(const std::shared_ptr<torch::autograd::Node>&)> visit =
      [&](const std::shared_ptr<torch::autograd::Node>& n) {
        if (!n || !seen.insert(n.get()).second) return;
        names.push_back(n->name());
        for (const auto& e : n->next_edges()) visit(e.function);
      };
  visit(root.grad_fn());
  return names;
}

}  // namespace

TEST(ActivationCheckpointing, SameLossesGradientsAndRoutingAsWithout) {
  const auto [in, tgt] = random_batch(5, 3);
  for (const std::string ffn : {"dense", "moe"})
    for (const std::string router : {"topk", "sinkhorn", "bias"}) {
      if (ffn == "dense" && router != "topk") continue;
      const auto mc = small_model(ffn);
      const auto rc = router_of(router);
      for (bool fused : {true, false}) {
        auto plain = make_model(mc, rc, 0);
        const auto ref = step(plain, in, tgt, fused);
        for (int64_t every : {1, 2, 3}) {
          auto ac = make_model(mc, rc, every);
          const std::string what = ffn + "/" + router + (fused ? " fused" : " unfused") + " every " +
                                   std::to_string(every);
          expect_same(ref, step(ac, in, tgt, fused), what);
        }
      }
    }
}

TEST(ActivationCheckpointing, RouterLossGradientsLeaveTheRecomputedBlocks) {
  // The aux and z losses are outputs of the recomputed piece; if they were
  // not, the router would get only the LM gradient. Check that that gradient
  // differs (so the test above can see a missing aux/z path) and that the
  // checkpointed model's router gradient is the full one.
  const auto [in, tgt] = random_batch(6, 2);
  const auto mc = small_model("moe");
  const auto rc = router_of("topk");
  auto plain = make_model(mc, rc, 0);
  const auto full = step(plain, in, tgt, true);
  const auto lm_only = step(plain, in, tgt, true, /*lm_only=*/true);
  auto ac = make_model(mc, rc, 1);
  const auto with_ac = step(ac, in, tgt, true);
  for (const auto& [name, g] : full.grads) {
    if (name.find("router") == std::string::npos) continue;
    EXPECT_GT((g - lm_only.grads.at(name)).abs().max().item<double>(), 1e-4) << name;
    EXPECT_TRUE(torch::equal(g, with_ac.grads.at(name))) << name;
  }
}

TEST(ActivationCheckpointing, RecomputesUnderTheForwardsBf16Autocast) {
  // The backward does not inherit the forward's autocast state; the rerun
  // must restore it, or it would compute the blocks in fp32 and give other
  // gradients (differences of bf16 size, ~1e-3).
  const auto [in, tgt] = random_batch(7, 2);
  const auto mc = small_model("moe");
  const auto rc = router_of("topk");
  auto run = [&](int64_t every) {
    auto m = make_model(mc, rc, every);
    return step(m, in, tgt, /*fused=*/true, /*lm_only=*/false, /*bf16=*/true).grads;
  };
  const auto ref = run(0), ac = run(1);
  for (const auto& [name, g] : ref)
    EXPECT_TRUE(torch::allclose(g, ac.at(name), 1e-6, 1e-7))
        << name << ": max |diff| " << (g - ac.at(name)).abs().max().item<double>();
}

TEST(ActivationCheckpointing, BackwardInsideTheAutocastScopeStillReachesTheWeights) {
  // Autocast caches its casts of the weights (the attention's linears use
  // them). The checkpointed forward made its casts under no-grad, so a rerun
  // that reused them (backward() called while the forward's autocast scope is
  // open) would leave qkv and out without gradients; the rerun clears the cache.
  const auto [in, tgt] = random_batch(9, 2);
  const auto mc = small_model("dense");
  auto grads = [&](int64_t every) {
    auto m = make_model(mc, router_of("topk"), every);
    compat::Autocast autocast(torch::kCPU);
    forward_loss(*m, in, tgt).lm_loss.backward();
    std::map<std::string, torch::Tensor> g;
    for (const auto& p : m->named_parameters()) g[p.key()] = p.value().grad();
    return g;
  };
  const auto ref = grads(0), ac = grads(1);
  for (const auto& [name, g] : ref) {
    ASSERT_TRUE(ac.at(name).defined()) << name;
    EXPECT_TRUE(torch::allclose(g, ac.at(name), 1e-6, 1e-7))
        << name << ": max |diff| " << (g - ac.at(name)).abs().max().item<double>();
  }
}

TEST(ActivationCheckpointing, KeepsOnlyTheBlockInputsInTheGraph) {
  const auto [in, tgt] = random_batch(8, 2);
  const auto mc = small_model("moe");
  const auto rc = router_of("topk");
  auto count = [](const std::vector<std::string>& names, const std::string& part) {
    return std::count_if(names.begin(), names.end(), [&](const std::string& n) { return n.find(part) != std::string::npos; });
  };
  auto nodes_with = [&](int64_t every) {  // the graph of lm + aux + z
    auto m = make_model(mc, rc, every);
    auto out = forward_loss(*m, in, tgt);
    return graph_nodes(out.lm_loss + out.aux_loss + out.z_loss);
  };
  const auto plain_nodes = nodes_with(0), ac_nodes = nodes_with(1);
  EXPECT_EQ(count(plain_nodes, "Recompute"), 0);
  EXPECT_EQ(count(ac_nodes, "Recompute"), mc.n_layers);  // one node per block, nothing inside it
  EXPECT_EQ(count(ac_nodes, "ExpertFFNLoop"), 0);
  EXPECT_EQ(count(plain_nodes, "ExpertFFNLoop"), 2 * mc.n_layers);  // routed + shared experts
  EXPECT_LT(ac_nodes.size() * 3, plain_nodes.size()) << ac_nodes.size() << " vs " << plain_nodes.size();
  // every = 2 on 3 blocks: blocks 0 and 2 recomputed, block 1 kept.
  const auto half_nodes = nodes_with(2);
  EXPECT_EQ(count(half_nodes, "Recompute"), 2);
  EXPECT_EQ(count(half_nodes, "ExpertFFNLoop"), 2);
}

TEST(ActivationCheckpointing, FrozenEmbeddingStillTrainsTheBlocks) {
  // The first block's input then needs no gradient; the recomputed block must
  // still be part of the graph (a dummy input that does) so its parameters
  // get theirs.
  const auto [in, tgt] = random_batch(10, 2);
  const auto mc = small_model("moe");
  const auto rc = router_of("topk");
  auto plain = make_model(mc, rc, 0), ac = make_model(mc, rc, 1);
  plain->tok_emb->weight.requires_grad_(false);
  ac->tok_emb->weight.requires_grad_(false);
  const auto ref = step(plain, in, tgt, true), got = step(ac, in, tgt, true);
  EXPECT_FALSE(got.grads.at("tok_emb.weight").defined());
  ASSERT_TRUE(got.grads.at("blocks.0.attn.qkv.weight").defined());
  expect_same(ref, got, "frozen embedding");
}

TEST(ActivationCheckpointing, EvaluationWithoutGradRunsThePlainBlocks) {
  torch::manual_seed(9);
  auto tokens = torch::randint(64, {2, 10}, torch::kInt64);
  const auto mc = small_model("moe");
  const auto rc = router_of("sinkhorn");
  auto plain = make_model(mc, rc, 0), ac = make_model(mc, rc, 1);
  plain->eval();
  ac->eval();
  torch::NoGradGuard no_grad;
  auto a = plain(tokens), b = ac(tokens);
  EXPECT_TRUE(torch::equal(a.logits_BTV, b.logits_BTV));
  EXPECT_FALSE(b.logits_BTV.requires_grad());
}

TEST(ActivationCheckpointing, ConfigKeysAndTheirErrors) {
  const auto c = parse_config("[train]\nactivation_checkpointing = \"full\"\nactivation_checkpointing_every = 2\n", "x.toml");
  EXPECT_EQ(c.train.recompute_every(), 2);
  EXPECT_EQ(parse_config("", "x.toml").train.recompute_every(), 0);  // default: off
  try {
    parse_config("[train]\nactivation_checkpointing = \"selective\"\n", "x.toml");
    ADD_FAILURE() << "an unknown mode was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("activation_checkpointing"), std::string::npos) << e.what();
  }
  EXPECT_THROW(parse_config("[train]\nactivation_checkpointing_every = 0\n", "x.toml"), Error);
  auto m = make_model(small_model("dense"), router_of("topk"), 0);
  EXPECT_THROW(m->set_activation_checkpointing(-1), Error);
}
