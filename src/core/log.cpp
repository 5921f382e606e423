#include "core/log.h"

#include <chrono>
#include <ctime>

namespace moecpt::log {
namespace {
bool g_quiet = false;

void emit(const char* level, const std::string& msg) {
  std::time_t now = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
  char stamp[32];
  std::strftime(stamp, sizeof stamp, "%H:%M:%S", std::localtime(&now));
  std::fprintf(stderr, "[%s]%s %s\n", stamp, level, msg.c_str());
  std::fflush(stderr);
}
}  // namespace

void set_quiet(bool quiet) { g_quiet = quiet; }
void info(const std::string& msg) {
  if (!g_quiet) emit("", msg);
}
void warn(const std::string& msg) { emit(" warning:", msg); }

}  // namespace moecpt::log
