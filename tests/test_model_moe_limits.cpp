// The MoE at its limits: with one expert it is the dense model, and a mini MoE
// can memorise a small batch (the optimisation path works end to end).
#include <gtest/gtest.h>

#include "core/config.h"
#include "model/transformer.h"

using namespace moecpt;
using namespace moecpt::model;

namespace {

ModelConfig small_config() {
  ModelConfig mc;
  mc.vocab_size = 97;
  mc.d_model = 16;
  mc.n_layers = 2;
  mc.n_heads = 2;
  mc.seq_len = 10;
  mc.ffn_hidden = 24;
  return mc;
}

}  // namespace

TEST(ModelMoELimits, OneExpertTopOneNoSharedEqualsDense) {
  auto dense_mc = small_config();
  auto moe_mc = dense_mc;
  moe_mc.ffn = "moe";
  moe_mc.n_experts = 1;
  moe_mc.top_k = 1;
  moe_mc.n_shared_experts = 0;
  moe_mc.expert_hidden = dense_mc.ffn_hidden;
  RouterConfig rc;  // Z+Aux top-k: softmax over one expert is a gate of exactly 1
  torch::manual_seed(21);
  Transformer dense(dense_mc, rc);
  torch::manual_seed(22);
  Transformer moe(moe_mc, rc);

  // Copy every weight the two models share by name, and the dense MLP into the
  // single expert (nn::Linear stores [out, in]; experts store [E, in, out]).
  {
    torch::NoGradGuard no_grad;
    auto moe_params = moe->named_parameters();
    for (const auto& p : dense->named_parameters()) {
      if (auto* q = moe_params.find(p.key())) q->copy_(p.value());
    }
    for (int64_t l = 0; l < dense_mc.n_layers; ++l) {
      auto& mlp = dense->blocks[l]->as<BlockImpl>()->mlp;
      auto& experts = moe->blocks[l]->as<BlockImpl>()->moe->experts;
      experts->w1_EDH[0].copy_(mlp->w1->weight.t());
      experts->w3_EDH[0].copy_(mlp->w3->weight.t());
      experts->w2_EHD[0].copy_(mlp->w2->weight.t());
    }
  }

  auto tokens = torch::randint(dense_mc.vocab_size, {3, dense_mc.seq_len}, torch::kInt64);
  auto out_dense = dense(tokens);
  auto out_moe = moe(tokens);
  EXPECT_TRUE(torch::allclose(out_moe.logits_BTV, out_dense.logits_BTV, 1e-5, 1e-6))
      << (out_moe.logits_BTV - out_dense.logits_BTV).abs().max().item<double>();
  // Every token goes to the one expert; aux = α·1·(1·1) per layer = α, summed over layers.
  for (const auto& r : out_moe.routing) {
    EXPECT_EQ(r.tokens_per_expert_E.item<int64_t>(), tokens.numel());
    EXPECT_TRUE(torch::allclose(r.gates_TK, torch::ones_like(r.gates_TK)));
  }
  EXPECT_NEAR(out_moe.aux_loss.item<double>(), rc.aux_alpha * double(moe_mc.n_layers), 1e-7);

  // Same gradients too (the router's own is the only extra one: a 1-way softmax is flat).
  out_dense.logits_BTV.pow(2).mean().backward();
  out_moe.logits_BTV.pow(2).mean().backward();
  EXPECT_TRUE(torch::allclose(moe->tok_emb->weight.grad(), dense->tok_emb->weight.grad(), 1e-4, 1e-7));
  auto& mlp0 = dense->blocks[0]->as<BlockImpl>()->mlp;
  auto& experts0 = moe->blocks[0]->as<BlockImpl>()->moe->experts;
  EXPECT_TRUE(torch::allclose(experts0->w1_EDH.grad()[0], mlp0->w1->weight.grad().t(), 1e-4, 1e-7));
}

TEST(ModelMoELimits, MiniGranularMoEOverfitsASmallBatch) {
  // The mini Granular Z+Aux recipe's MoE (d = 128, 1 shared + 15 routed experts
  // of width 88, top-3), 2 blocks and a 256-token vocabulary to stay fast.
  // Random tokens: the loss starts at ln 256 ≈ 5.5 and must fall below 0.5
  // (a memorised batch) within 60 AdamW steps.
  const auto cfg = load_config(std::string(MOECPT_SOURCE_DIR) + "/recipes/mini/granular-aux.toml",
                               {"model.vocab_size=256", "model.n_layers=2", "model.seq_len=32"});
  ASSERT_EQ(cfg.model.ffn, "moe");
  torch::manual_seed(23);
  Transformer model(cfg.model, cfg.router);
  model->train();
  torch::optim::AdamW opt(model->parameters(), torch::optim::AdamWOptions(3e-3).betas({0.9, 0.95}));
  auto tokens = torch::randint(cfg.model.vocab_size, {4, cfg.model.seq_len + 1}, torch::kInt64);
  auto inputs = tokens.narrow(1, 0, cfg.model.seq_len), targets = tokens.narrow(1, 1, cfg.model.seq_len);
  double first = 0, last = 0;
  for (int step = 0; step < 60; ++step) {
    auto out = model(inputs);
    auto lm = torch::cross_entropy_loss(out.logits_BTV.reshape({-1, cfg.model.vocab_size}), targets.reshape({-1}));
    opt.zero_grad();
    (lm + out.aux_loss + out.z_loss).backward();
    torch::nn::utils::clip_grad_norm_(model->parameters(), 1.0);
    opt.step();
    (step == 0 ? first : last) = lm.item<double>();
  }
  EXPECT_GT(first, 5.0);
  EXPECT_LT(last, 0.5) << "first " << first;
}
