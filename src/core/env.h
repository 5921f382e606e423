// On/off switches read from the environment (the A/B switches of
// docs/performance.md).
#pragma once
#include <cstdlib>
#include <string>

#include "core/error.h"

namespace moecpt {

// `name` unset or empty → unset_value; "0" → false; "1" → true; anything else
// is a moecpt::Error naming the variable and the value.
inline bool env_switch(const char* name, bool unset_value) {
  const char* v = std::getenv(name);
  if (!v || !*v) return unset_value;
  const std::string s(v);
  if (s == "0" || s == "1") return s == "1";
  throw Error(std::string(name) + " must be 0 or 1, got '" + s + "'");
}

}  // namespace moecpt
