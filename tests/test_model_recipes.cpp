// Every recipe under recipes/ loads and validates, and the model recipes have
// the structure the study needs (paper sizes, FLOP matching within a folder).
#include <gtest/gtest.h>

#include <filesystem>

#include "core/config.h"
#include "model/flops.h"
#include "report/study.h"

using namespace moecpt;
using namespace moecpt::model;
namespace fs = std::filesystem;

namespace {

const fs::path kRecipes = fs::path(MOECPT_SOURCE_DIR) / "recipes";

Config recipe(const std::string& rel) { return load_config((kRecipes / rel).string()); }

}  // namespace

TEST(ModelRecipes, EveryRecipeLoads) {
  int64_t n = 0;
  for (const auto& entry : fs::recursive_directory_iterator(kRecipes)) {
    if (!entry.is_regular_file() || entry.path().extension() != ".toml") continue;
    const std::string path = entry.path().string();
    // recipes/data/ holds data-preparation configs (tokenizer, corpora); all
    // others are run configs.
    // recipes/study/ holds study recipes (a plan of arms, see docs/study.md).
    const bool is_data_prep = entry.path().parent_path().filename() == "data";
    const bool is_study = entry.path().parent_path().filename() == "study";
    if (is_study) {
      EXPECT_NO_THROW(report::plan_study(path, (fs::temp_directory_path() / "moecpt-recipe-plan").string(), true)) << path;
    } else if (is_data_prep) {
      EXPECT_NO_THROW(load_data_prep_config(path)) << path;
    } else {
      EXPECT_NO_THROW(load_config(path)) << path;
    }
    ++n;
  }
  EXPECT_GE(n, 15);  // paper/ (6) + mini/ (6) + quickstart/ + data/
}

TEST(ModelRecipes, PaperRecipesHaveThePaperShapes) {
  for (const std::string name : {"dense", "switch-aux", "switch-sinkhorn", "granular-aux", "granular-sinkhorn"}) {
    const auto c = recipe("paper/" + name + ".toml");
    SCOPED_TRACE(name);
    EXPECT_EQ(c.model.n_layers, 24);
    EXPECT_EQ(c.model.d_model, 1024);
    EXPECT_EQ(c.model.n_heads, 16);
    EXPECT_EQ(c.model.seq_len, 2048);
    EXPECT_EQ(c.model.vocab_size, 128256);
    EXPECT_FALSE(c.model.tie_embeddings);
    EXPECT_EQ(c.optim.lr, 3e-4);
    EXPECT_EQ(c.optim.min_lr, 3e-5);
    EXPECT_EQ(c.optim.beta2, 0.95);
    EXPECT_EQ(c.optim.weight_decay, 0.1);
    EXPECT_EQ(c.optim.grad_clip, 1.0);
    EXPECT_EQ(c.schedule.warmup_fraction, 0.01);
    EXPECT_EQ(c.train.batch_size, 1024);
    EXPECT_EQ(c.router.type, name.ends_with("sinkhorn") ? "sinkhorn" : "topk");
  }
  // Dense ≈ 570M; Granular ≈ 2.0B total and as many active parameters as dense.
  const auto dense = count_params(recipe("paper/dense.toml").model);
  const auto granular = count_params(recipe("paper/granular-aux.toml").model);
  EXPECT_NEAR(double(dense.total), 570e6, 15e6);
  EXPECT_NEAR(double(granular.total), 2.0e9, 0.1e9);
  // Active = dense + the routers (24 · d · E ≈ 0.76M, 0.13 %).
  EXPECT_NEAR(double(granular.active), double(dense.total), 0.002 * double(dense.total));
}

TEST(ModelRecipes, MoERecipesAreFlopMatchedToTheirDense) {
  for (const std::string scale : {"paper", "mini"}) {
    const auto dense = recipe(scale + "/dense.toml").model;
    for (const std::string name : {"switch-aux", "switch-sinkhorn", "granular-aux", "granular-sinkhorn"}) {
      SCOPED_TRACE(scale + "/" + name);
      const auto moe = recipe(scale + "/" + name + ".toml").model;
      EXPECT_EQ(moe.ffn, "moe");
      EXPECT_EQ(flop_matched_dense(moe).ffn_hidden, dense.ffn_hidden);
      // Same per-token FLOPs as the dense model up to the router's d·E per block.
      const int64_t router = 6 * moe.n_layers * moe.d_model * moe.n_experts;
      EXPECT_EQ(train_flops_per_token(moe), train_flops_per_token(dense) + router);
    }
  }
}
