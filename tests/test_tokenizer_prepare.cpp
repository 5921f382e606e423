// Tokenizer training/round trip and shard preparation on small real-looking text.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "core/config.h"
#include "core/error.h"
#include "data/documents.h"
#include "data/prepare.h"
#include "data/shard.h"
#include "data/tokenizer.h"
#include "test_util.h"

namespace moecpt {
namespace {

// Small corpora in the three domains (enough text for a 400-piece vocabulary).
void write_corpora(const testing::TempDir& dir) {
  std::ofstream en(dir / "en.jsonl"), de(dir / "de.jsonl"), code(dir / "code.jsonl");
  for (int i = 0; i < 40; ++i) {
    en << nlohmann::json{{"id", "en/" + std::to_string(i)},
                         {"text", "Call me Ishmael. Some years ago, having little money in my purse, I thought I "
                                  "would sail about a little and see the watery part of the world, number " +
                                      std::to_string(i) + ".\nThe state of the Union is strong."}}
                  .dump()
       << "\n";
    de << nlohmann::json{{"id", "de/" + std::to_string(i)},
                         {"text", "Wählen Sie im Menü Extras – Optionen, um die Größe der Schrift zu ändern. "
                                  "Über den Dialog können Sie Ihre Einstellungen für Dokument " +
                                      std::to_string(i) + " übernehmen."}}
                  .dump()
       << "\n";
    code << nlohmann::json{{"id", "code/" + std::to_string(i)},
                           {"text", "func add" + std::to_string(i) +
                                        "(a, b int) int {\n\treturn a + b\n}\n\ndef f(x):\n    return x * 2\n"}}
                    .dump()
         << "\n";
  }
}

DataPrepConfig small_config(const testing::TempDir& dir) {
  DataPrepConfig c;
  c.tokenizer.model = dir / "tok/m.model";
  c.tokenizer.vocab_size = 400;
  c.tokenizer.max_sentences = 1000;
  c.corpora.names = {"en", "de", "code"};
  c.corpora.inputs = {dir / "en.jsonl", dir / "de.jsonl", dir / "code.jsonl"};
  c.corpora.shard_dir = dir / "shards";
  c.corpora.val_fraction = 0.2;
  return c;
}

TEST(TokenizerPrepare, TrainRoundTripAndShards) {
  testing::TempDir dir;
  write_corpora(dir);
  auto cfg = small_config(dir);
  std::vector<std::vector<Document>> corpora;
  for (const auto& in : cfg.corpora.inputs) corpora.push_back(read_documents(in));
  train_tokenizer(cfg.tokenizer, corpora);
  Tokenizer tok(cfg.tokenizer.model);
  EXPECT_EQ(tok.vocab_size(), 400);
  EXPECT_FALSE(std::filesystem::exists(dir / "tok/m.tmp.model"));

  // Exact round trip: newlines, tabs, indentation, umlauts, unseen characters (byte fallback).
  for (std::string text : {"func add(a, b int) int {\n\treturn a + b\n}\n", "    return x * 2\n\n",
                           "Größe ändern – Übernehmen", "Call me Ishmael.", "日本語 ✓ emoji 🙂"}) {
    auto ids = tok.encode(text);
    EXPECT_EQ(tok.decode(ids), text);
    for (int id : ids) EXPECT_LT(id, 400);
  }
  // German is not spelled out byte by byte: fewer tokens than characters.
  EXPECT_LT(tok.encode("Wählen Sie im Menü Extras").size(), 20u);  // 27 bytes: merges, not bytes

  auto stats = prepare_corpora(cfg);
  ASSERT_EQ(stats.size(), 3u);
  for (const auto& s : stats) {
    auto train = Shard::open(cfg.corpora.shard_dir + "/" + s.name + "/train.bin");
    auto val = Shard::open(cfg.corpora.shard_dir + "/" + s.name + "/val.bin");
    EXPECT_EQ(train->size(), s.train.tokens);
    EXPECT_EQ(val->size(), s.val.tokens);
    EXPECT_EQ(s.train.documents + s.val.documents, 40u);
    EXPECT_GT(s.val.documents, 0u);
    EXPECT_EQ(train->info().vocab_size, 400u);
    // Every document ends with EOS.
    for (uint64_t d = 0; d < train->info().n_docs; ++d)
      EXPECT_EQ(train->token(train->document(d).second - 1), uint32_t(tok.eos_id()));
    EXPECT_TRUE(std::filesystem::exists(cfg.corpora.shard_dir + "/" + s.name + "/stats.json"));
  }
}

TEST(TokenizerPrepare, SplitIsByDocumentAndDeterministic) {
  std::vector<Document> docs;
  for (int i = 0; i < 1000; ++i) docs.push_back({"doc/chapter_" + std::to_string(i), "t"});
  std::vector<const Document*> tr, va, tr2, va2;
  split_documents(docs, 0.1, 0, tr, va);
  split_documents(docs, 0.1, 0, tr2, va2);
  EXPECT_EQ(va, va2);
  EXPECT_EQ(tr.size() + va.size(), docs.size());
  EXPECT_NEAR(double(va.size()) / 1000.0, 0.1, 0.03);  // ids differing in the last digits still spread
  std::set<const Document*> v(va.begin(), va.end());
  for (auto* d : tr) EXPECT_EQ(v.count(d), 0u);
  // Two documents: one each side even when the hash would put both in train.
  std::vector<Document> two = {{"x", "a"}, {"y", "b"}};
  split_documents(two, 0.01, 0, tr, va);
  EXPECT_EQ(tr.size(), 1u);
  EXPECT_EQ(va.size(), 1u);
}

TEST(TokenizerPrepare, TokenizationIsIndependentOfThreads) {
  testing::TempDir dir;
  write_corpora(dir);
  auto cfg = small_config(dir);
  train_tokenizer(cfg.tokenizer, {read_documents(dir / "en.jsonl"), read_documents(dir / "code.jsonl")});
  Tokenizer tok(cfg.tokenizer.model);
  auto docs = read_documents(dir / "code.jsonl");
  std::vector<const Document*> ptrs;
  for (const auto& d : docs) ptrs.push_back(&d);
  std::vector<uint32_t> t1, t2;
  std::vector<uint64_t> o1, o2;
  tokenize_documents(tok, ptrs, 1, t1, o1);
  tokenize_documents(tok, ptrs, 3, t2, o2);
  EXPECT_EQ(t1, t2);
  EXPECT_EQ(o1, o2);
}

TEST(TokenizerPrepare, BadInputsGiveClearErrors) {
  testing::TempDir dir;
  testing::write_text(dir / "bad.jsonl", "{\"id\": \"a\", \"text\": \"ok\"}\n{\"id\": \"b\", \"txt\": 1}\n");
  try {
    read_documents(dir / "bad.jsonl");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("bad.jsonl: line 2"), std::string::npos) << e.what();
  }
  testing::write_text(dir / "junk.jsonl", "not json\n");
  EXPECT_THROW(read_documents(dir / "junk.jsonl"), Error);
  EXPECT_THROW(read_documents(dir / "absent.jsonl"), Error);
  testing::write_text(dir / "bad.model", "this is not a sentencepiece model");
  try {
    Tokenizer t(dir / "bad.model");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("bad.model"), std::string::npos) << e.what();
  }
  EXPECT_THROW(Tokenizer(dir / "absent.model"), Error);
}

}  // namespace
}  // namespace moecpt
