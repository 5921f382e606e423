#include <csignal>
#include <iostream>

#include "cli/commands.h"
#include "core/config.h"
#include "core/log.h"
#include "train/trainer.h"

namespace moecpt::cli {

namespace {
extern "C" void on_signal(int) { request_stop(); }
}  // namespace

void register_train_commands(CLI::App& app) {
  auto* cmd = app.add_subcommand("train", "Run one training phase (pre-training, or CPT with train.init_from)");
  auto path = std::make_shared<std::string>();
  auto sets = std::make_shared<std::vector<std::string>>();
  auto init_from = std::make_shared<std::string>();
  auto resume = std::make_shared<bool>(false);
  cmd->add_option("--config,-c", *path, "recipe (TOML)")->required();
  cmd->add_option("--set", *sets, "override a key: section.key=value (repeatable)");
  cmd->add_option("--init-from", *init_from, "checkpoint directory to start from (same as train.init_from)");
  cmd->add_flag("--resume", *resume, "continue an interrupted run from <out_dir>/checkpoints/last");
  cmd->callback([=] {
    auto overrides = *sets;
    if (!init_from->empty()) overrides.push_back("train.init_from=\"" + *init_from + "\"");
    Config cfg = load_config(*path, overrides);
    // Finish the current step, save, exit cleanly.
    std::signal(SIGINT, on_signal);
    std::signal(SIGTERM, on_signal);
    auto s = train(cfg, TrainOptions{*resume});
    if (s.final_eval.empty()) return;
    std::cout << cfg.run.name << ": " << s.steps << " steps, " << s.tokens << " tokens, " << s.seconds << " s\n";
    for (const auto& [name, e] : s.final_eval) std::cout << "  val " << name << " loss " << e.loss << "\n";
  });
}

}  // namespace moecpt::cli
