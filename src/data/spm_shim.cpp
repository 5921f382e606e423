#include "data/spm_shim.h"

#include <dlfcn.h>

#include <filesystem>
#include <mutex>

#include "core/error.h"

#ifndef MOECPT_SPM_PLUGIN
#define MOECPT_SPM_PLUGIN "libmoecpt_spm.so"
#endif

namespace moecpt::spm {
namespace {

std::string self_dir() {
  std::error_code ec;
  auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  return ec ? "" : exe.parent_path().string();
}

Api load_plugin() {
  // Search order: $MOECPT_SPM_PLUGIN, next to the executable (and its parent,
  // for tests/ binaries), then the path of the build that compiled us.
  std::vector<std::string> candidates;
  if (const char* env = std::getenv("MOECPT_SPM_PLUGIN")) candidates.push_back(env);
  const std::string dir = self_dir();
  if (!dir.empty()) {
    candidates.push_back(dir + "/libmoecpt_spm.so");
    candidates.push_back(dir + "/../libmoecpt_spm.so");
  }
  candidates.push_back(MOECPT_SPM_PLUGIN);
  std::string tried;
  for (const auto& c : candidates) {
    if (c.find('/') != std::string::npos && !std::filesystem::exists(c)) continue;
    void* h = ::dlmopen(LM_ID_NEWLM, c.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!h) {
      tried += std::string("\n  ") + c + ": " + ::dlerror();
      continue;
    }
    auto sym = [&](const char* name) {
      void* s = ::dlsym(h, name);
      if (!s) throw Error(c + ": sentencepiece plugin lacks symbol " + name);
      return s;
    };
    Api a;
    a.load = reinterpret_cast<decltype(a.load)>(sym("moecpt_spm_load"));
    a.free = reinterpret_cast<decltype(a.free)>(sym("moecpt_spm_free"));
    a.encode = reinterpret_cast<decltype(a.encode)>(sym("moecpt_spm_encode"));
    a.decode = reinterpret_cast<decltype(a.decode)>(sym("moecpt_spm_decode"));
    a.info = reinterpret_cast<decltype(a.info)>(sym("moecpt_spm_info"));
    a.train = reinterpret_cast<decltype(a.train)>(sym("moecpt_spm_train"));
    return a;
  }
  throw Error("cannot load the sentencepiece plugin libmoecpt_spm.so (set MOECPT_SPM_PLUGIN to its path)" + tried);
}

}  // namespace

const Api& api() {
  static std::once_flag once;
  static Api a;
  std::call_once(once, [] { a = load_plugin(); });
  return a;
}

}  // namespace moecpt::spm
