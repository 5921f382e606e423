// The routing-diagnostics section of the study report (report_routing.h):
// built from a hand-made `analyze routing` JSON, every heatmap cell and table
// value is checked against the numbers put in; then the study's saving step on
// tiny trained checkpoints (PT with Sinkhorn, CPT from it on another domain).
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/atomic_file.h"
#include "core/config.h"
#include "data/shard.h"
#include "report/report.h"
#include "report/report_routing.h"
#include "test_shards.h"
#include "test_util.h"
#include "train/trainer.h"

namespace moecpt::report {
namespace {
using nlohmann::json;

size_t count(const std::string& s, const std::string& what) {
  size_t n = 0;
  for (size_t p = s.find(what); p != std::string::npos; p = s.find(what, p + 1)) ++n;
  return n;
}

// E = 3 experts, K = 1, MoE layers at blocks 1 and 3, data sets en (old) and de (new).
json layer(double mri, std::vector<std::vector<double>> coact, double spec, int layer_block) {
  return {{"layer", layer_block},
          {"mri", mri},
          {"loads", {0.5, 0.3, 0.2}},
          {"entropy", 0.9},
          {"dead_experts", json::array()},
          {"coactivation", coact},
          {"specialisation", {{"mean", spec}, {"mean_unweighted", spec}, {"token_ids", 42}, {"occurrences", 900}}}};
}

json hand_arm(bool sinkhorn) {
  // Co-activation after CPT (this) and before (compare); Δ = after − before.
  const std::vector<std::vector<double>> after = {{1, 0.5, 0.1}, {0.4, 1, 0.0}, {0.2, 0.3, 1}};
  const std::vector<std::vector<double>> before = {{1, 0.2, 0.1}, {0.4, 1, 0.25}, {0.2, 0.3, 1}};
  std::vector<std::vector<double>> delta = after;
  for (size_t i = 0; i < 3; ++i)
    for (size_t j = 0; j < 3; ++j) delta[i][j] -= before[i][j];
  json per_mode = json::object();
  for (const char* mode : {"inference", "training"}) {
    if (!sinkhorn && std::string(mode) == "training") continue;
    const bool tr = std::string(mode) == "training";
    json per_ds = json::object();
    for (const char* ds : {"en", "de"}) {
      json layers = json::array();
      for (int l = 0; l < 2; ++l) {
        json lj = layer(tr ? 0.4 : 0.9, after, tr ? 0.5 : 0.612 + 0.1 * l, 2 * l + 1);
        json cj = layer(0.8, before, 0.7, 2 * l + 1);
        cj.erase("layer");
        cj["coactivation_delta"] = delta;
        cj["overlap"] = 0.75;
        cj["changed_share"] = 0.25;
        cj["top_changed_tokens"] = json::array(
            {{{"token_id", 17}, {"text", " the"}, {"occurrences", 120}, {"expert_before", 0}, {"expert_after", 2},
              {"share_before", 0.9}, {"share_after", 0.6}, {"share_before_after", 0.3}, {"change", 0.6}},
             {{"token_id", 99}, {"text", "<b>&amp"}, {"occurrences", 30}, {"expert_before", 1}, {"expert_after", 0},
              {"share_before", 0.8}, {"share_after", 0.55}, {"share_before_after", 0.4}, {"change", 0.4}}});
        lj["compare"] = cj;
        if (tr) lj["sinkhorn"] = {{"iters_mean", 7.5}, {"iters_max", 12}, {"error_mean", 0.006}, {"error_max", 0.0098}};
        layers.push_back(lj);
      }
      per_ds[ds] = layers;
    }
    per_mode[mode] = per_ds;
  }
  json aff = json::array();
  for (int l = 0; l < 2; ++l)
    aff.push_back({{"layer", 2 * l + 1},
                   {"datasets", {"en", "de"}},
                   {"share", {{0.9, 0.1}, {0.7, 0.3}, {0.2, 0.8}}},
                   {"compare_share", {{0.6, 0.4}, {0.6, 0.4}, {0.8, 0.2}}}});
  json rep = {{"kind", "routing"},
              {"compare", "arms/pt/checkpoints/final"},
              {"router", sinkhorn ? "sinkhorn" : "topk"},
              {"n_experts", 3},
              {"top_k", 1},
              {"balanced_mri", 1.0 / 3},
              {"moe_layers", {1, 3}},
              {"batch_size", 4},
              {"seq_len", 8},
              {"min_occurrences", 10},
              {"modes", sinkhorn ? json({"inference", "training"}) : json({"inference"})},
              {"datasets", {{"en", {{"tokens", 64}, {"loss", 5.5}, {"compare_loss", 5.25}}},
                            {"de", {{"tokens", 64}, {"loss", 4.5}, {"compare_loss", 6.0}}}}},
              {"routing", per_mode},
              {"domain_affinity", {{"inference", aff}}}};
  if (sinkhorn)
    rep["mode_gap"] = {{"en", {{{"layer", 1}, {"overlap", 0.55}, {"changed_share", 0.45}, {"mri_inference", 0.9},
                                {"mri_training", 0.4}},
                               {{"layer", 3}, {"overlap", 0.6}, {"changed_share", 0.4}, {"mri_inference", 0.9},
                                {"mri_training", 0.4}}}}};
  return {{"name", sinkhorn ? "cpt-r40-granular-sinkhorn" : "cpt-r40-granular-aux"},
          {"kind", "cpt"},
          {"model", sinkhorn ? "granular-sinkhorn" : "granular-aux"},
          {"variant", "r40"},
          {"router", sinkhorn ? "sinkhorn" : "topk"},
          {"compare_label", "PT"},
          {"seconds", 1.0},
          {"report", rep}};
}

TEST(ReportRouting, CoactivationHeatmapsHoldBeforeAfterAndChange) {
  const auto s = coactivation_figures(hand_arm(false), "de", 0);
  EXPECT_EQ(count(s, "<svg"), 3u);
  EXPECT_EQ(count(s, "</svg>"), 3u);
  EXPECT_EQ(count(s, "<rect class=\"cell\""), 3u * 9u);
  // Cell titles carry the values (3 decimals): before 0.2, after 0.5, change +0.3 at (e0, e1).
  EXPECT_NE(s.find("PT: co-activation, layer 1, de"), std::string::npos);
  EXPECT_NE(s.find("<title>e0 · e1: 0.200</title>"), std::string::npos);
  EXPECT_NE(s.find("<title>e0 · e1: 0.500</title>"), std::string::npos);
  EXPECT_NE(s.find("<title>e0 · e1: 0.300</title>"), std::string::npos);
  EXPECT_NE(s.find("<title>e1 · e2: -0.250</title>"), std::string::npos);
  // The diagonal (1 by definition) is grey, not part of the colour scale.
  EXPECT_EQ(count(s, "fill=\"#ccc\"><title>e1 · e1: –</title>"), 3u);
  // Shared scale 0 … 0.5 (largest off-diagonal share): the 0.5 cell is the top of viridis.
  EXPECT_NE(s.find("fill=\"#fde725\"><title>e0 · e1: 0.500"), std::string::npos);
}

TEST(ReportRouting, DomainAffinityBeforeAfterAndChange) {
  const auto s = domain_affinity_figures(hand_arm(false), 1);
  EXPECT_EQ(count(s, "<svg"), 2u);
  // 3 experts × (2 data sets before + 2 after), then 3 × 2 changes.
  EXPECT_EQ(count(s, "<rect class=\"cell\""), 3u * 4u + 3u * 2u);
  EXPECT_NE(s.find("Domain affinity, layer 3"), std::string::npos);
  EXPECT_NE(s.find("<title>e2 · PT de: 0.200</title>"), std::string::npos);
  EXPECT_NE(s.find("<title>e2 · CPT de: 0.800</title>"), std::string::npos);
  EXPECT_NE(s.find("<title>e2 · de: 0.600</title>"), std::string::npos);
  EXPECT_NE(s.find("<title>e0 · de: -0.300</title>"), std::string::npos);
  // Annotated: the value is printed in the cell too.
  EXPECT_NE(s.find(">0.80</text>"), std::string::npos);
}

TEST(ReportRouting, SpecialisationNumbersAndEscapedTokens) {
  const auto s = specialisation_html(hand_arm(false), "en", "de");
  EXPECT_EQ(count(s, "<svg"), 1u);
  // 2 layers × 4 series (before/after × en/de).
  EXPECT_EQ(count(s, "<rect class=\"bar\""), 8u);
  EXPECT_NE(s.find("<title>after CPT, en · layer 3: 0.712</title>"), std::string::npos);
  EXPECT_NE(s.find("<td class=\"n\">0.700</td><td class=\"n\">0.612</td><td class=\"n\">-0.088</td>"), std::string::npos);
  // Tokens: decoded text, made visible and escaped.
  EXPECT_NE(s.find("<code>\u2423the</code>"), std::string::npos);
  EXPECT_NE(s.find("<code>&lt;b&gt;&amp;amp</code>"), std::string::npos);
  EXPECT_EQ(s.find("<b>&amp"), std::string::npos);
  EXPECT_NE(s.find("e0 → e2</td><td class=\"n\">0.900 → 0.300</td><td class=\"n\">0.600</td>"), std::string::npos);
  EXPECT_EQ(visible_token(" a\tb\n "), "\u2423a\u2192b\u21b5\u2423");
}

TEST(ReportRouting, SinkhornModesSideBySide) {
  EXPECT_EQ(sinkhorn_modes_html(hand_arm(false)), "");
  const auto s = sinkhorn_modes_html(hand_arm(true));
  EXPECT_EQ(count(s, "<svg"), 1u);
  EXPECT_EQ(count(s, "<rect class=\"bar\""), 4u);  // 2 layers × 2 modes on en
  EXPECT_NE(s.find("<title>inference mode (top-k of raw scores) · en L1: 0.90</title>"), std::string::npos);
  EXPECT_NE(s.find("<title>training mode (Sinkhorn-balanced) · en L3: 0.40</title>"), std::string::npos);
  // MRI inference, training, gap, k/E, overlap, changed; dead; specialisation; Sinkhorn iterations and error.
  EXPECT_NE(s.find("<td class=\"n\">0.900</td><td class=\"n\">0.400</td><td class=\"n\">+0.500</td><td class=\"n\">0.333"
                   "</td><td class=\"n\">0.550</td><td class=\"n\">0.450</td>"),
            std::string::npos);
  EXPECT_NE(s.find("0.612 / 0.500"), std::string::npos);
  EXPECT_NE(s.find("7.5 / 12</td><td class=\"n\">0.0060 / 0.0098"), std::string::npos);
  EXPECT_NE(s.find("32 tokens"), std::string::npos);  // T = batch 4 × seq 8
}

TEST(ReportRouting, ConvergenceFromTrainingMetrics) {
  testing::TempDir dir;
  testing::write_text(dir / "metrics.jsonl",
                      "{\"kind\":\"train\",\"step\":5,\"mri\":[0.5,0.6]}\n"
                      "{\"kind\":\"train\",\"step\":10,\"mri\":[0.4,0.5],\"sinkhorn_iters\":[6,100],"
                      "\"sinkhorn_error\":[0.008,0.02],\"mri_ideal\":0.2}\n"
                      "{\"kind\":\"eval\",\"step\":10}\nnot json\n"
                      "{\"kind\":\"train\",\"step\":20,\"mri\":[0.3,0.35],\"sinkhorn_iters\":[4,9],"
                      "\"sinkhorn_error\":[0.005,0.009],\"mri_ideal\":0.2}\n");
  json c = read_sinkhorn_convergence(dir / "metrics.jsonl");
  EXPECT_EQ(c["step"], json({10, 20}));
  EXPECT_EQ(c["iters"], json({{6, 100}, {4, 9}}));
  EXPECT_EQ(c["error"][0][1].get<double>(), 0.02);
  EXPECT_EQ(c["mri"][1], json({0.3, 0.35}));
  EXPECT_DOUBLE_EQ(c["mri_ideal"].get<double>(), 0.2);
  c["name"] = "pt-sinkhorn";
  c["tol"] = 0.01;
  c["max_iters"] = 100;
  const auto s = convergence_figures(c);
  EXPECT_EQ(count(s, "<svg"), 3u);
  EXPECT_EQ(count(s, "<path class=\"series\""), 6u);  // 3 plots × 2 layers
  EXPECT_EQ(count(s, "<circle class=\"point\""), 12u);
  EXPECT_NE(s.find("pt-sinkhorn: Sinkhorn iterations used"), std::string::npos);
  EXPECT_TRUE(read_sinkhorn_convergence(dir / "missing.jsonl")["step"].empty());
}

TEST(ReportRouting, SectionRendersFromTheSavedResults) {
  StudyResults r;
  r.study = {{"name", "t"}, {"old", "en"}, {"new", "de"}};
  EXPECT_NE(render_routing_section(r).find("No routing diagnostics"), std::string::npos);
  r.analysis["routing"] = {{"tokens_per_dataset", 64}, {"seconds", 2.0}, {"main_variant", "r40"}, {"old", "en"},
                           {"new", "de"},
                           {"arms", {hand_arm(false), hand_arm(true)}},
                           {"convergence", json::array()}};
  const auto s = render_routing_section(r);
  EXPECT_NE(s.find("<h2 id=\"routing\">"), std::string::npos);
  EXPECT_EQ(count(s, "<svg"), count(s, "</svg>"));
  // Per arm: 3 co-activation + the change in the other layer, 2 affinity + 2 more, 1 specialisation; Sinkhorn +1.
  EXPECT_EQ(count(s, "<svg"), 2u * (3 + 1 + 4 + 1) + 1u);
  EXPECT_EQ(count(coactivation_figures(hand_arm(false), "de", 1, true), "<rect class=\"cell\""), 9u);
  // Summary table: loss, MRI (mean over layers), overlap, changed, specialisation before → after.
  EXPECT_NE(s.find("<td>de</td><td class=\"n\">6.000 → 4.500</td><td class=\"n\">0.800 → 0.900</td><td class=\"n\">0.750"
                   "</td><td class=\"n\">0.250</td><td class=\"n\">0.700 → 0.662</td>"),
            std::string::npos);
  // The new domain took over e2 (0.2 → 0.8) in both layers, and no other expert.
  EXPECT_EQ(count(s, "<li>layer 1: e2 0.200→0.800</li>"), 2u);
  // Whole report: the section sits in it.
  r.arms = json::array();
  r.curves = json::object();
  const auto html = render_report(r);
  EXPECT_NE(html.find("<h2 id=\"routing\">"), std::string::npos);
}

// --- the study's saving step on tiny trained checkpoints -----------------------------

void write_domain(const std::string& dir, uint32_t step) { testing::write_domain(dir, step, 12); }

TEST(ReportRouting, StudySavesDiagnosticsForCptArmsAndRendersThem) {
  testing::TempDir dir;
  write_domain(dir / "d0", 1);
  write_domain(dir / "d1", 3);
  testing::write_text(dir / "base.toml", testing::tiny_model_toml() + R"(ffn = "moe"
n_experts = 4
top_k = 2
expert_hidden = 16
[router]
type = "sinkhorn"
aux_alpha = 0.0
z_beta = 0.0
[optim]
lr = 1e-2
min_lr = 1e-3
[train]
steps = 8
batch_size = 8
log_every = 4
eval_every = 0
eval_batches = 1
[data]
shard_dir = ")" + dir.path().string() + R"("
validation = ["d0", "d1"]
)");
  StudyPlan plan;
  plan.old_data = "d0";
  plan.new_data = "d1";
  plan.validation = {"d0", "d1"};
  plan.saturation_batches = 2;
  StudyArm pt;
  pt.name = "pt-moe", pt.kind = "pt", pt.model = "moe", pt.variant = "pt";
  pt.config = load_config(dir / "base.toml", {"run.out_dir=\"" + (dir / "pt") + "\"", "data.train=[\"d0\"]"});
  StudyArm cpt;
  cpt.name = "cpt-r0-moe", cpt.kind = "cpt", cpt.model = "moe", cpt.variant = "r0";
  cpt.parent = "pt-moe", cpt.parent_checkpoint = "final";
  cpt.config = load_config(dir / "base.toml", {"run.out_dir=\"" + (dir / "cpt") + "\"", "data.train=[\"d1\"]",
                                               "train.init_from=\"" + (dir / "pt/checkpoints/final") + "\""});
  plan.arms = {pt, cpt};
  train(pt.config);
  train(cpt.config);
  std::filesystem::create_directories(dir / "results");
  testing::write_text(dir / "results/analysis.json", "{\"saturation\": {\"x\": 1}}\n");
  save_routing_diagnostics(plan, dir / "results");
  const json a = json::parse(testing::read_text(dir / "results/analysis.json"));
  EXPECT_EQ(a["saturation"]["x"], 1);  // merged, not replaced
  const json& g = a["routing"];
  // The PT checkpoint is the CPT arm's "compare": analysed once, there.
  ASSERT_EQ(g["arms"].size(), 1u);
  const json& rep = g["arms"][0]["report"];
  EXPECT_EQ(g["arms"][0]["name"], "cpt-r0-moe");
  EXPECT_EQ(rep["compare"], dir / "pt/checkpoints/final");
  EXPECT_EQ(rep["modes"], json({"inference", "training"}));
  // Budget: saturation_batches (2) × batch 8 × seq 16 = 256 tokens per data set.
  EXPECT_EQ(g["tokens_per_dataset"], 256);
  EXPECT_EQ(rep["datasets"]["d0"]["tokens"], 256);
  EXPECT_EQ(rep["routing"]["inference"]["d1"][0]["coactivation"].size(), 4u);
  // Sinkhorn convergence of both arms, at log_every = 4: steps 4 and 8.
  ASSERT_EQ(g["convergence"].size(), 2u);
  EXPECT_EQ(g["convergence"][1]["step"], json({4, 8}));
  EXPECT_EQ(g["convergence"][1]["iters"][0].size(), 2u);
  // A second run reads the cache and gives the same report.
  ASSERT_TRUE(std::filesystem::exists(dir / "cpt/routing_diagnostics.json"));
  save_routing_diagnostics(plan, dir / "results");
  EXPECT_EQ(json::parse(testing::read_text(dir / "results/analysis.json"))["routing"]["arms"][0]["report"], rep);

  StudyResults r;
  r.study = {{"old", "d0"}, {"new", "d1"}};
  r.analysis = a;
  const auto s = render_routing_section(r);
  // 4 experts: co-activation before/after/change of one layer and the change of the other
  // (16 cells each), domain affinity of both layers (4 × 4 before|after, 4 × 2 change).
  EXPECT_EQ(count(s, "<rect class=\"cell\""), 4u * 16u + 2u * (4u * 4u + 4u * 2u));
  EXPECT_EQ(count(s, "<svg"), count(s, "</svg>"));
  EXPECT_NE(s.find("Sinkhorn convergence in training"), std::string::npos);
}

}  // namespace
}  // namespace moecpt::report
