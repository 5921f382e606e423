// Sentencepiece tokenizer: loading, encoding, and training on the corpora.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "core/config.h"

namespace moecpt {

struct Document;

class Tokenizer {
 public:
  // Load a sentencepiece model; errors name the file.
  explicit Tokenizer(const std::string& model_path);
  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;
  std::vector<int> encode(const std::string& text) const;
  std::string decode(const std::vector<int>& ids) const;
  int vocab_size() const;
  int eos_id() const;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  void* sp_ = nullptr;  // sentencepiece processor owned by the plugin (spm_shim.h)
};

struct TokenizerTrainReport {
  size_t sentences = 0;   // training lines offered to sentencepiece
  double seconds = 0;
};

// Train a sentencepiece model on all `corpora` (one document list each) and
// write it to cfg.model (atomically). Lines are sampled evenly across corpora
// so no domain dominates the vocabulary. Newlines and tabs are kept as pieces
// (code needs them); whitespace is not collapsed; unknown bytes fall back to
// byte pieces, so every text round-trips.
TokenizerTrainReport train_tokenizer(const TokenizerConfig& cfg,
                                     const std::vector<std::vector<Document>>& corpora);

}  // namespace moecpt
