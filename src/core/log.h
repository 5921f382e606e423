// Minimal stderr logging with a wall-clock prefix. Progress lines go to stderr
// so stdout stays machine-readable (JSON from `inspect`, CSV from `schedule`).
#pragma once
#include <cstdio>
#include <string>

namespace moecpt::log {

void info(const std::string& msg);
void warn(const std::string& msg);
// A progress line: on a terminal it rewrites itself in place (a one-line
// progress display); elsewhere (files, CI) it is an ordinary log line.
void progress(const std::string& msg);
void set_quiet(bool quiet);

}  // namespace moecpt::log
