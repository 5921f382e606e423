// The study: recipe → arms (plan), verdicts computed from hand-made results,
// router overlap against a hand count, and (StudyE2E) a --quick study run end
// to end, its report rendered in headless Chromium.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <regex>

#include "core/error.h"
#include "report/report.h"
#include "report/results.h"
#include "report/study.h"
#include "test_util.h"

namespace moecpt::report {
namespace {
namespace fs = std::filesystem;
using nlohmann::json;

const std::string kSrc = MOECPT_SOURCE_DIR;

size_t count(const std::string& s, const std::string& what) {
  size_t n = 0;
  for (size_t p = s.find(what); p != std::string::npos; p = s.find(what, p + 1)) ++n;
  return n;
}

TEST(Study, MiniRecipePlansEveryArm) {
  const auto plan = plan_study(kSrc + "/recipes/study/mini.toml", "/tmp/study-x", false);
  ASSERT_FALSE(plan.arms.empty());
  std::map<std::string, const StudyArm*> by;
  for (const auto& a : plan.arms) by[a.name] = &a;
  for (const char* m : {"dense", "switch-aux", "switch-sinkhorn", "granular-aux", "granular-sinkhorn"}) {
    ASSERT_TRUE(by.count(std::string("pt-") + m)) << m;
    const auto& pt = *by[std::string("pt-") + m];
    EXPECT_EQ(pt.config.data.train, std::vector<std::string>{"en"});
    EXPECT_EQ(pt.config.schedule.type, "infinite");
    EXPECT_EQ(pt.config.run.out_dir, "/tmp/study-x/arms/pt-" + std::string(m));
  }
  // PT arms come first, CPT arms name their parent's checkpoint.
  EXPECT_EQ(plan.arms.front().kind, "pt");
  for (const auto& a : plan.arms) {
    if (a.kind != "cpt") continue;
    EXPECT_EQ(a.config.data.train, std::vector<std::string>{"de"});
    EXPECT_EQ(a.config.data.replay, std::vector<std::string>{"en"});
    EXPECT_DOUBLE_EQ(a.config.data.replay_fraction, a.replay);
    EXPECT_EQ(a.config.train.init_from, "/tmp/study-x/arms/" + a.parent + "/checkpoints/" + a.parent_checkpoint);
    EXPECT_EQ(a.parent_checkpoint, a.schedule == "infinite" ? "pre_anneal" : "final");
    if (a.schedule == "infinite") EXPECT_EQ(a.config.schedule.start, "constant");
    else EXPECT_EQ(a.config.schedule.warmup_from, "min_lr");
  }
  // Full re-training: PT + CPT steps, mixture weights = token budgets (D0: PT + r·CPT, D1: (1−r)·CPT).
  const auto* full = by.count("full-granular-aux") ? by["full-granular-aux"] : nullptr;
  ASSERT_NE(full, nullptr);
  const auto& pt = *by["pt-granular-aux"];
  const auto& cpt = *by["cpt-r40-rewarm-granular-aux"];
  EXPECT_EQ(full->config.train.steps, pt.config.train.steps + cpt.config.train.steps);
  ASSERT_EQ(full->config.data.train_weights.size(), 2u);
  EXPECT_NEAR(full->config.data.train_weights[0], pt.config.train.steps + 0.4 * cpt.config.train.steps, 1e-9);
  EXPECT_NEAR(full->config.data.train_weights[1], 0.6 * cpt.config.train.steps, 1e-9);
  // --quick: same arms, fewer steps.
  const auto quick = plan_study(kSrc + "/recipes/study/mini.toml", "/tmp/study-x", true);
  ASSERT_EQ(quick.arms.size(), plan.arms.size());
  for (size_t i = 0; i < plan.arms.size(); ++i) {
    EXPECT_EQ(quick.arms[i].name, plan.arms[i].name);
    EXPECT_LT(quick.arms[i].config.train.steps, plan.arms[i].config.train.steps);
    // [quick] set: a toy size, applied to every arm after the phase's own settings.
    EXPECT_LT(quick.arms[i].config.train.batch_size * quick.arms[i].config.model.seq_len,
              plan.arms[i].config.train.batch_size * plan.arms[i].config.model.seq_len);
  }
  // Tasks: paths resolved against the recipe, fewer items in --quick.
  ASSERT_FALSE(plan.tasks.empty());
  for (const auto& t : plan.tasks) EXPECT_TRUE(fs::exists(t)) << t;
  EXPECT_GT(plan.task_items, quick.task_items);
  EXPECT_GE(plan.saturation_batches, quick.saturation_batches);
}

// recipes/study/code.toml: the same arms with code as D1 and 30 % replay.
TEST(Study, CodeRecipePlansTheCodeShift) {
  const auto mini = plan_study(kSrc + "/recipes/study/mini.toml", "/tmp/study-x", false);
  const auto plan = plan_study(kSrc + "/recipes/study/code.toml", "/tmp/study-c", false);
  ASSERT_EQ(plan.arms.size(), mini.arms.size());
  int n_cpt = 0;
  for (const auto& a : plan.arms) {
    if (a.kind == "pt") {
      EXPECT_EQ(a.config.data.train, std::vector<std::string>{"en"});
    }
    if (a.kind != "cpt") continue;
    ++n_cpt;
    EXPECT_EQ(a.config.data.train, std::vector<std::string>{"code"});
    EXPECT_EQ(a.config.data.replay, std::vector<std::string>{"en"});
    EXPECT_TRUE(a.replay == 0.0 || a.replay == 0.3) << a.name;
    EXPECT_DOUBLE_EQ(a.config.data.replay_fraction, a.replay);
  }
  EXPECT_EQ(n_cpt, 10);
  for (const auto& t : plan.tasks) EXPECT_TRUE(fs::exists(t)) << t;
}

TEST(Study, BadRecipesNameTheKey) {
  testing::TempDir dir;
  const std::string good = R"(
[study]
name = "t"
data = "corpora.toml"
old = "en"
new = "de"
[models]
dense = "MODEL"
[pt]
steps = 10
[cpt]
steps = 5
)";
  auto with = [&](const std::string& extra, const std::string& model = kSrc + "/recipes/mini/dense.toml") {
    std::string t = std::regex_replace(good, std::regex("MODEL"), model) + extra;
    testing::write_text(dir / "s.toml", t);
    try {
      plan_study(dir / "s.toml", dir / "out", false);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_EQ(with(""), "no error");
  EXPECT_NE(with("[[cpt.variant]]\nname = \"v\"\nreplay_fraction = 0.4\nschedule = \"rewarm\"\nmodels = [\"moe\"]\n")
                .find("key 'cpt.variant[0].models': 'moe' is not a key of [models]"),
            std::string::npos);
  EXPECT_NE(with("[[cpt.variant]]\nname = \"v\"\nreplay_fraction = 1.5\nschedule = \"rewarm\"\nmodels = [\"dense\"]\n")
                .find("cpt.variant[0].replay_fraction': expected a value in [0, 1], got 1.5"),
            std::string::npos);
  EXPECT_NE(with("[[cpt.variant]]\nname = \"v\"\nreplay_fraction = 0.1\nschedule = \"sometimes\"\nmodels = [\"dense\"]\n")
                .find("cpt.variant[0].schedule'"),
            std::string::npos);
  // The PT here is cosine: an infinite-schedule CPT has no pre-anneal checkpoint to start from.
  EXPECT_NE(with("[[cpt.variant]]\nname = \"v\"\nreplay_fraction = 0.1\nschedule = \"infinite\"\nmodels = [\"dense\"]\n")
                .find("pre-anneal checkpoint"),
            std::string::npos);
  EXPECT_NE(with("[full]\nmodel = [\"dense\"]\n").find("key 'full.model': unknown key"), std::string::npos);
  EXPECT_NE(with("", dir / "missing.toml").find("missing.toml: config file not found"), std::string::npos);
}

// Results of a hand-made study: dense and one MoE, forgetting 0.06 vs 0.04.
StudyResults hand_results(double moe_forgetting) {
  StudyResults r;
  r.study = {{"name", "t"}, {"old", "en"}, {"new", "de"}, {"validation", {"en", "de"}}, {"replay_fraction", 0.4},
             {"tie_nats", 0.02}, {"tie_mri", 0.02}, {"arms_planned", {"pt-dense", "pt-granular-aux"}}};
  auto ev = [](double en, double de, std::vector<double> mri) {
    return json{{"en", {{"loss", en}, {"mri", mri}, {"loads", json::array()}}},
                {"de", {{"loss", de}, {"mri", mri}, {"loads", json::array()}}}};
  };
  auto arm = [&](std::string name, std::string kind, std::string model, std::string ffn, json init, json fin) {
    return json{{"name", name}, {"kind", kind}, {"model", model}, {"variant", kind == "cpt" ? "r40-rewarm" : kind},
                {"replay", kind == "cpt" ? 0.4 : 0.0}, {"schedule", kind == "cpt" ? "rewarm" : "infinite"},
                {"parent", kind == "cpt" ? "pt-" + model : ""}, {"ffn", ffn}, {"router", ffn == "moe" ? "topk" : "none"},
                {"n_experts", 4}, {"top_k", 1}, {"n_layers", 1}, {"steps", 10}, {"tokens", 1000}, {"seconds", 1.0},
                {"train_flops", 1e9}, {"initial_eval", init}, {"final_eval", fin}};
  };
  r.arms.push_back(arm("pt-dense", "pt", "dense", "dense", ev(9, 9, {}), ev(5.0, 7.0, {})));
  r.arms.push_back(arm("pt-granular-aux", "pt", "granular-aux", "moe", ev(9, 9, {0.5}), ev(4.9, 7.0, {0.3})));
  r.arms.push_back(arm("cpt-r40-rewarm-dense", "cpt", "dense", "dense", ev(5.0, 7.0, {}), ev(5.06, 6.0, {})));
  r.arms.push_back(arm("cpt-r40-rewarm-granular-aux", "cpt", "granular-aux", "moe", ev(4.9, 7.0, {0.3}),
                       ev(4.9 + moe_forgetting, 5.9, {0.3})));
  return r;
}

TEST(Study, VerdictsAreComputedFromTheNumbers) {
  auto f = compute_findings(hand_results(0.04));
  ASSERT_EQ(f.size(), 7u);
  const auto& forgetting = f[2];
  EXPECT_EQ(forgetting.id, 3);
  EXPECT_EQ(forgetting.verdict.rfind("MoEs forgot no more than dense", 0), 0u) << forgetting.verdict;
  EXPECT_NE(forgetting.verdict.find("Granular Z+Aux +0.040"), std::string::npos) << forgetting.verdict;
  EXPECT_NE(forgetting.verdict.find("Dense +0.060"), std::string::npos) << forgetting.verdict;
  // 0.10 > 0.06 + tie 0.02: the verdict turns, honestly.
  f = compute_findings(hand_results(0.10));
  EXPECT_EQ(f[2].verdict.rfind("At this scale Granular Z+Aux forgot more than dense (by 0.040", 0), 0u) << f[2].verdict;
  // Sample efficiency on de: 5.9 vs 6.0 → MoE better by 0.1 > tie.
  EXPECT_EQ(f[3].verdict.rfind("Yes: every MoE ends CPT below dense on de", 0), 0u) << f[3].verdict;
  // Nothing to say without a full re-training arm: marked as not available.
  EXPECT_FALSE(f[4].available);
  // The report renders with the incomplete-study note and escapes everything.
  const auto html = render_report(hand_results(0.04));
  EXPECT_NE(html.find("<!DOCTYPE html>"), std::string::npos);
  EXPECT_EQ(html.find("<script"), std::string::npos);
  EXPECT_GT(count(html, "<svg"), 5u);
  EXPECT_EQ(count(html, "<svg xmlns=\"http://www.w3.org/2000/svg\""), count(html, "<svg"));
}

// --quick study end to end, then the report in headless Chromium (when installed).
// The --quick recipe block trains the same 16 arms at a toy size (batch 4 × 64
// tokens) so that this runs in about 2 minutes on 2 cores (docs/study.md).
TEST(StudyE2E, QuickStudyAndReportInChromium) {
  const char* keep = std::getenv("MOECPT_STUDY_E2E_DIR");
  testing::TempDir tmp;
  const std::string out = keep && *keep ? std::string(keep) : tmp / "study";
  const auto r = testing::run_moecpt("study --quick --out " + out);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::string html_path = out + "/report.html";
  ASSERT_TRUE(fs::exists(html_path));
  for (const char* f : {"study.json", "arms.json", "curves.json", "analysis.json"})
    EXPECT_TRUE(fs::exists(out + "/results/" + f)) << f;
  // Every arm trained; saturation of the 7 MoE CPT arms and task accuracies of all 16 arms.
  const auto res = load_results(out + "/results");
  EXPECT_EQ(res.arms.size(), 16u);
  EXPECT_EQ(res.analysis["saturation"].size(), 7u);
  ASSERT_EQ(res.analysis["tasks"].size(), 16u);
  for (const auto& [arm, per] : res.analysis["tasks"].items()) {
    EXPECT_EQ(per.size(), 2u) << arm;  // the recipe's [quick] tasks
    for (const auto& [task, t] : per.items()) {
      EXPECT_GE(t["acc"].get<double>(), 0.0);
      EXPECT_LE(t["acc"].get<double>(), 1.0);
      EXPECT_LE(t["items"].get<int64_t>(), 4) << task;  // [quick] task_items
    }
  }
  // The saved wall time covers training and analyses, and the phases add up to no more than it.
  const auto& st = res.study;
  const double wall = st["wall_seconds"].get<double>();
  double parts = 0;
  for (const char* p : {"data", "train", "saturation", "tasks", "routing"}) parts += st["phases"].value(p, 0.0);
  EXPECT_GT(st["phases"].value("saturation", 0.0), 0.0);
  EXPECT_GT(st["phases"].value("tasks", 0.0), 0.0);
  EXPECT_LE(parts, wall + 1e-6);
  EXPECT_GT(parts, 0.8 * wall);
  const std::string html = testing::read_text(html_path);
  EXPECT_NE(html.find("whole study"), std::string::npos);
  EXPECT_NE(html.find("<th>acc de-continuation</th>"), std::string::npos);
  EXPECT_EQ(html.find("<script"), std::string::npos);
  EXPECT_EQ(html.find("http"), html.find("http://www.w3.org/2000/svg"));  // no external resources
  // Re-running skips every arm, reuses the cached analyses and rebuilds the same findings.
  const auto again = testing::run_moecpt("study --quick --out " + out);
  ASSERT_EQ(again.exit_code, 0) << again.output;
  EXPECT_EQ(count(again.output, "finished earlier"), 16u);
  EXPECT_NE(again.output.find("router saturation of 0 CPT arm(s)"), std::string::npos) << again.output;
  EXPECT_NE(again.output.find(", 0 task evaluation(s)"), std::string::npos) << again.output;
  // report --study rebuilds it from results/ alone.
  const auto rep = testing::run_moecpt("report --study " + out + " -o " + tmp / "again.html");
  ASSERT_EQ(rep.exit_code, 0) << rep.output;
  EXPECT_EQ(count(testing::read_text(tmp / "again.html"), "<svg"), count(html, "<svg"));

  // Every plot is present and non-empty.
  const size_t n_svg = count(html, "<svg");
  EXPECT_GE(n_svg, 20u);
  std::regex svg_re("<svg[\\s\\S]*?</svg>");
  for (auto it = std::sregex_iterator(html.begin(), html.end(), svg_re); it != std::sregex_iterator(); ++it) {
    const std::string svg = it->str();
    const size_t marks = count(svg, "<path class=\"series\"") + count(svg, "<rect class=\"bar\"") +
                         count(svg, "<rect class=\"cell\"") + count(svg, "<circle class=\"point\"");
    EXPECT_GT(marks, 0u) << "empty plot: " << svg.substr(0, 300);
  }

  // Headless Chromium: the DOM it builds has every <svg>, no console errors, and a screenshot.
  const char* chromium = nullptr;
  for (const char* c : {"/usr/bin/chromium", "/usr/bin/chromium-browser"})
    if (fs::exists(c)) chromium = c;
  if (!chromium) GTEST_SKIP() << "chromium not installed (scripts/install-deps.sh installs it)";
  const std::string artifacts = fs::path(MOECPT_BINARY).parent_path().string() + "/test-artifacts";
  fs::create_directories(artifacts);
  const std::string flags = " --headless --no-sandbox --disable-gpu --disable-dev-shm-usage --hide-scrollbars "
                            "--user-data-dir=" + tmp / "chrome" + " --enable-logging=stderr --v=0 ";
  const std::string url = "file://" + fs::absolute(html_path).string();
  const std::string dom_path = tmp / "dom.html", log_path = tmp / "console.log";
  const int rc = std::system((std::string(chromium) + flags + "--dump-dom " + url + " > " + dom_path + " 2> " + log_path).c_str());
  ASSERT_EQ(rc, 0) << testing::read_text(log_path);
  const std::string dom = testing::read_text(dom_path);
  EXPECT_EQ(count(dom, "<svg"), n_svg);
  const std::string log = testing::read_text(log_path);
  EXPECT_EQ(log.find("CONSOLE"), std::string::npos) << log;
  EXPECT_EQ(log.find("Uncaught"), std::string::npos) << log;
  const std::string png = artifacts + "/study-report.png";
  fs::remove(png);
  std::system((std::string(chromium) + flags + "--window-size=1400,2600 --screenshot=" + png + " " + url + " > /dev/null 2>&1").c_str());
  ASSERT_TRUE(fs::exists(png));
  EXPECT_GT(fs::file_size(png), 20000u);
}

}  // namespace
}  // namespace moecpt::report
