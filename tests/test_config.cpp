// Config loading: defaults, overrides, inheritance and every kind of bad input.
#include <gtest/gtest.h>

#include "core/config.h"
#include "core/error.h"
#include "test_util.h"

namespace moecpt {
namespace {

std::string error_of(const std::string& toml, const std::vector<std::string>& sets = {}) {
  try {
    parse_config(toml, "recipe.toml", sets);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(Config, EmptyFileGivesDefaults) {
  Config c = parse_config("", "x.toml");
  EXPECT_EQ(c.model.d_model, 128);
  EXPECT_EQ(c.router.type, "topk");
  EXPECT_DOUBLE_EQ(c.router.aux_alpha, 0.01);
  EXPECT_DOUBLE_EQ(c.router.z_beta, 0.001);
  EXPECT_DOUBLE_EQ(c.optim.beta2, 0.95);
}

TEST(Config, ReadsValuesAndIntegersAsFloats) {
  Config c = parse_config("[model]\nn_layers = 6\n[optim]\nlr = 1\n[data]\ntrain = [\"de\"]\n", "x.toml");
  EXPECT_EQ(c.model.n_layers, 6);
  EXPECT_DOUBLE_EQ(c.optim.lr, 1.0);
  EXPECT_EQ(c.data.train, std::vector<std::string>{"de"});
}

TEST(Config, CommandLineOverridesWin) {
  Config c = parse_config("[model]\nn_layers = 6\n", "x.toml",
                          {"model.n_layers=4", "router.type=sinkhorn", "data.replay=[\"en\",\"code\"]",
                           "data.train=de", "optim.lr=2e-4"});
  EXPECT_EQ(c.model.n_layers, 4);
  EXPECT_EQ(c.router.type, "sinkhorn");  // bare word parsed as a string
  EXPECT_EQ(c.data.replay, (std::vector<std::string>{"en", "code"}));
  EXPECT_EQ(c.data.train, std::vector<std::string>{"de"});
  EXPECT_DOUBLE_EQ(c.optim.lr, 2e-4);
}

TEST(Config, UnknownKeyNamesFileAndKey) {
  auto e = error_of("[model]\nn_layer = 4\n");
  EXPECT_NE(e.find("recipe.toml"), std::string::npos) << e;
  EXPECT_NE(e.find("unknown key 'model.n_layer'"), std::string::npos) << e;
  e = error_of("[modle]\nx = 1\n");
  EXPECT_NE(e.find("unknown key 'modle'"), std::string::npos) << e;
}

TEST(Config, UnknownKeyFromCommandLineSaysSo) {
  auto e = error_of("", {"train.stpes=3"});
  EXPECT_NE(e.find("'train.stpes'"), std::string::npos) << e;
  EXPECT_NE(e.find("command line"), std::string::npos) << e;
}

TEST(Config, WrongTypeIsRejected) {
  auto e = error_of("[model]\nn_layers = \"four\"\n");
  EXPECT_NE(e.find("key 'model.n_layers'"), std::string::npos) << e;
  EXPECT_NE(e.find("expected an integer"), std::string::npos) << e;
  e = error_of("[model]\nn_layers = 4.5\n");
  EXPECT_NE(e.find("expected an integer"), std::string::npos) << e;
  e = error_of("[model]\ntie_embeddings = 1\n");
  EXPECT_NE(e.find("expected true or false"), std::string::npos) << e;
  e = error_of("[data]\ntrain = [1, 2]\n");
  EXPECT_NE(e.find("array of strings"), std::string::npos) << e;
  e = error_of("model = 3\n");
  EXPECT_NE(e.find("expected a table"), std::string::npos) << e;
}

TEST(Config, OutOfRangeValuesAreRejected) {
  auto e = error_of("[data]\nreplay = [\"en\"]\nreplay_fraction = 1.5\n");
  EXPECT_NE(e.find("key 'data.replay_fraction'"), std::string::npos) << e;
  EXPECT_NE(e.find("in [0, 1]"), std::string::npos) << e;
  e = error_of("", {"data.replay_fraction=-0.1"});
  EXPECT_NE(e.find("data.replay_fraction"), std::string::npos) << e;
  e = error_of("[optim]\nlr = 0\n");
  EXPECT_NE(e.find("> 0"), std::string::npos) << e;
  e = error_of("[model]\nactivation = \"relu\"\n");
  EXPECT_NE(e.find("expected one of \"geglu\", \"swiglu\""), std::string::npos) << e;
}

TEST(Config, CrossFieldChecks) {
  auto e = error_of("[model]\nffn = \"moe\"\nn_experts = 4\ntop_k = 5\nexpert_hidden = 8\n");
  EXPECT_NE(e.find("key 'model.top_k'"), std::string::npos) << e;
  EXPECT_NE(e.find("top_k <= n_experts (4), got 5"), std::string::npos) << e;
  e = error_of("[model]\nd_model = 100\nn_heads = 3\n");
  EXPECT_NE(e.find("model.n_heads"), std::string::npos) << e;
  e = error_of("[data]\nreplay_fraction = 0.3\n");
  EXPECT_NE(e.find("data.replay_fraction"), std::string::npos) << e;
  e = error_of("[data]\ntrain = [\"a\", \"b\"]\ntrain_weights = [1.0]\n");
  EXPECT_NE(e.find("data.train_weights"), std::string::npos) << e;
  e = error_of("[optim]\nlr = 1e-4\nmin_lr = 1e-3\n");
  EXPECT_NE(e.find("optim.min_lr"), std::string::npos) << e;
}

TEST(Config, SyntaxErrorNamesLine) {
  auto e = error_of("[model]\nn_layers = = 4\n");
  EXPECT_NE(e.find("recipe.toml:2"), std::string::npos) << e;
}

TEST(Config, EffectiveConfigRoundTrips) {
  Config c = parse_config("[model]\nffn = \"moe\"\nn_experts = 8\ntop_k = 2\nexpert_hidden = 64\n", "x.toml",
                          {"optim.lr=1.25e-4", "run.name=\"a \\\"quoted\\\" name\""});
  const std::string text = to_toml(c);
  Config back = parse_config(text, "effective.toml");
  EXPECT_EQ(to_toml(back), text);
  EXPECT_EQ(back.run.name, "a \"quoted\" name");
  EXPECT_DOUBLE_EQ(back.optim.lr, 1.25e-4);
  EXPECT_EQ(back.model.n_experts, 8);
}

TEST(Config, BaseRecipesMergeAndMissingFileIsNamed) {
  testing::TempDir dir;
  testing::write_text(dir / "base.toml", "[model]\nn_layers = 6\nd_model = 64\n[train]\nsteps = 7\n");
  testing::write_text(dir / "child.toml", "base = \"base.toml\"\n[model]\nn_layers = 2\n");
  Config c = load_config(dir / "child.toml");
  EXPECT_EQ(c.model.n_layers, 2);  // child wins
  EXPECT_EQ(c.model.d_model, 64);  // inherited
  EXPECT_EQ(c.train.steps, 7);
  try {
    load_config(dir / "missing.toml");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("missing.toml: config file not found"), std::string::npos) << e.what();
  }
}

TEST(Config, ShippedRecipesAreValid) {
  for (const char* r : {"recipes/quickstart/pt.toml", "recipes/quickstart/cpt.toml", "recipes/mini/granular-aux.toml"}) {
    EXPECT_NO_THROW(load_config(std::string(MOECPT_SOURCE_DIR) + "/" + r)) << r;
  }
  EXPECT_NO_THROW(load_data_prep_config(std::string(MOECPT_SOURCE_DIR) + "/recipes/data/corpora.toml"));
}

}  // namespace
}  // namespace moecpt
