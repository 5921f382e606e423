// Fuzz the tokenizer model loader: the sentencepiece plugin's C interface
// (src/spm/spm_plugin.cpp) that moecpt::Tokenizer calls. A model that loads
// must encode and decode a short text without crashing.
#include <cstring>
#include <vector>

#include "fuzz_util.h"

extern "C" {
void* moecpt_spm_load(const char* path, char* err, size_t errcap);
void moecpt_spm_free(void* p);
long moecpt_spm_encode(void* p, const char* text, size_t len, int* out, size_t cap, char* err, size_t errcap);
long moecpt_spm_decode(void* p, const int* ids, size_t n, char* out, size_t cap, char* err, size_t errcap);
int moecpt_spm_info(void* p, int what);
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string& path = moecpt::fuzz::scratch_path(".model");
  moecpt::fuzz::write_scratch(path, data, size);
  char err[512] = "";
  void* sp = moecpt_spm_load(path.c_str(), err, sizeof err);
  if (!sp) {
    if (std::strlen(err) == 0) __builtin_trap();  // a failure always says why
    return 0;
  }
  const int vocab = moecpt_spm_info(sp, 0);
  (void)moecpt_spm_info(sp, 1);
  const char text[] = "Hello, world!\n\tdef f(x): return 42  # Grüße";
  std::vector<int> ids(sizeof text + 8);
  long n = moecpt_spm_encode(sp, text, sizeof text - 1, ids.data(), ids.size(), err, sizeof err);
  if (n >= 0 && size_t(n) <= ids.size()) {
    for (long i = 0; i < n; ++i)
      if (ids[size_t(i)] < 0 || ids[size_t(i)] >= vocab) __builtin_trap();
    std::vector<char> out(size_t(n) * 64 + 64);
    (void)moecpt_spm_decode(sp, ids.data(), size_t(n), out.data(), out.size(), err, sizeof err);
  }
  moecpt_spm_free(sp);
  return 0;
}
