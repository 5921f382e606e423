// Shard format: round trip, and every corruption gives an error naming the file.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "core/error.h"
#include "data/shard.h"
#include "test_util.h"

namespace moecpt {
namespace {

std::string error_opening(const std::string& path) {
  try {
    Shard::open(path);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

void patch_byte(const std::string& path, size_t at, unsigned char xor_with) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(std::streamoff(at));
  char c;
  f.read(&c, 1);
  c = char(c ^ xor_with);
  f.seekp(std::streamoff(at));
  f.write(&c, 1);
}

TEST(Shard, RoundTripSmallAndLargeVocab) {
  testing::TempDir dir;
  for (uint32_t vocab : {300u, 100000u}) {
    std::vector<uint32_t> toks = {1, 2, 3, 0, 299, 7, 1};
    std::vector<uint64_t> offs = {0, 4, 7};
    const std::string p = dir / ("s" + std::to_string(vocab) + ".bin");
    write_shard(p, toks, offs, vocab);
    auto s = Shard::open(p);
    EXPECT_EQ(s->info().token_bytes, vocab <= 65536 ? 2u : 4u);
    EXPECT_EQ(s->size(), toks.size());
    EXPECT_EQ(s->info().n_docs, 2u);
    EXPECT_EQ(s->info().vocab_size, vocab);
    for (size_t i = 0; i < toks.size(); ++i) EXPECT_EQ(s->token(i), toks[i]);
    EXPECT_EQ(s->document(1), (std::pair<uint64_t, uint64_t>{4, 7}));
    std::vector<int64_t> out(3);
    s->copy(2, 3, out.data());
    EXPECT_EQ(out, (std::vector<int64_t>{3, 0, 299}));
  }
}

class CorruptShard : public ::testing::Test {
 protected:
  void SetUp() override {
    std::vector<uint32_t> toks(1000);
    for (size_t i = 0; i < toks.size(); ++i) toks[i] = uint32_t(i % 500);
    write_shard(path, toks, {0, 400, 1000}, 500);
  }
  testing::TempDir dir;
  std::string path = dir / "train.bin";
};

TEST_F(CorruptShard, Truncated) {
  for (size_t keep : {2000ul, 1000ul, 64ul, 10ul, 0ul}) {  // shrinking only: growing would zero-fill
    std::filesystem::resize_file(path, keep);
    const auto e = error_opening(path);
    EXPECT_NE(e.find(path), std::string::npos) << e;
    EXPECT_NE(e.find("truncated"), std::string::npos) << keep << ": " << e;
  }
}

TEST_F(CorruptShard, FlippedTokenByteFailsChecksum) {
  patch_byte(path, 64 + 301, 0x01);
  const auto e = error_opening(path);
  EXPECT_NE(e.find(path), std::string::npos) << e;
  EXPECT_NE(e.find("checksum"), std::string::npos) << e;
  EXPECT_NO_THROW(Shard::open(path, /*verify=*/false));  // header is intact
}

TEST_F(CorruptShard, BadMagicAndHeader) {
  patch_byte(path, 0, 0xff);
  EXPECT_NE(error_opening(path).find("bad magic"), std::string::npos);
  patch_byte(path, 0, 0xff);   // restore
  patch_byte(path, 24, 0x10);  // token count
  EXPECT_NE(error_opening(path).find("header checksum"), std::string::npos);
}

TEST_F(CorruptShard, NotAShardAtAll) {
  testing::write_text(path, std::string(100, 'x'));
  EXPECT_NE(error_opening(path).find("not a moecpt shard"), std::string::npos);
  EXPECT_NE(error_opening(dir / "absent.bin").find("cannot open shard"), std::string::npos);
}

TEST_F(CorruptShard, InspectCommandReportsCleanly) {
  auto ok = testing::run_moecpt("data inspect " + path);
  EXPECT_EQ(ok.exit_code, 0) << ok.output;
  EXPECT_NE(ok.output.find("\"tokens\": 1000"), std::string::npos) << ok.output;
  EXPECT_NE(ok.output.find("\"documents\": 2"), std::string::npos) << ok.output;
  EXPECT_NE(ok.output.find("\"vocab_size\": 500"), std::string::npos) << ok.output;
  std::filesystem::resize_file(path, 500);
  auto bad = testing::run_moecpt("data inspect " + path);
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_NE(bad.output.find("error: " + path + ": truncated shard"), std::string::npos) << bad.output;
}

}  // namespace
}  // namespace moecpt
