#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <iostream>

#include "cli/commands.h"
#include "core/config.h"
#include "core/log.h"
#include "train/schedule.h"
#include "train/trainer.h"

namespace moecpt::cli {

namespace {
extern "C" void on_signal(int) { request_stop(); }

std::string mri_list(const std::vector<double>& mri) {
  std::string s;
  char buf[16];
  for (double m : mri) {
    std::snprintf(buf, sizeof buf, "%s%.2f", s.empty() ? "" : " ", m);
    s += buf;
  }
  return s.empty() ? "-" : s;
}

// Validation loss before the first step and after the last, per dataset: for a
// CPT phase, "before" is the pre-trained model, so the change on old data is
// forgetting and the change on new data is adaptation.
void print_phase_table(const Config& cfg, const PhaseSummary& s) {
  std::printf("\n%s: %lld steps, %lld tokens, %.1f s  (%s)\n", cfg.run.name.c_str(), (long long)s.steps,
              (long long)s.tokens, s.seconds, cfg.run.out_dir.c_str());
  std::printf("  %-8s %11s %11s %9s   %-24s %s\n", "val set", "loss before", "loss after", "change",
              "MRI before (per layer)", "MRI after");
  for (const auto& [name, after] : s.final_eval) {
    auto it = s.initial_eval.find(name);
    const bool has_before = it != s.initial_eval.end();
    const double before = has_before ? it->second.loss : NAN;
    std::printf("  %-8s %11.4f %11.4f %+9.4f   %-24s %s\n", name.c_str(), before, after.loss, after.loss - before,
                has_before ? mri_list(it->second.mri).c_str() : "-", mri_list(after.mri).c_str());
  }
  if (!s.final_eval.empty() && !s.final_eval.begin()->second.mri.empty())
    std::printf("  (MRI = max share of tokens routed to one expert; balanced = k/E = %.2f)\n",
                double(cfg.model.top_k) / double(cfg.model.n_experts));
  std::fflush(stdout);
}
}  // namespace

void register_train_commands(CLI::App& app) {
  auto* sched = app.add_subcommand("schedule", "Print a recipe's learning rate for every step (plot it before training)");
  auto sched_path = std::make_shared<std::string>();
  auto sched_sets = std::make_shared<std::vector<std::string>>();
  auto csv = std::make_shared<bool>(false);
  sched->add_option("--config,-c", *sched_path, "recipe (TOML)")->required();
  sched->add_option("--set", *sched_sets, "override a key: section.key=value (repeatable)");
  sched->add_flag("--csv", *csv, "CSV with a header line (default: step and lr separated by a space)");
  sched->callback([=] {
    Config cfg = load_config(*sched_path, *sched_sets);
    if (*csv) std::printf("step,lr\n");
    for (int64_t t = 0; t < cfg.train.steps; ++t)
      std::printf(*csv ? "%lld,%.9g\n" : "%lld %.9g\n", (long long)t,
                  learning_rate(cfg.schedule, cfg.optim, t, cfg.train.steps));
  });

  auto* cmd = app.add_subcommand("train", "Run one training phase (pre-training, or CPT with train.init_from)");
  auto path = std::make_shared<std::string>();
  auto sets = std::make_shared<std::vector<std::string>>();
  auto init_from = std::make_shared<std::string>();
  auto resume = std::make_shared<bool>(false);
  auto stop_after = std::make_shared<int64_t>(0);
  cmd->add_option("--config,-c", *path, "recipe (TOML)")->required();
  cmd->add_option("--set", *sets, "override a key: section.key=value (repeatable)");
  cmd->add_option("--init-from", *init_from, "checkpoint directory to start from (same as train.init_from)");
  cmd->add_flag("--resume", *resume, "continue an interrupted run from its newest checkpoint (checkpoints/step-N)");
  cmd->add_option("--stop-after", *stop_after, "stop (checkpoint, exit 0) once this step is done; --resume continues");
  cmd->callback([=] {
    auto overrides = *sets;
    if (!init_from->empty()) overrides.push_back("train.init_from=\"" + *init_from + "\"");
    Config cfg = load_config(*path, overrides);
    // Finish the current step, save, exit cleanly.
    std::signal(SIGINT, on_signal);
    std::signal(SIGTERM, on_signal);
    TrainOptions topts;
    topts.resume = *resume;
    topts.stop_after = *stop_after;
    auto s = train(cfg, topts);
    const char* rank = std::getenv("RANK");  // data parallel: rank 0 reports
    if (s.final_eval.empty() || (rank && *rank && std::string(rank) != "0")) return;
    print_phase_table(cfg, s);
  });
}

}  // namespace moecpt::cli
