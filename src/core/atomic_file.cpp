#include "core/atomic_file.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>  // renameat2, RENAME_EXCHANGE (glibc >= 2.28)
#include <cstring>
#include <filesystem>
#include <streambuf>
#include <vector>

#include "core/error.h"

namespace moecpt {
namespace {

namespace fs = std::filesystem;

std::string errno_text(int err) { return std::strerror(err); }

std::string parent_dir_of(const std::string& path) {
  fs::path parent = fs::path(path).parent_path();
  return parent.empty() ? std::string(".") : parent.string();
}

// write(2) the whole buffer, retrying on EINTR / short writes. Returns 0 or errno.
int write_all(int fd, const char* data, size_t size) {
  while (size > 0) {
    ssize_t n = ::write(fd, data, size);
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    data += n;
    size -= static_cast<size_t>(n);
  }
  return 0;
}

// Minimal buffered output streambuf over a file descriptor that remembers the
// first errno it hit (std::ofstream cannot fsync and loses the OS reason).
class FdStreambuf : public std::streambuf {
 public:
  explicit FdStreambuf(int fd) : fd_(fd), buf_(1 << 20) {
    setp(buf_.data(), buf_.data() + buf_.size());
  }
  int error() const { return err_; }
  // Flush the buffer; returns 0 or errno.
  int flush_buffer() {
    if (err_ != 0) return err_;
    std::ptrdiff_t n = pptr() - pbase();
    if (n > 0) err_ = write_all(fd_, pbase(), static_cast<size_t>(n));
    setp(buf_.data(), buf_.data() + buf_.size());
    return err_;
  }

 protected:
  int_type overflow(int_type ch) override {
    if (flush_buffer() != 0) return traits_type::eof();
    if (!traits_type::eq_int_type(ch, traits_type::eof())) {
      *pptr() = traits_type::to_char_type(ch);
      pbump(1);
    }
    return traits_type::not_eof(ch);
  }
  std::streamsize xsputn(const char* s, std::streamsize n) override {
    if (n >= static_cast<std::streamsize>(buf_.size()) / 2) {
      // Large write: bypass the buffer.
      if (flush_buffer() != 0) return 0;
      err_ = write_all(fd_, s, static_cast<size_t>(n));
      return err_ == 0 ? n : 0;
    }
    return std::streambuf::xsputn(s, n);
  }
  int sync() override { return flush_buffer() == 0 ? 0 : -1; }

 private:
  int fd_;
  std::vector<char> buf_;
  int err_ = 0;
};

// Shared implementation: `fill(fd)` writes the content and returns 0 or errno.
template <typename Fill>
void write_atomic_impl(const std::string& path, Fill&& fill) {
  if (path.empty()) throw Error("write_file_atomic: empty path");
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    int err = errno;
    throw file_error(path, "cannot create temporary file '" + tmp + "': " + errno_text(err));
  }
  auto fail = [&](const std::string& what, int err) {
    if (fd >= 0) ::close(fd);
    ::unlink(tmp.c_str());
    return file_error(path, what + ": " + errno_text(err));
  };
  int err = 0;
  try {
    err = fill(fd);
  } catch (...) {
    ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  if (err != 0) throw fail("cannot write", err);
  if (::fsync(fd) != 0) throw fail("cannot fsync", errno);
  int rc = ::close(fd);
  fd = -1;
  if (rc != 0) throw fail("cannot close", errno);
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    throw fail("cannot rename temporary file '" + tmp + "' into place", errno);
  }
  fsync_directory(parent_dir_of(path));
}

}  // namespace

int remove_stale_temp_files(const std::string& dir) {
  namespace fs = std::filesystem;
  int removed = 0;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    const auto at = name.rfind(".tmp.");
    if (at == std::string::npos || at == 0 || !e.is_regular_file(ec)) continue;
    const std::string digits = name.substr(at + 5);
    if (digits.empty() || digits.size() > 9 || digits.find_first_not_of("0123456789") != std::string::npos) continue;
    const pid_t pid = pid_t(std::stol(digits));
    if (pid <= 0 || ::kill(pid, 0) == 0 || errno != ESRCH) continue;  // running (or not ours to signal)
    if (fs::remove(e.path(), ec)) ++removed;
  }
  return removed;
}

void write_file_atomic(const std::string& path, std::string_view bytes) {
  write_atomic_impl(path, [&](int fd) { return write_all(fd, bytes.data(), bytes.size()); });
}

void write_file_atomic(const std::string& path,
                       const std::function<void(std::ostream&)>& writer) {
  write_atomic_impl(path, [&](int fd) {
    FdStreambuf sb(fd);
    std::ostream os(&sb);
    writer(os);
    int err = sb.flush_buffer();
    if (err == 0 && !os) err = EIO;  // stream failed without an OS error
    return err;
  });
}

std::string read_file(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int err = errno;
    if (err == ENOENT) throw file_error(path, "file does not exist");
    throw file_error(path, "cannot open for reading: " + errno_text(err));
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    throw file_error(path, "cannot stat: " + errno_text(err));
  }
  if (S_ISDIR(st.st_mode)) {
    ::close(fd);
    throw file_error(path, "is a directory, not a file");
  }
  std::string out;
  if (S_ISREG(st.st_mode) && st.st_size > 0) out.reserve(static_cast<size_t>(st.st_size));
  char buf[1 << 16];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      int err = errno;
      ::close(fd);
      throw file_error(path, "cannot read: " + errno_text(err));
    }
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  return out;
}

void create_directories_or_throw(const std::string& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw file_error(dir, "cannot create directory: " + ec.message());
  if (!fs::is_directory(dir, ec)) throw file_error(dir, "cannot create directory: a file of that name exists");
}

void fsync_directory(const std::string& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;
  (void)::fsync(fd);  // EINVAL on filesystems without directory fsync: fine
  ::close(fd);
}

void commit_directory_atomic(const std::string& tmp_dir, const std::string& final_dir) {
  std::error_code ec;
  if (!fs::is_directory(tmp_dir, ec)) {
    throw file_error(tmp_dir, "cannot commit to '" + final_dir +
                                  "': temporary directory does not exist");
  }
  // Strip trailing slashes so "<final>.old.<pid>" is a sibling, not a child.
  std::string final_clean = final_dir;
  while (final_clean.size() > 1 && final_clean.back() == '/') final_clean.pop_back();

  std::string aside;
  if (fs::exists(fs::symlink_status(final_clean, ec))) {
    // Swap both names in one step (Linux renameat2): `final_dir` is the old
    // complete copy or the new complete copy at every instant, even if the
    // process is killed. The old copy ends up under the temp name.
    if (::renameat2(AT_FDCWD, tmp_dir.c_str(), AT_FDCWD, final_clean.c_str(), RENAME_EXCHANGE) == 0) {
      fsync_directory(parent_dir_of(final_clean));
      fs::remove_all(tmp_dir, ec);
      if (ec)
        throw file_error(tmp_dir, "committed '" + final_dir + "' but cannot remove the previous copy: " +
                                      ec.message());
      return;
    }
    if (errno != EINVAL && errno != ENOSYS && errno != ENOTSUP) {
      int err = errno;
      throw file_error(final_dir, "cannot swap '" + tmp_dir + "' into place: " + errno_text(err));
    }
    // Filesystem without RENAME_EXCHANGE: move the old copy aside first.
    aside = final_clean + ".old." + std::to_string(::getpid());
    fs::remove_all(aside, ec);  // leftover from an earlier crash of this pid
    if (::rename(final_clean.c_str(), aside.c_str()) != 0) {
      int err = errno;
      throw file_error(final_dir, "cannot move existing directory aside to '" + aside +
                                      "': " + errno_text(err));
    }
  }
  if (::rename(tmp_dir.c_str(), final_clean.c_str()) != 0) {
    int err = errno;
    if (!aside.empty()) (void)::rename(aside.c_str(), final_clean.c_str());  // restore
    throw file_error(final_dir, "cannot rename '" + tmp_dir + "' into place: " + errno_text(err));
  }
  fsync_directory(parent_dir_of(final_clean));
  if (!aside.empty()) {
    fs::remove_all(aside, ec);
    if (ec) {
      throw file_error(aside, "committed '" + final_dir +
                                  "' but cannot remove the previous copy: " + ec.message());
    }
  }
}

}  // namespace moecpt
