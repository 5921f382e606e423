// `moecpt data prepare`: tokenize each JSONL corpus into train/val shards.
#pragma once
#include <string>
#include <vector>

#include "core/config.h"

namespace moecpt {

class Tokenizer;
struct Document;

struct SplitStats {
  uint64_t documents = 0;
  uint64_t tokens = 0;
  uint64_t bytes = 0;  // UTF-8 bytes of text
};

struct CorpusStats {
  std::string name;
  std::string input;
  SplitStats train, val;
  double seconds = 0;
};

// Tokenize `docs` (EOS appended to each) with `threads` workers; returns the
// token stream and document offsets, identical whatever the thread count.
void tokenize_documents(const Tokenizer& tok, const std::vector<const Document*>& docs, int threads,
                        std::vector<uint32_t>& tokens, std::vector<uint64_t>& offsets);

// Prepare every corpus of `cfg`: writes <shard_dir>/<name>/{train,val}.bin and
// <shard_dir>/<name>/stats.json. Returns per-corpus statistics.
std::vector<CorpusStats> prepare_corpora(const DataPrepConfig& cfg);

}  // namespace moecpt
