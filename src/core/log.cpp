#include "core/log.h"

#include <chrono>
#include <ctime>
#include <unistd.h>

namespace moecpt::log {
namespace {
bool g_quiet = false;
bool g_open_progress = false;  // a progress line is on screen without its newline

void emit(const char* level, const std::string& msg, bool in_place = false) {
  std::time_t now = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
  char stamp[32];
  std::strftime(stamp, sizeof stamp, "%H:%M:%S", std::localtime(&now));
  if (in_place) {
    std::fprintf(stderr, "\r[%s]%s %s\x1b[K", stamp, level, msg.c_str());
  } else {
    std::fprintf(stderr, "%s[%s]%s %s\n", g_open_progress ? "\n" : "", stamp, level, msg.c_str());
  }
  g_open_progress = in_place;
  std::fflush(stderr);
}
}  // namespace

void progress(const std::string& msg) {
  static const bool tty = ::isatty(2) == 1;
  if (!g_quiet) emit("", msg, tty);
}

void set_quiet(bool quiet) { g_quiet = quiet; }
void info(const std::string& msg) {
  if (!g_quiet) emit("", msg);
}
void warn(const std::string& msg) { emit(" warning:", msg); }

}  // namespace moecpt::log
