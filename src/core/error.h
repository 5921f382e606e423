// One exception type for everything a user can get wrong (config, files,
// checkpoints). The CLI catches it, prints `error: <what>` and exits non-zero;
// messages always name the file/key/tensor involved.
#pragma once
#include <stdexcept>
#include <string>

namespace moecpt {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Error about a specific file: "<path>: <problem>".
inline Error file_error(const std::string& path, const std::string& problem) {
  return Error(path + ": " + problem);
}

}  // namespace moecpt
