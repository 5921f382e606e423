// Crash-safe file output: every file moecpt writes (checkpoints, configs,
// reports) goes to `<path>.tmp.<pid>` in the same directory, is fsync'ed and
// then rename()d over the target, so a reader sees either the old file or the
// complete new one, never a torn write. Failures throw moecpt::Error naming the
// path and the OS reason, remove the temp file and leave any old file intact.
#pragma once
#include <functional>
#include <ostream>
#include <string>
#include <string_view>

namespace moecpt {

// Atomically replace `path` with `bytes`.
void write_file_atomic(const std::string& path, std::string_view bytes);

// Streaming variant: `writer` writes the content to the given stream (which is
// buffered and backed by the temp file). If `writer` throws, the temp file is
// removed, the previous file is left alone and the exception propagates.
void write_file_atomic(const std::string& path,
                       const std::function<void(std::ostream&)>& writer);

// Whole file as bytes. Errors say "<path>: file does not exist",
// "<path>: is a directory", "<path>: cannot read: <strerror>", ...
std::string read_file(const std::string& path);

// Remove the `<name>.tmp.<pid>` files in `dir` (not recursive) that a writer
// killed mid-write left behind: those whose pid is no running process. Files
// of running processes (this one included) are kept. Best effort; returns how
// many were removed.
int remove_stale_temp_files(const std::string& dir);

// Move a fully written temp directory into place as `final_dir`. If
// `final_dir` exists, both are swapped atomically (renameat2 RENAME_EXCHANGE)
// and the old copy is deleted. Where the filesystem cannot swap, it is first
// renamed aside (`<final_dir>.old.<pid>`),
// then `tmp_dir` is renamed to `final_dir`, and only after that succeeds is
// the old copy removed (on failure the old copy is renamed back). The parent
// directory is fsync'ed so the rename is durable. Both directories must be on
// the same filesystem (normally siblings).
void commit_directory_atomic(const std::string& tmp_dir, const std::string& final_dir);

// std::filesystem::create_directories, but failures are a moecpt::Error
// "<dir>: cannot create directory: <reason>" (e.g. a path under a regular file).
void create_directories_or_throw(const std::string& dir);

// fsync a directory (so renames/creates in it survive a crash). Best effort:
// filesystems that cannot fsync directories are silently accepted.
void fsync_directory(const std::string& dir);

}  // namespace moecpt
