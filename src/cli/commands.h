// Subcommand registration, one function per command group (one file each).
#pragma once
#include <CLI/CLI.hpp>

namespace moecpt::cli {

void register_config_commands(CLI::App& app);  // config show
void register_data_commands(CLI::App& app);    // data tokenizer train | prepare | inspect
void register_train_commands(CLI::App& app);   // train
void register_flops_commands(CLI::App& app);   // flops
void register_launch_commands(CLI::App& app);  // launch --nproc N -- <command>
void register_study_commands(CLI::App& app);   // study, report --study DIR
void register_bench_commands(CLI::App& app);   // bench train --config FILE
void register_export_commands(CLI::App& app);  // export --format hf
void register_import_commands(CLI::App& app);  // import --from <hf dir> (+ sparse upcycling)

void register_analyze_commands(CLI::App& app);  // analyze routing | saturation | forgetting
void register_eval_commands(CLI::App& app);     // eval [make-tasks]

}  // namespace moecpt::cli
