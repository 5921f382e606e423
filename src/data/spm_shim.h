// Boundary to the sentencepiece shared library.
//
// Debian's libsentencepiece bundles its own protobuf-lite (3.14) and exports
// those symbols; libtorch needs the system libprotobuf (3.21). Loaded into one
// symbol namespace they collide (a crash before main, or a protobuf version
// abort), and RTLD_DEEPBIND breaks libstdc++ streams. So sentencepiece lives
// in a small plugin, libmoecpt_spm.so, loaded with dlmopen(LM_ID_NEWLM) into a
// link-map namespace of its own. The plugin has its own C/C++ runtime, so the
// interface is plain C and no heap memory changes hands (see spm_plugin.cpp).
#pragma once
#include <string>
#include <utility>
#include <vector>

namespace moecpt::spm {

struct Api {
  void* (*load)(const char* path, char* err, size_t errcap);
  void (*free)(void* processor);
  long (*encode)(void* processor, const char* text, size_t len, int* out, size_t cap, char* err, size_t errcap);
  long (*decode)(void* processor, const int* ids, size_t n, char* out, size_t cap, char* err, size_t errcap);
  int (*info)(void* processor, int what);  // 0: vocab size, 1: eos id
  int (*train)(const char* const* keys, const char* const* values, size_t n_args, const char* const* lines,
               const size_t* lens, size_t n_lines, char* err, size_t errcap);
};

// Load the plugin once (thread-safe); throws moecpt::Error if it cannot.
const Api& api();

}  // namespace moecpt::spm
