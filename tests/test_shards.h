// Synthetic token shards for end-to-end tests: a "domain" whose documents
// count up by `step` (mod 60), so two steps give two distinguishable domains.
#pragma once
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "data/shard.h"

namespace moecpt::testing {

// Writes <dir>/train.bin and <dir>/val.bin: `n_docs` documents of 60 tokens in
// 2..61 plus EOS (1), vocabulary 64.
inline void write_domain(const std::string& dir, uint32_t step, int n_docs) {
  std::filesystem::create_directories(dir);
  for (const char* split : {"train", "val"}) {
    std::vector<uint32_t> toks;
    std::vector<uint64_t> offs = {0};
    for (int doc = 0; doc < n_docs; ++doc) {
      uint32_t t = uint32_t(doc * 7 % 60) + 2;
      for (int i = 0; i < 60; ++i) toks.push_back(2 + (t - 2 + step * uint32_t(i)) % 60);
      toks.push_back(1);  // EOS
      offs.push_back(toks.size());
    }
    write_shard(dir + "/" + split + ".bin", toks, offs, 64);
  }
}

}  // namespace moecpt::testing
