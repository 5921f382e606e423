// `moecpt flops` end to end: the binary's numbers equal the library's.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "core/config.h"
#include "model/flops.h"
#include "test_util.h"

using namespace moecpt;

namespace {
const std::string kRecipes = std::string(MOECPT_SOURCE_DIR) + "/recipes/";
}

TEST(FlopsCli, JsonMatchesLibraryAndGivesMatchedDense) {
  const std::string path = kRecipes + "paper/granular-aux.toml";
  auto r = moecpt::testing::run_moecpt("flops --config " + path + " --json");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto j = nlohmann::json::parse(r.output);
  const auto mc = load_config(path).model;
  const auto p = model::count_params(mc);
  EXPECT_EQ(j["params"]["total"].get<int64_t>(), p.total);
  EXPECT_EQ(j["params"]["active"].get<int64_t>(), p.active);
  EXPECT_EQ(j["params"]["embedding"].get<int64_t>(), 128256 * 1024);
  EXPECT_EQ(j["flops_per_token"]["train"].get<int64_t>(), model::train_flops_per_token(mc));
  EXPECT_EQ(3 * j["flops_per_token"]["forward"].get<int64_t>(), model::train_flops_per_token(mc));
  EXPECT_EQ(j["flops_per_token"]["attention_train"].get<int64_t>(), 6LL * 24 * 2048 * 1024);
  EXPECT_EQ(j["flop_matched_dense"]["ffn_hidden"].get<int64_t>(), 2816);
  const auto dense = model::count_params(load_config(kRecipes + "paper/dense.toml").model);
  EXPECT_EQ(j["flop_matched_dense"]["params"]["total"].get<int64_t>(), dense.total);
}

TEST(FlopsCli, TextOutputAndOverrides) {
  auto r = moecpt::testing::run_moecpt("flops --config " + kRecipes + "mini/switch-aux.toml --set model.n_experts=4");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("E=4 routed"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("FLOP-matched dense config: model.ffn = \"dense\", model.ffn_hidden = 352"),
            std::string::npos)
      << r.output;
  auto d = moecpt::testing::run_moecpt("flops --config " + kRecipes + "mini/dense.toml --json");
  ASSERT_EQ(d.exit_code, 0) << d.output;
  const auto j = nlohmann::json::parse(d.output);
  EXPECT_FALSE(j.contains("flop_matched_dense"));
  EXPECT_EQ(j["params"]["active"], j["params"]["total"]);
}

TEST(FlopsCli, BadConfigIsAnError) {
  auto r = moecpt::testing::run_moecpt("flops --config " + kRecipes + "mini/switch-aux.toml --set model.top_k=9");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.output.find("top_k"), std::string::npos) << r.output;
}
