// The analysis reports on tiny trained checkpoints: overlap of a checkpoint
// with itself is 1, forgetting of identical checkpoints is 0, Sinkhorn models
// get both modes, the CLI prints the documented JSON.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "analysis/reports.h"
#include "core/config.h"
#include "data/shard.h"
#include "test_shards.h"
#include "test_util.h"
#include "train/trainer.h"

namespace moecpt {
namespace {

// d0 counts up by 1, d1 by 3 (mod 60), as in the end-to-end test.
void write_domain(const std::string& dir, uint32_t step) { testing::write_domain(dir, step, 12); }

std::string recipe(const testing::TempDir& dir, const std::string& router) {
  return testing::tiny_model_toml() + R"(ffn = "moe"
n_experts = 4
top_k = 2
expert_hidden = 16
[router]
type = ")" + router + R"("
[optim]
lr = 1e-2
min_lr = 1e-3
[train]
steps = 12
batch_size = 8
log_every = 100
eval_every = 0
eval_batches = 1
checkpoint_every = 6
keep_last = 5
[data]
shard_dir = ")" + dir.path().string() + R"("
train = ["d0"]
validation = ["d0"]
)";
}

// Trained once for the whole suite: a top-k and a Sinkhorn run, 12 steps each.
class AnalysisReports : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new testing::TempDir();
    write_domain(*dir_ / "d0", 1);
    write_domain(*dir_ / "d1", 3);
    for (const char* r : {"topk", "sinkhorn"}) {
      testing::write_text(*dir_ / (std::string(r) + ".toml"), recipe(*dir_, r));
      train(load_config(*dir_ / (std::string(r) + ".toml"), {"run.out_dir=\"" + (*dir_ / r) + "\""}));
    }
  }
  static void TearDownTestSuite() { delete dir_; }
  static std::string ckpt(const std::string& run, const std::string& which = "final") {
    return *dir_ / (run + "/checkpoints/" + which);
  }
  static testing::TempDir* dir_;
};
testing::TempDir* AnalysisReports::dir_ = nullptr;

TEST_F(AnalysisReports, RoutingAgainstItselfOverlapsFully) {
  analysis::RoutingOptions o;
  o.checkpoint = ckpt("topk");
  o.compare = ckpt("topk");
  o.datasets = {"d0", "d1"};
  o.min_occurrences = 2;
  auto r = analysis::routing_report(o);
  EXPECT_EQ(r["kind"], "routing");
  EXPECT_EQ(r["modes"], nlohmann::json::array({"inference"}));
  EXPECT_EQ(r["moe_layers"], nlohmann::json::array({0, 1}));
  // 12 docs × 61 tokens = 732 tokens → 45 windows of 16 at stride 16.
  EXPECT_EQ(r["datasets"]["d0"]["tokens"], 45 * 16);
  for (const char* d : {"d0", "d1"}) {
    ASSERT_EQ(r["routing"]["inference"][d].size(), 2u);
    for (const auto& l : r["routing"]["inference"][d]) {
      EXPECT_DOUBLE_EQ(l["compare"]["overlap"].get<double>(), 1.0);
      EXPECT_DOUBLE_EQ(l["compare"]["changed_share"].get<double>(), 0.0);
      EXPECT_DOUBLE_EQ(l["compare"]["mri"].get<double>(), l["mri"].get<double>());
      EXPECT_TRUE(l["compare"]["top_changed_tokens"].empty());
      const double mri = l["mri"].get<double>();
      EXPECT_GE(mri, 0.5 - 1e-12);
      EXPECT_LE(mri, 1.0);
      double sum = 0;
      for (double f : l["loads"]) sum += f;
      EXPECT_NEAR(sum, 1.0, 1e-12);
      // MRI = k · max load (every token has k distinct experts).
      double mx = 0;
      for (double f : l["loads"]) mx = std::max(mx, f);
      EXPECT_NEAR(mri, 2 * mx, 1e-12);
      EXPECT_EQ(l["coactivation"].size(), 4u);
      const double spec = l["specialisation"]["mean"].get<double>();
      EXPECT_GE(spec, 0.5 - 1e-12);
      EXPECT_LE(spec, 1.0 + 1e-12);
    }
  }
  // Domain affinity: each expert's shares over the two datasets sum to 1 (or 0 if unused).
  for (const auto& row : r["domain_affinity"]["inference"][0]["share"]) {
    const double s = row[0].get<double>() + row[1].get<double>();
    EXPECT_TRUE(std::abs(s - 1.0) < 1e-9 || s == 0.0);
  }
  EXPECT_FALSE(r["datasets"]["d0"].contains("mode_gap"));
}

TEST_F(AnalysisReports, SinkhornHasBothModes) {
  analysis::RoutingOptions o;
  o.checkpoint = ckpt("sinkhorn");
  o.datasets = {"d0"};
  auto r = analysis::routing_report(o);
  EXPECT_EQ(r["modes"], nlohmann::json::array({"inference", "training"}));
  ASSERT_TRUE(r.contains("mode_gap"));
  const auto& tr = r["routing"]["training"]["d0"][0];
  EXPECT_GE(tr["sinkhorn"]["iters_mean"].get<double>(), 1.0);
  const auto& g = r["mode_gap"]["d0"][0];
  EXPECT_DOUBLE_EQ(g["mri_inference"].get<double>(), r["routing"]["inference"]["d0"][0]["mri"].get<double>());
  EXPECT_DOUBLE_EQ(g["mri_training"].get<double>(), tr["mri"].get<double>());
  EXPECT_GE(g["overlap"].get<double>(), 0.0);
  EXPECT_LE(g["overlap"].get<double>(), 1.0);

  // Training metrics: Sinkhorn convergence per MoE layer at the cadence (log_every = 100:
  // only the last step, 12) next to the balanced choice's MRI and its ideal k/E.
  std::ifstream in(*dir_ / "sinkhorn/metrics.jsonl");
  std::string line;
  int with = 0, without = 0;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line);
    if (j["kind"] != "train") continue;
    if (!j.contains("sinkhorn_iters")) {
      ++without;
      continue;
    }
    ++with;
    EXPECT_EQ(j["step"], 12);
    ASSERT_EQ(j["sinkhorn_iters"].size(), 2u);
    ASSERT_EQ(j["sinkhorn_error"].size(), 2u);
    for (size_t l = 0; l < 2; ++l) {
      const int64_t it = j["sinkhorn_iters"][l].get<int64_t>();
      EXPECT_GE(it, 1);
      EXPECT_LE(it, 100);
      // Stopped because converged, or at the cap.
      EXPECT_TRUE(j["sinkhorn_error"][l].get<double>() < 0.01 || it == 100);
    }
    EXPECT_DOUBLE_EQ(j["mri_ideal"].get<double>(), 0.5);
  }
  EXPECT_EQ(with, 1);
  EXPECT_EQ(without, 11);
  // Top-k runs carry none.
  std::ifstream tk(*dir_ / "topk/metrics.jsonl");
  while (std::getline(tk, line)) EXPECT_FALSE(nlohmann::json::parse(line).contains("sinkhorn_iters"));
}

TEST_F(AnalysisReports, SaturationOfACheckpointWithItselfIsOne) {
  analysis::SaturationOptions o;
  o.checkpoints = {ckpt("topk", "step-00000006"), ckpt("topk", "step-00000012"), ckpt("topk")};
  o.datasets = {"d0"};
  auto r = analysis::saturation_report(o);
  const auto& cs = r["datasets"]["d0"]["checkpoints"];
  ASSERT_EQ(cs.size(), 3u);
  EXPECT_EQ(cs[0]["step"], 6);
  // step 12 and final hold the same weights.
  for (const auto& v : cs[1]["overlap"]) EXPECT_DOUBLE_EQ(v.get<double>(), 1.0);
  for (const auto& v : cs[2]["overlap"]) EXPECT_DOUBLE_EQ(v.get<double>(), 1.0);
  for (const auto& v : cs[0]["overlap"]) EXPECT_LE(v.get<double>(), 1.0);
  const std::string csv = analysis::saturation_csv(r);
  EXPECT_EQ(csv.rfind("dataset,checkpoint,step,layer,overlap,changed_share\n", 0), 0u);
  EXPECT_EQ(std::count(csv.begin(), csv.end(), '\n'), 1 + 3 * 2);
}

TEST_F(AnalysisReports, ForgettingOfIdenticalCheckpointsIsZero) {
  analysis::ForgettingOptions o;
  o.before = ckpt("topk");
  o.after = ckpt("topk", "step-00000012");
  o.reference = ckpt("topk");
  o.datasets = {"d0", "d1"};
  auto r = analysis::forgetting_report(o);
  EXPECT_DOUBLE_EQ(r["forgetting"]["delta_loss"].get<double>(), 0.0);
  EXPECT_DOUBLE_EQ(r["adaptation"]["delta_loss"].get<double>(), 0.0);
  EXPECT_DOUBLE_EQ(r["datasets"]["d0"]["gap_to_reference"].get<double>(), 0.0);
  const double l0 = r["datasets"]["d0"]["before"]["loss"].get<double>();
  EXPECT_NEAR(r["datasets"]["d0"]["before"]["ppl"].get<double>(), std::exp(l0), 1e-9);
  // The pattern was trained on d0, not on d1.
  EXPECT_LT(l0, r["datasets"]["d1"]["before"]["loss"].get<double>());
  // Differs from a less-trained checkpoint.
  o.before = ckpt("topk", "step-00000006");
  auto r2 = analysis::forgetting_report(o);
  EXPECT_NE(r2["forgetting"]["delta_loss"].get<double>(), 0.0);
}

TEST_F(AnalysisReports, CliPrintsJsonAndNamesBadInputs) {
  auto res = testing::run_moecpt("analyze routing --checkpoint " + ckpt("topk") + " --data d0 --json --max-tokens 64");
  ASSERT_EQ(res.exit_code, 0) << res.output;
  auto j = nlohmann::json::parse(res.output.substr(res.output.find('{')));
  EXPECT_EQ(j["datasets"]["d0"]["tokens"], 64);
  auto bad = testing::run_moecpt("analyze routing --checkpoint " + (*dir_ / "nope") + " --data d0");
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.output.find("nope: checkpoint directory does not exist"), std::string::npos) << bad.output;
  auto bad2 = testing::run_moecpt("analyze forgetting --before " + ckpt("topk") + " --after " + ckpt("topk") +
                                  " --data d0 missing_set");
  EXPECT_NE(bad2.exit_code, 0);
  EXPECT_NE(bad2.output.find("missing_set/val.bin"), std::string::npos) << bad2.output;
}

}  // namespace
}  // namespace moecpt
