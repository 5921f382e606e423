// Mixture sampler: replay share exact per batch, weights, epochs, determinism, resume.
#include <gtest/gtest.h>

#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "core/error.h"
#include "data/mixture.h"
#include "data/shard.h"
#include "test_util.h"

namespace moecpt {
namespace {

constexpr int64_t kSeq = 8;

// A shard whose tokens encode (dataset id, position) so a window tells where it came from.
std::shared_ptr<const Shard> make_shard(const testing::TempDir& dir, const std::string& name, uint32_t id,
                                        size_t windows) {
  std::vector<uint32_t> toks(windows * kSeq + 1);
  for (size_t i = 0; i < toks.size(); ++i) toks[i] = id * 10000 + uint32_t(i);
  const std::string p = dir / (name + ".bin");
  write_shard(p, toks, {0, toks.size()}, 100000);
  return Shard::open(p);
}

struct Fixture {
  testing::TempDir dir;
  std::vector<MixtureSource> sources(double w_a = 1.0, double w_b = 1.0) {
    return {{"a", make_shard(dir, "a", 1, 50), w_a, false},
            {"b", make_shard(dir, "b", 2, 30), w_b, false},
            {"old", make_shard(dir, "old", 3, 40), 1.0, true}};
  }
};

TEST(Mixture, ReplayRowsAreExactPerBatchAndOverall) {
  for (double r : {0.0, 0.1, 0.3, 0.4, 0.5, 1.0}) {
    int64_t total = 0;
    for (uint64_t b = 0; b < 1000; ++b) {
      const int64_t n = MixtureSampler::replay_rows(r, 10, b);
      EXPECT_GE(n, int64_t(std::floor(r * 10)));
      EXPECT_LE(n, int64_t(std::ceil(r * 10)));
      total += n;
    }
    EXPECT_EQ(total, int64_t(std::llround(r * 10 * 1000))) << r;
  }
  // r·B not an integer: 0.3·16 = 4.8 → round(4.8(b+1)) − round(4.8b) = 5,5,4,5,5
  std::vector<int64_t> got;
  for (uint64_t b = 0; b < 5; ++b) got.push_back(MixtureSampler::replay_rows(0.3, 16, b));
  EXPECT_EQ(got, (std::vector<int64_t>{5, 5, 4, 5, 5}));
}

TEST(Mixture, BatchesRespectReplayAndWeights) {
  Fixture f;
  MixtureSampler s(f.sources(3.0, 1.0), 0.4, kSeq, 10, 7);
  std::map<int, int64_t> rows;
  for (int b = 0; b < 400; ++b) {
    Batch batch = s.next();
    int replay = 0;
    for (int64_t r = 0; r < batch.batch_size; ++r) {
      const int src = batch.source[size_t(r)];
      rows[src]++;
      replay += src == 2;
      // The window's tokens come from the dataset it claims, contiguous.
      const int64_t* w = batch.tokens.data() + r * (kSeq + 1);
      EXPECT_EQ(w[0] / 10000, src + 1);
      for (int64_t t = 1; t <= kSeq; ++t) EXPECT_EQ(w[t], w[0] + t);
    }
    EXPECT_EQ(replay, 4);  // exactly r·B every batch
  }
  const double a = double(rows[0]) / double(rows[0] + rows[1]);
  EXPECT_NEAR(a, 0.75, 0.03);  // weight 3:1 among the new-data rows (2400 draws)
}

TEST(Mixture, EdgeCasesNoReplayAndAllReplay) {
  Fixture f;
  MixtureSampler none(f.sources(), 0.0, kSeq, 8, 1);
  MixtureSampler all(f.sources(), 1.0, kSeq, 8, 1);
  for (int b = 0; b < 50; ++b) {
    for (int src : none.next().source) EXPECT_NE(src, 2);
    for (int src : all.next().source) EXPECT_EQ(src, 2);
  }
}

TEST(Mixture, EachEpochVisitsEveryWindowOnce) {
  Fixture f;
  auto src = f.sources();
  MixtureSampler s({src[1]}, 0.0, kSeq, 5, 3);  // 30 windows, 6 batches per epoch
  for (int epoch = 0; epoch < 3; ++epoch) {
    std::set<int64_t> starts;
    for (int b = 0; b < 6; ++b) {
      Batch batch = s.next();
      for (int64_t r = 0; r < 5; ++r) starts.insert(batch.tokens[size_t(r * (kSeq + 1))]);
    }
    EXPECT_EQ(starts.size(), 30u) << "epoch " << epoch;
  }
}

TEST(Mixture, SameSeedSameBatchesOtherSeedOtherOrder) {
  Fixture f;
  MixtureSampler a(f.sources(), 0.3, kSeq, 6, 42), b(f.sources(), 0.3, kSeq, 6, 42), c(f.sources(), 0.3, kSeq, 6, 43);
  bool differs = false;
  for (int i = 0; i < 20; ++i) {
    auto x = a.next(), y = b.next(), z = c.next();
    EXPECT_EQ(x.tokens, y.tokens);
    differs |= x.tokens != z.tokens;
  }
  EXPECT_TRUE(differs);
}

TEST(Mixture, ResumeFromSerialisedStateIsExact) {
  Fixture f;
  MixtureSampler full(f.sources(), 0.4, kSeq, 7, 5);
  std::vector<Batch> expected;
  for (int i = 0; i < 60; ++i) expected.push_back(full.next());  // crosses epochs

  MixtureSampler first(f.sources(), 0.4, kSeq, 7, 5);
  for (int i = 0; i < 23; ++i) first.next();
  const std::string saved = to_json(first.state()).dump();

  MixtureSampler resumed(f.sources(), 0.4, kSeq, 7, 5);
  resumed.restore(sampler_state_from_json(nlohmann::json::parse(saved)));
  for (int i = 23; i < 60; ++i) {
    auto b = resumed.next();
    EXPECT_EQ(b.tokens, expected[size_t(i)].tokens) << "batch " << i;
    EXPECT_EQ(b.source, expected[size_t(i)].source) << "batch " << i;
  }
}

TEST(Mixture, RejectsInconsistentStateAndTinyShards) {
  Fixture f;
  MixtureSampler s(f.sources(), 0.4, kSeq, 7, 5);
  SamplerState bad = s.state();
  bad.cursor.pop_back();
  EXPECT_THROW(s.restore(bad), Error);
  bad = s.state();
  bad.cursor[0] = 1000;
  EXPECT_THROW(s.restore(bad), Error);
  std::vector<MixtureSource> tiny = {{"t", make_shard(f.dir, "t", 4, 0), 1.0, false}};
  try {
    MixtureSampler t(tiny, 0.0, kSeq, 2, 1);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("t.bin"), std::string::npos) << e.what();
  }
}

TEST(Mixture, FixedEvalBatchesAreInOrderAndBounded) {
  Fixture f;
  auto shard = f.sources()[1].shard;  // 30 windows
  auto batches = fixed_eval_batches(shard, kSeq, 8, 10);
  ASSERT_EQ(batches.size(), 4u);  // 8+8+8+6
  EXPECT_EQ(batches.back().batch_size, 6);
  EXPECT_EQ(batches[1].tokens[0], 2 * 10000 + 8 * kSeq);
}

}  // namespace
}  // namespace moecpt
