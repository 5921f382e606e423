// Minimal stderr logging with a wall-clock prefix. Progress lines go to stderr
// so stdout stays machine-readable (JSON from `inspect`, CSV from `schedule`).
#pragma once
#include <cstdio>
#include <string>

namespace moecpt::log {

void info(const std::string& msg);
void warn(const std::string& msg);
void set_quiet(bool quiet);

}  // namespace moecpt::log
