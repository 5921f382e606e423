// The one `moecpt` binary. Each subcommand parses its flags here and calls
// into the library; every moecpt::Error becomes `error: <message>`, exit 1.
#include <CLI/CLI.hpp>
#include <csignal>
#include <cstdlib>
#include <cstdio>
#include <iostream>

#include "cli/commands.h"
#include "core/error.h"
#include "core/malloc_policy.h"

#include <unistd.h>

// OpenMP reads OMP_WAIT_POLICY once, when libgomp loads (before main). Its
// default busy-waiting made training steps 2.4x slower on the 2-core machine
// (1220 vs 2950 tokens/s measured), so if the user has not chosen a policy we
// set PASSIVE and re-execute ourselves once. Likewise OPENBLAS_NUM_THREADS=1:
// Debian's LibTorch calls the pthread OpenBLAS, whose own spinning thread pool
// fights ATen's OpenMP threads (docs/performance.md: up to 90x slower bmm).
static void ensure_passive_openmp(char** argv) {
  bool changed = false;
  if (std::getenv("OMP_WAIT_POLICY") == nullptr) changed = ::setenv("OMP_WAIT_POLICY", "PASSIVE", 1) == 0;
  if (std::getenv("OPENBLAS_NUM_THREADS") == nullptr) changed = ::setenv("OPENBLAS_NUM_THREADS", "1", 1) == 0 || changed;
  if (changed) ::execv("/proc/self/exe", argv);  // only returns on failure: carry on as we are
}

int main(int argc, char** argv) {
  ensure_passive_openmp(argv);
  CLI::App app{"moecpt: pre-train and continually pre-train MoE language models, and watch the router"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "moecpt 0.1.0");
  moecpt::cli::register_config_commands(app);
  moecpt::cli::register_data_commands(app);
  moecpt::cli::register_train_commands(app);
  moecpt::cli::register_flops_commands(app);
  moecpt::cli::register_launch_commands(app);
  moecpt::cli::register_study_commands(app);
  moecpt::cli::register_bench_commands(app);
  moecpt::cli::register_export_commands(app);
  moecpt::cli::register_import_commands(app);
  moecpt::cli::register_analyze_commands(app);
  moecpt::cli::register_eval_commands(app);
  try {
    moecpt::keep_freed_memory();  // a step's buffers stay in the process (core/malloc_policy.h)
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const moecpt::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "error (torch): %s\n", e.what_without_backtrace());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
