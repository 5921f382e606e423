// Fuzz the token shard reader (src/data/shard.h). Byte 0 of the input picks a
// mode, the rest is the file. Shards carry two FNV-1a checksums, which random
// mutations almost never satisfy; bits 0 and 1 make the harness repair them so
// that the checks behind them (sizes, offsets, token ids) get exercised too.
// Bit 2 opens without `verify` (as `moecpt data inspect --no-verify` does).
#include <cstring>
#include <vector>

#include "core/error.h"
#include "data/shard.h"
#include "fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const uint8_t mode = data[0];
  std::vector<uint8_t> file(data + 1, data + size);
  if (file.size() >= 64) {
    uint64_t n_tokens, n_docs;
    uint32_t token_bytes;
    std::memcpy(&token_bytes, file.data() + 12, 4);
    std::memcpy(&n_tokens, file.data() + 24, 8);
    std::memcpy(&n_docs, file.data() + 32, 8);
    if ((mode & 2) && (token_bytes == 2 || token_bytes == 4) && n_tokens <= file.size() && n_docs <= file.size()) {
      const uint64_t tok = n_tokens * token_bytes, off_at = 64 + (tok + 7) / 8 * 8;
      if (off_at + (n_docs + 1) * 8 == file.size()) {
        uint64_t c = moecpt::fnv1a64(file.data() + 64, tok);
        c = moecpt::fnv1a64(file.data() + off_at, (n_docs + 1) * 8, c);
        std::memcpy(file.data() + 40, &c, 8);
      }
    }
    if (mode & 1) {
      const uint64_t h = moecpt::fnv1a64(file.data(), 48);
      std::memcpy(file.data() + 48, &h, 8);
    }
  }
  const std::string& path = moecpt::fuzz::scratch_path(".bin");
  moecpt::fuzz::write_scratch(path, file.data(), file.size());
  try {
    auto shard = moecpt::Shard::open(path, /*verify=*/!(mode & 4));
    const auto& info = shard->info();
    uint64_t sum = 0;
    for (uint64_t d = 0; d < info.n_docs; ++d) {
      auto [b, e] = shard->document(d);
      if (b > e || e > shard->size()) __builtin_trap();
      std::vector<int64_t> ids(e - b);
      shard->copy(b, e - b, ids.data());
      for (int64_t id : ids) {
        if (!(mode & 4) && uint64_t(id) >= info.vocab_size) __builtin_trap();
        sum += uint64_t(id);
      }
    }
    try {  // reads past the end are refused, even when begin + n overflows
      int64_t one;
      shard->copy(shard->size(), 1, &one);
      __builtin_trap();
    } catch (const moecpt::Error&) {
    }
    try {
      int64_t one;
      shard->copy(1, ~uint64_t(0), &one);
      __builtin_trap();
    } catch (const moecpt::Error&) {
    }
    (void)sum;
  } catch (const moecpt::Error& e) {
    if (std::string(e.what()).rfind(path + ": ", 0) != 0) __builtin_trap();
  }
  return 0;
}
