// `moecpt bench train` end to end on a tiny override of a mini recipe: the JSON
// is complete and consistent with the library's FLOP count.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "core/config.h"
#include "model/flops.h"
#include "test_util.h"

using namespace moecpt;

namespace {
const std::string kRecipes = std::string(MOECPT_SOURCE_DIR) + "/recipes/";
const std::string kTiny = " --set model.vocab_size=256 --set model.d_model=32 --set model.seq_len=16";
}  // namespace

TEST(BenchCli, TrainJsonOnCpuWithFewerLayers) {
  const std::string path = kRecipes + "mini/granular-sinkhorn.toml";
  auto r = moecpt::testing::run_moecpt("bench train --config " + path + kTiny +
                                       " --layers 2 --steps 2 --warmup 1 --batch 2 --threads 1 --peak-tflops 0.5 --json");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto j = nlohmann::json::parse(r.output);
  auto mc = load_config(path, {"model.vocab_size=256", "model.d_model=32", "model.seq_len=16"}).model;
  EXPECT_EQ(j["model"]["config_n_layers"].get<int64_t>(), mc.n_layers);
  mc.n_layers = 2;
  EXPECT_EQ(j["model"]["n_layers"].get<int64_t>(), 2);
  EXPECT_EQ(j["device"], "cpu");
  EXPECT_EQ(j["tokens_per_step"].get<int64_t>(), 2 * 16);
  EXPECT_EQ(j["steps"].get<int64_t>(), 2);
  EXPECT_EQ(j["train_flops_per_token"].get<int64_t>(), model::train_flops_per_token(mc));
  const double tps = j["tokens_per_s"].get<double>(), tflops = j["tflops"].get<double>();
  EXPECT_GT(tps, 0);
  EXPECT_NEAR(tflops, tps * double(model::train_flops_per_token(mc)) / 1e12, 1e-9 * tflops);
  EXPECT_NEAR(j["mfu"].get<double>(), tflops / 0.5, 1e-12);
  EXPECT_NEAR(2.0 * 16 / (j["step_ms"]["median"].get<double>() / 1e3), tps, 1e-6 * tps);
  EXPECT_TRUE(std::isfinite(j["final_loss"].get<double>()));
  EXPECT_NEAR(j["final_loss"].get<double>(), std::log(256.0), 1.0);  // near-uniform at init
  EXPECT_GT(j["peak_rss_mib"].get<double>(), 0);
}

TEST(BenchCli, TextOutputSaysLayersWereReducedAndMeasuresCpuPeak) {
  auto r = moecpt::testing::run_moecpt("bench train --config " + kRecipes + "mini/dense.toml" + kTiny +
                                       " --layers 1 --steps 1 --warmup 0 --batch 1 --threads 1 --unfused-head");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("layers: 1 of the config's 4 (reduced with --layers)"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("MFU: "), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("measured 1024^3 float32 matmul"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("unfused head"), std::string::npos) << r.output;
}

TEST(BenchCli, CudaWithoutGpuIsAClearError) {
  auto r = moecpt::testing::run_moecpt("bench train --config " + kRecipes + "mini/dense.toml" + kTiny +
                                       " --steps 1 --device cuda");
  if (r.exit_code == 0) GTEST_SKIP() << "this build has CUDA and a device";
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.output.find("no CUDA device"), std::string::npos) << r.output;
}
