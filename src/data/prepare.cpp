#include "data/prepare.h"

#include <chrono>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <thread>

#include "core/atomic_file.h"
#include "core/error.h"
#include "core/log.h"
#include "data/documents.h"
#include "data/shard.h"
#include "data/tokenizer.h"

namespace moecpt {

void tokenize_documents(const Tokenizer& tok, const std::vector<const Document*>& docs, int threads,
                        std::vector<uint32_t>& tokens, std::vector<uint64_t>& offsets) {
  std::vector<std::vector<int>> per_doc(docs.size());
  threads = std::max(1, std::min<int>(threads, int(docs.size())));
  std::vector<std::thread> pool;
  std::exception_ptr failure;
  std::mutex failure_mu;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      try {
        for (size_t i = size_t(t); i < docs.size(); i += size_t(threads)) per_doc[i] = tok.encode(docs[i]->text);
      } catch (...) {
        std::lock_guard<std::mutex> lock(failure_mu);
        failure = std::current_exception();
      }
    });
  }
  for (auto& th : pool) th.join();
  if (failure) std::rethrow_exception(failure);
  tokens.clear();
  offsets.assign(1, 0);
  const uint32_t eos = uint32_t(tok.eos_id());
  for (const auto& ids : per_doc) {
    for (int id : ids) tokens.push_back(uint32_t(id));
    tokens.push_back(eos);  // document separator: the model learns where texts end
    offsets.push_back(tokens.size());
  }
}

std::vector<CorpusStats> prepare_corpora(const DataPrepConfig& cfg) {
  Tokenizer tok(cfg.tokenizer.model);
  const int threads = cfg.corpora.threads > 0 ? int(cfg.corpora.threads)
                                              : int(std::max(1u, std::thread::hardware_concurrency()));
  std::vector<CorpusStats> all;
  for (size_t c = 0; c < cfg.corpora.names.size(); ++c) {
    auto t0 = std::chrono::steady_clock::now();
    CorpusStats st;
    st.name = cfg.corpora.names[c];
    st.input = cfg.corpora.inputs[c];
    auto docs = read_documents(st.input);
    std::vector<const Document*> train, val;
    split_documents(docs, cfg.corpora.val_fraction, uint64_t(cfg.corpora.seed), train, val);
    const auto dir = std::filesystem::path(cfg.corpora.shard_dir) / st.name;
    std::filesystem::create_directories(dir);
    for (auto [split, list, stats] : {std::tuple{"train", &train, &st.train}, std::tuple{"val", &val, &st.val}}) {
      std::vector<uint32_t> tokens;
      std::vector<uint64_t> offsets;
      tokenize_documents(tok, *list, threads, tokens, offsets);
      write_shard((dir / (std::string(split) + ".bin")).string(), tokens, offsets, uint32_t(tok.vocab_size()));
      stats->documents = list->size();
      stats->tokens = tokens.size();
      for (const auto* d : *list) stats->bytes += d->text.size();
    }
    st.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    nlohmann::json j = {{"name", st.name},
                        {"input", st.input},
                        {"tokenizer", cfg.tokenizer.model},
                        {"vocab_size", tok.vocab_size()},
                        {"val_fraction", cfg.corpora.val_fraction},
                        {"train", {{"documents", st.train.documents}, {"tokens", st.train.tokens}, {"bytes", st.train.bytes}}},
                        {"val", {{"documents", st.val.documents}, {"tokens", st.val.tokens}, {"bytes", st.val.bytes}}}};
    write_file_atomic((dir / "stats.json").string(), j.dump(2) + "\n");
    log::info("prepared " + st.name + ": train " + std::to_string(st.train.documents) + " docs / " +
              std::to_string(st.train.tokens) + " tokens, val " + std::to_string(st.val.documents) + " docs / " +
              std::to_string(st.val.tokens) + " tokens (" + std::to_string(st.seconds).substr(0, 5) + " s)");
    all.push_back(st);
  }
  return all;
}

}  // namespace moecpt
