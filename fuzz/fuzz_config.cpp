// Fuzz the TOML config loader (src/core/config.h): parse, type/range/choice
// checks, unknown keys, cross-field validation. A config that loads must
// survive a round trip: to_toml() parses back to the same effective config.
#include <string>

#include "core/config.h"
#include "core/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  const std::string origin = "fuzz.toml";
  try {
    moecpt::Config cfg = moecpt::parse_config(text, origin);
    const std::string once = moecpt::to_toml(cfg);
    const std::string twice = moecpt::to_toml(moecpt::parse_config(once, "effective.toml"));
    if (once != twice) __builtin_trap();
  } catch (const moecpt::Error& e) {
    if (std::string(e.what()).rfind(origin, 0) != 0) __builtin_trap();  // errors name the file
  }
  return 0;
}
