// Fuzz the JSONL corpus reader (src/data/documents.h): one {"id", "text"}
// object per line. Errors must be a moecpt::Error naming the file.
#include "core/error.h"
#include "data/documents.h"
#include "fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string& path = moecpt::fuzz::scratch_path(".jsonl");
  moecpt::fuzz::write_scratch(path, data, size);
  try {
    auto docs = moecpt::read_documents(path);
    size_t bytes = 0;
    for (const auto& d : docs) bytes += d.id.size() + d.text.size();
    if (bytes > size) __builtin_trap();
  } catch (const moecpt::Error& e) {
    if (std::string(e.what()).find(path) == std::string::npos) __builtin_trap();
  }
  return 0;
}
