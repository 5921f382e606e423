// `moecpt study` (the miniature replication in one resumable command) and
// `moecpt report --study DIR` (rebuild report.html from the saved results).
#include <csignal>
#include <filesystem>

#include "cli/commands.h"
#include "core/atomic_file.h"
#include "core/error.h"
#include "core/log.h"
#include "report/report.h"
#include "report/results.h"
#include "report/study.h"

namespace moecpt::cli {

namespace {
extern "C" void on_study_signal(int) { report::request_study_stop(); }
}  // namespace

void register_study_commands(CLI::App& app) {
  auto* study = app.add_subcommand("study", "Run the miniature replication of the paper (all arms, resumable) and write report.html");
  auto recipe = std::make_shared<std::string>("recipes/study/mini.toml");
  auto out = std::make_shared<std::string>("runs/study");
  auto quick = std::make_shared<bool>(false);
  auto no_analyses = std::make_shared<bool>(false);
  study->add_option("--recipe", *recipe, "study recipe (TOML)")->capture_default_str();
  study->add_option("--out", *out, "output directory (arms/, results/, report.html)")->capture_default_str();
  study->add_flag("--quick", *quick, "same arms, the recipe's quick_steps (a smoke test of ~2 minutes)");
  study->add_flag("--no-analyses", *no_analyses, "skip the router-saturation analyses of the checkpoints");
  study->callback([=] {
    const auto plan = report::plan_study(*recipe, *out, *quick);
    std::signal(SIGINT, on_study_signal);
    std::signal(SIGTERM, on_study_signal);
    report::StudyOptions opts;
    opts.analyses = !*no_analyses;
    if (!report::run_study(plan, opts)) std::exit(130);
  });

  auto* rep = app.add_subcommand("report", "Rebuild a study's report.html from its saved results (no training)");
  auto dir = std::make_shared<std::string>();
  auto html = std::make_shared<std::string>();
  rep->add_option("--study", *dir, "study directory (holds results/)")->required();
  rep->add_option("--output,-o", *html, "HTML file to write (default: <study>/report.html)");
  rep->callback([=] {
    const auto res = report::load_results(*dir + "/results");
    const std::string path = html->empty() ? *dir + "/report.html" : *html;
    write_file_atomic(path, report::render_report(res));
    log::info("report: " + path);
    report::print_findings(res);
  });
}

}  // namespace moecpt::cli
