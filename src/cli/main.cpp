// The one `moecpt` binary. Each subcommand parses its flags here and calls
// into the library; every moecpt::Error becomes `error: <message>`, exit 1.
#include <CLI/CLI.hpp>
#include <csignal>
#include <cstdio>
#include <iostream>

#include "cli/commands.h"
#include "core/error.h"

int main(int argc, char** argv) {
  CLI::App app{"moecpt: pre-train and continually pre-train MoE language models, and watch the router"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "moecpt 0.1.0");
  moecpt::cli::register_config_commands(app);
  moecpt::cli::register_data_commands(app);
  moecpt::cli::register_train_commands(app);
  try {
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
