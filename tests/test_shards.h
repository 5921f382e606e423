// Synthetic token shards for end-to-end tests: a "domain" whose documents
// count up by `step` (mod 60), so two steps give two distinguishable domains.
#pragma once
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "data/shard.h"

namespace moecpt::testing {

// The [run] section and the size keys of [model] of the tiny end-to-end recipes
// (vocabulary 64 as write_domain's tokens); callers append the FFN, router,
// optimizer, data and training keys.
inline std::string tiny_model_toml() {
  return "[run]\nthreads = 1\n[model]\nvocab_size = 64\nd_model = 32\nn_layers = 2\nn_heads = 2\n"
         "seq_len = 16\nffn_hidden = 64\n";
}

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
