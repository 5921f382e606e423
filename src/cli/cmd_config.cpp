#include <iostream>

#include "cli/commands.h"
#include "core/config.h"

namespace moecpt::cli {

void register_config_commands(CLI::App& app) {
  auto* cmd = app.add_subcommand("config", "Validate a recipe and print its complete effective config");
  auto path = std::make_shared<std::string>();
  auto sets = std::make_shared<std::vector<std::string>>();
  cmd->add_option("--config,-c", *path, "recipe (TOML)")->required();
  cmd->add_option("--set", *sets, "override a key: section.key=value (repeatable)");
  cmd->callback([=] { std::cout << to_toml(load_config(*path, *sets)); });
}

}  // namespace moecpt::cli
