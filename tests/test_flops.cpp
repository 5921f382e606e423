// Parameter and FLOP arithmetic (SPEC §2) against the built module and the paper's sizes.
#include <gtest/gtest.h>

#include "model/flops.h"
#include "model/transformer.h"

using namespace moecpt;
using namespace moecpt::model;

namespace {

ModelConfig paper_dense() {
  ModelConfig mc;
  mc.vocab_size = 128256;
  mc.d_model = 1024;
  mc.n_layers = 24;
  mc.n_heads = 16;
  mc.seq_len = 2048;
  mc.ffn_hidden = 2816;
  return mc;
}

ModelConfig paper_granular() {
  auto mc = paper_dense();
  mc.ffn = "moe";
  mc.n_experts = 31;
  mc.n_shared_experts = 1;
  mc.top_k = 3;
  mc.expert_hidden = 704;
  return mc;
}

int64_t module_numel(const ModelConfig& mc) {
  Transformer model(mc, RouterConfig{});
  int64_t n = 0;
  for (const auto& p : model->parameters()) n += p.numel();
  return n;
}

}  // namespace

TEST(FlopsParams, CountEqualsModuleNumel) {
  ModelConfig a;  // default mini dense, rmsnorm, untied
  a.vocab_size = 100;
  a.d_model = 32;
  a.n_layers = 3;
  a.ffn_hidden = 40;
  EXPECT_EQ(count_params(a).total, module_numel(a));
  EXPECT_EQ(count_params(a).active, count_params(a).total);

  auto b = a;  // MoE, layernorm, tied, shared experts, every other block
  b.ffn = "moe";
  b.norm = "layernorm";
  b.tie_embeddings = true;
  b.n_experts = 5;
  b.n_shared_experts = 2;
  b.top_k = 2;
  b.expert_hidden = 12;
  b.moe_every = 2;
  EXPECT_EQ(count_params(b).total, module_numel(b));

  auto c = b;  // Switch-style, all blocks MoE
  c.n_shared_experts = 0;
  c.top_k = 1;
  c.moe_every = 1;
  c.tie_embeddings = false;
  EXPECT_EQ(count_params(c).total, module_numel(c));
  const int64_t d = 32, he = 12;
  EXPECT_EQ(c.n_layers * (5 - 1) * 3 * d * he, count_params(c).total - count_params(c).active);
  EXPECT_EQ(count_params(c).embedding, 100 * 32);
}

TEST(FlopsParams, PaperScaleSizes) {
  // ≈570M dense; granular ≈2.0B total, ≈570M active (SPEC §2).
  const auto dense = count_params(paper_dense());
  EXPECT_NEAR(double(dense.total), 570e6, 10e6);
  const auto gran = count_params(paper_granular());
  EXPECT_NEAR(double(gran.total), 2.0e9, 0.05e9);
  EXPECT_NEAR(double(gran.active), double(dense.total), 1e6);  // differs by the routers only
  EXPECT_EQ(gran.active - dense.total, 24 * 1024 * 31);
}

TEST(FlopsTrain, FormulaByHand) {
  ModelConfig mc;
  mc.vocab_size = 10;
  mc.d_model = 4;
  mc.n_layers = 2;
  mc.n_heads = 2;
  mc.seq_len = 8;
  mc.ffn_hidden = 6;
  // per block: attn 4·16 + 2 norms·4 + mlp 3·4·6 = 64 + 8 + 72 = 144; final norm 4; head 40
  EXPECT_EQ(train_flops_per_token(mc), 6 * (2 * 144 + 4 + 40) + 6 * 2 * 8 * 4);
  mc.tie_embeddings = true;  // the head matmul still costs the same
  EXPECT_EQ(train_flops_per_token(mc), 6 * (2 * 144 + 4 + 40) + 6 * 2 * 8 * 4);
}

TEST(FlopsMatchedDense, EqualFfnFlops) {
  const auto moe = paper_granular();
  const auto dense = flop_matched_dense(moe);
  EXPECT_EQ(dense.ffn, "dense");
  EXPECT_EQ(dense.ffn_hidden, 2816);  // (S + k)·704
  EXPECT_EQ(dense.n_experts, 0);
  // Same FLOPs except the routers' d·E per MoE layer.
  EXPECT_EQ(train_flops_per_token(moe) - train_flops_per_token(dense), 6 * 24 * 1024 * 31);
  EXPECT_EQ(train_flops_per_token(dense), train_flops_per_token(paper_dense()));

  auto switch_moe = paper_dense();  // Switch: E = 8 experts of width h, top-1
  switch_moe.ffn = "moe";
  switch_moe.n_experts = 8;
  switch_moe.expert_hidden = 2816;
  EXPECT_EQ(flop_matched_dense(switch_moe).ffn_hidden, 2816);

  auto half = switch_moe;  // every other block MoE with width 2·h, others dense h
  half.expert_hidden = 2 * 2816;
  half.moe_every = 2;
  EXPECT_EQ(flop_matched_dense(half).ffn_hidden, (12 * 2 * 2816 + 12 * 2816) / 24);
}

TEST(FlopsLayers, MoeLayerIndices) {
  ModelConfig mc;
  mc.n_layers = 6;
  EXPECT_TRUE(moe_layer_indices(mc).empty());
  mc.ffn = "moe";
  EXPECT_EQ(moe_layer_indices(mc).size(), 6u);
  mc.moe_every = 2;
  EXPECT_EQ(moe_layer_indices(mc), (std::vector<int64_t>{1, 3, 5}));
  mc.moe_every = 3;
  EXPECT_EQ(moe_layer_indices(mc), (std::vector<int64_t>{2, 5}));
}
