#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>

#include "core/atomic_file.h"
#include "core/error.h"
#include "test_util.h"

namespace fs = std::filesystem;
using moecpt::Error;

namespace {

class AtomicFileTest : public ::testing::Test {
 protected:
  // A fresh, empty directory per test (tests/test_util.h), removed afterwards.
  moecpt::testing::TempDir tmp_;
  fs::path dir_ = tmp_.path();

  std::string p(const std::string& name) const { return (dir_ / name).string(); }
  // Names in the directory other than the given ones (e.g. leftover temp files).
  std::vector<std::string> entries() const {
    std::vector<std::string> out;
    for (const auto& e : fs::directory_iterator(dir_)) out.push_back(e.path().filename().string());
    std::sort(out.begin(), out.end());
    return out;
  }
};

using moecpt::testing::read_text;

template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected moecpt::Error";
  return {};
}

}  // namespace

TEST_F(AtomicFileTest, WritesBytesAndLeavesNoTempFile) {
  std::string data("hello\0world", 11);
  moecpt::write_file_atomic(p("a.bin"), data);
  EXPECT_EQ(read_text(p("a.bin")), data);
  EXPECT_EQ(entries(), std::vector<std::string>{"a.bin"});
  // Overwrite with shorter content: no stale tail.
  moecpt::write_file_atomic(p("a.bin"), std::string_view("xy"));
  EXPECT_EQ(read_text(p("a.bin")), "xy");
  EXPECT_EQ(entries(), std::vector<std::string>{"a.bin"});
  // Empty file.
  moecpt::write_file_atomic(p("empty"), std::string_view());
  EXPECT_EQ(read_text(p("empty")), "");
}

TEST_F(AtomicFileTest, StreamingWriterLargeAndSmallWrites) {
  std::string big(3 << 20, '\0');
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>(i * 31 + 7);
  moecpt::write_file_atomic(p("s.bin"), [&](std::ostream& os) {
    os << "head:";
    os.write(big.data(), static_cast<std::streamsize>(big.size()));
    for (int i = 0; i < 1000; ++i) os.put(static_cast<char>(i));
    os << ":tail";
  });
  std::string expect = "head:" + big;
  for (int i = 0; i < 1000; ++i) expect.push_back(static_cast<char>(i));
  expect += ":tail";
  EXPECT_EQ(read_text(p("s.bin")), expect);
  EXPECT_EQ(entries(), std::vector<std::string>{"s.bin"});
}

TEST_F(AtomicFileTest, ReadFileRoundTripAndErrors) {
  std::string data;
  for (int i = 0; i < 200000; ++i) data.push_back(static_cast<char>(i % 251));
  moecpt::write_file_atomic(p("r.bin"), data);
  EXPECT_EQ(moecpt::read_file(p("r.bin")), data);

  std::string msg = error_of([&] { moecpt::read_file(p("missing.txt")); });
  EXPECT_NE(msg.find(p("missing.txt")), std::string::npos) << msg;
  EXPECT_NE(msg.find("does not exist"), std::string::npos) << msg;

  fs::create_directory(p("subdir"));
  msg = error_of([&] { moecpt::read_file(p("subdir")); });
  EXPECT_NE(msg.find(p("subdir")), std::string::npos) << msg;
  EXPECT_NE(msg.find("directory"), std::string::npos) << msg;
}

TEST_F(AtomicFileTest, ReadFileUnreadableNamesPath) {
  if (::geteuid() == 0) GTEST_SKIP() << "root can read mode-000 files";
  moecpt::write_file_atomic(p("secret"), std::string_view("x"));
  fs::permissions(p("secret"), fs::perms::none);
  std::string msg = error_of([&] { moecpt::read_file(p("secret")); });
  EXPECT_NE(msg.find(p("secret")), std::string::npos) << msg;
  EXPECT_NE(msg.find("Permission denied"), std::string::npos) << msg;
}

TEST_F(AtomicFileTest, MissingDirectoryThrowsWithPathAndReason) {
  std::string target = p("no/such/dir/file.bin");
  std::string msg = error_of([&] { moecpt::write_file_atomic(target, std::string_view("x")); });
  EXPECT_NE(msg.find(target), std::string::npos) << msg;
  EXPECT_NE(msg.find("No such file or directory"), std::string::npos) << msg;
}

TEST_F(AtomicFileTest, UnwritableDirectoryKeepsPreviousFile) {
  // Works even as root: the temp file name is occupied by a directory, so
  // creating it fails (EISDIR), exactly like an unwritable directory would.
  moecpt::write_file_atomic(p("keep.txt"), std::string_view("old contents"));
  std::string tmp = p("keep.txt") + ".tmp." + std::to_string(::getpid());
  fs::create_directory(tmp);
  std::string msg =
      error_of([&] { moecpt::write_file_atomic(p("keep.txt"), std::string_view("new")); });
  EXPECT_NE(msg.find(p("keep.txt")), std::string::npos) << msg;
  EXPECT_NE(msg.find("Is a directory"), std::string::npos) << msg;
  EXPECT_EQ(read_text(p("keep.txt")), "old contents");
  fs::remove(tmp);
  EXPECT_EQ(entries(), std::vector<std::string>{"keep.txt"});
}

TEST_F(AtomicFileTest, ReadOnlyDirectoryKeepsPreviousFile) {
  if (::geteuid() == 0) GTEST_SKIP() << "root ignores directory permissions";
  moecpt::write_file_atomic(p("keep.txt"), std::string_view("old contents"));
  fs::permissions(dir_, fs::perms::owner_read | fs::perms::owner_exec);
  std::string msg =
      error_of([&] { moecpt::write_file_atomic(p("keep.txt"), std::string_view("new")); });
  fs::permissions(dir_, fs::perms::owner_all, fs::perm_options::add);
  EXPECT_NE(msg.find(p("keep.txt")), std::string::npos) << msg;
  EXPECT_NE(msg.find("Permission denied"), std::string::npos) << msg;
  EXPECT_EQ(read_text(p("keep.txt")), "old contents");
  EXPECT_EQ(entries(), std::vector<std::string>{"keep.txt"});
}

TEST_F(AtomicFileTest, RenameFailureRemovesTempAndKeepsTarget) {
  // The target is a non-empty directory: rename() onto it fails.
  fs::create_directories(p("target/inner"));
  std::string msg =
      error_of([&] { moecpt::write_file_atomic(p("target"), std::string_view("data")); });
  EXPECT_NE(msg.find(p("target")), std::string::npos) << msg;
  EXPECT_TRUE(fs::is_directory(p("target/inner")));
  EXPECT_EQ(entries(), std::vector<std::string>{"target"});
}

TEST_F(AtomicFileTest, ThrowingWriterRemovesTempAndKeepsPreviousFile) {
  moecpt::write_file_atomic(p("f.txt"), std::string_view("v1"));
  EXPECT_THROW(moecpt::write_file_atomic(p("f.txt"),
                                         [](std::ostream& os) {
                                           os << "partial";
                                           throw std::runtime_error("boom");
                                         }),
               std::runtime_error);
  EXPECT_EQ(read_text(p("f.txt")), "v1");
  EXPECT_EQ(entries(), std::vector<std::string>{"f.txt"});
}

TEST_F(AtomicFileTest, CommitDirectoryIntoPlace) {
  // First commit: final does not exist yet.
  fs::create_directory(p("ckpt.tmp"));
  moecpt::write_file_atomic(p("ckpt.tmp/a"), std::string_view("one"));
  moecpt::commit_directory_atomic(p("ckpt.tmp"), p("ckpt"));
  EXPECT_EQ(read_text(p("ckpt/a")), "one");
  EXPECT_EQ(entries(), std::vector<std::string>{"ckpt"});

  // Second commit replaces the existing directory wholesale.
  fs::create_directory(p("ckpt.tmp"));
  moecpt::write_file_atomic(p("ckpt.tmp/b"), std::string_view("two"));
  moecpt::commit_directory_atomic(p("ckpt.tmp"), p("ckpt"));
  EXPECT_EQ(read_text(p("ckpt/b")), "two");
  EXPECT_FALSE(fs::exists(p("ckpt/a")));
  EXPECT_EQ(entries(), std::vector<std::string>{"ckpt"});  // old copy removed
}

TEST_F(AtomicFileTest, CommitDirectoryMissingTempKeepsFinal) {
  fs::create_directory(p("ckpt"));
  moecpt::write_file_atomic(p("ckpt/a"), std::string_view("keep"));
  std::string msg =
      error_of([&] { moecpt::commit_directory_atomic(p("nope.tmp"), p("ckpt")); });
  EXPECT_NE(msg.find(p("nope.tmp")), std::string::npos) << msg;
  EXPECT_EQ(read_text(p("ckpt/a")), "keep");
  EXPECT_EQ(entries(), std::vector<std::string>{"ckpt"});
}

// A writer killed mid-write leaves "<name>.tmp.<pid>"; the next run removes it
// when that pid is no running process, and keeps everything else.
TEST_F(AtomicFileTest, StaleTempFilesOfDeadProcessesAreRemoved) {
  const pid_t child = ::fork();
  if (child == 0) ::_exit(0);
  ASSERT_GT(child, 0);
  ::waitpid(child, nullptr, 0);  // reaped: its pid names no process now
  const std::string dead = std::to_string(child), self = std::to_string(::getpid());
  for (const std::string& name : std::vector<std::string>{"metrics.jsonl.tmp." + dead, "report.html.tmp." + self,
                                                          "summary.json.tmp.1", "notes.tmp.abc", "keep.txt",
                                                          ".tmp." + dead})
    std::ofstream(p(name)) << "x";
  fs::create_directories(dir_ / ("ckpt.tmp." + dead));  // directories are not this function's
  EXPECT_EQ(moecpt::remove_stale_temp_files(dir_.string()), 1);
  EXPECT_FALSE(fs::exists(p("metrics.jsonl.tmp." + dead)));
  for (const std::string& name : std::vector<std::string>{"report.html.tmp." + self, "summary.json.tmp.1",
                                                          "notes.tmp.abc", "keep.txt", ".tmp." + dead,
                                                          "ckpt.tmp." + dead})
    EXPECT_TRUE(fs::exists(p(name))) << name;
  EXPECT_EQ(moecpt::remove_stale_temp_files((dir_ / "missing").string()), 0);
}

