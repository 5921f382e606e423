// Helpers shared by the fuzz targets: the readers under test take paths, so
// each input is written to a per-process scratch file first.
#pragma once
#include <fcntl.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace moecpt::fuzz {

// A scratch file in $TMPDIR (default /tmp), unique to this process.
inline const std::string& scratch_path(const char* suffix) {
  static const std::string path = [suffix] {
    const char* dir = std::getenv("TMPDIR");
    return std::string(dir && *dir ? dir : "/tmp") + "/moecpt-fuzz-" + std::to_string(::getpid()) + suffix;
  }();
  return path;
}

inline void write_scratch(const std::string& path, const uint8_t* data, size_t size) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) std::abort();
  size_t done = 0;
  while (done < size) {
    ssize_t n = ::write(fd, data + done, size - done);
    if (n <= 0) std::abort();
    done += size_t(n);
  }
  ::close(fd);
}

}  // namespace moecpt::fuzz
