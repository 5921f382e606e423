#include "data/tokenizer.h"

#include <chrono>
#include <filesystem>
#include <unordered_map>

#include "core/atomic_file.h"
#include "core/error.h"
#include "data/documents.h"
#include "data/spm_shim.h"

namespace moecpt {

Tokenizer::Tokenizer(const std::string& model_path) : path_(model_path) {
  if (!std::filesystem::exists(model_path))
    throw file_error(model_path, "tokenizer model not found (run `moecpt data tokenizer train` first)");
  char error[512] = "";
  sp_ = spm::api().load(model_path.c_str(), error, sizeof error);
  if (!sp_) throw file_error(model_path, std::string("cannot load sentencepiece model: ") + error);
}

Tokenizer::~Tokenizer() {
  if (sp_) spm::api().free(sp_);
}

std::vector<int> Tokenizer::encode(const std::string& text) const {
  // At most one id per byte (byte fallback) plus a leading space piece.
  std::vector<int> ids(text.size() + 8);
  char error[512] = "";
  long n = spm::api().encode(sp_, text.data(), text.size(), ids.data(), ids.size(), error, sizeof error);
  if (n < 0) throw file_error(path_, std::string("encoding failed: ") + error);
  if (size_t(n) > ids.size()) {  // not expected; retry with the exact size
    ids.resize(size_t(n));
    n = spm::api().encode(sp_, text.data(), text.size(), ids.data(), ids.size(), error, sizeof error);
  }
  ids.resize(size_t(n));
  return ids;
}

std::string Tokenizer::decode(const std::vector<int>& ids) const {
  std::string text(ids.size() * 8 + 16, '\0');
  char error[512] = "";
  long n = spm::api().decode(sp_, ids.data(), ids.size(), text.data(), text.size(), error, sizeof error);
  if (n < 0) throw file_error(path_, std::string("decoding failed: ") + error);
  if (size_t(n) > text.size()) {
    text.resize(size_t(n));
    n = spm::api().decode(sp_, ids.data(), ids.size(), text.data(), text.size(), error, sizeof error);
  }
  text.resize(size_t(n));
  return text;
}

int Tokenizer::vocab_size() const { return spm::api().info(sp_, 0); }
int Tokenizer::eos_id() const { return spm::api().info(sp_, 1); }

namespace {

// Cut a document into training chunks of at most `max_bytes`, at line ends,
// keeping the newlines so that they become pieces.
void chunk_document(const std::string& text, size_t max_bytes, std::vector<std::string>& out) {
  size_t start = 0;
  std::string chunk;
  while (start < text.size()) {
    size_t end = text.find('\n', start);
    end = end == std::string::npos ? text.size() : end + 1;
    std::string line = text.substr(start, end - start);
    start = end;
    if (line.size() > max_bytes) line.resize(max_bytes);  // rare: one huge line
    if (chunk.size() + line.size() > max_bytes) {
      out.push_back(std::move(chunk));
      chunk.clear();
    }
    chunk += line;
  }
  if (!chunk.empty()) out.push_back(std::move(chunk));
}

}  // namespace

TokenizerTrainReport train_tokenizer(const TokenizerConfig& cfg,
                                     const std::vector<std::vector<Document>>& corpora) {
  auto t0 = std::chrono::steady_clock::now();
  // Equal line budget per corpus, taken evenly spread through each corpus.
  const size_t per_corpus = size_t(cfg.max_sentences) / std::max<size_t>(1, corpora.size());
  std::vector<std::string> lines;
  for (const auto& docs : corpora) {
    std::vector<std::string> all;
    for (const auto& d : docs) chunk_document(d.text, size_t(cfg.max_sentence_bytes) - 16, all);
    const size_t take = std::min(per_corpus, all.size());
    for (size_t i = 0; i < take; ++i) lines.push_back(std::move(all[i * all.size() / take]));
  }
  if (lines.empty()) throw Error("tokenizer training: the corpora hold no text");

  const std::string prefix = cfg.model.substr(0, cfg.model.size() - (cfg.model.ends_with(".model") ? 6 : 0));
  std::filesystem::path dir = std::filesystem::path(prefix).parent_path();
  if (!dir.empty()) std::filesystem::create_directories(dir);
  const std::string tmp_prefix = prefix + ".tmp";
  std::unordered_map<std::string, std::string> args = {
      {"model_prefix", tmp_prefix},
      {"vocab_size", std::to_string(cfg.vocab_size)},
      {"model_type", cfg.model_type},
      {"character_coverage", std::to_string(cfg.character_coverage)},
      {"input_sentence_size", std::to_string(cfg.max_sentences)},
      {"shuffle_input_sentence", "true"},
      {"max_sentence_length", std::to_string(cfg.max_sentence_bytes)},
      {"normalization_rule_name", "identity"},
      {"remove_extra_whitespaces", "false"},
      {"allow_whitespace_only_pieces", "true"},
      {"split_digits", "true"},
      {"byte_fallback", "true"},
      {"user_defined_symbols", "\n,\t"},
      {"bos_id", "-1"},
      {"eos_id", "1"},
      {"unk_id", "0"},
      {"pad_id", "-1"},
      {"num_threads", "2"},
      {"minloglevel", "2"},  // errors only: its warnings are about the unused .vocab text file
  };
  std::vector<const char*> keys, values, line_ptrs;
  std::vector<size_t> lens;
  for (const auto& [k, v] : args) {
    keys.push_back(k.c_str());
    values.push_back(v.c_str());
  }
  for (const auto& l : lines) {
    line_ptrs.push_back(l.data());
    lens.push_back(l.size());
  }
  char error[1024] = "";
  if (!spm::api().train(keys.data(), values.data(), keys.size(), line_ptrs.data(), lens.data(), lines.size(), error,
                        sizeof error))
    throw Error(cfg.model + ": tokenizer training failed: " + error);
  std::filesystem::rename(tmp_prefix + ".model", prefix + ".model");
  std::filesystem::rename(tmp_prefix + ".vocab", prefix + ".vocab");
  TokenizerTrainReport r;
  r.sentences = lines.size();
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

}  // namespace moecpt
