// Fixed-length token windows from a weighted mixture of datasets, with replay.
//
// Each dataset is cut into non-overlapping windows of seq_len+1 tokens (inputs
// and shifted targets). Every dataset walks its own seeded permutation of
// windows, epoch after epoch. Batch b of B sequences holds exactly
//   n_replay(b) = round(r·B·(b+1)) − round(r·B·b)
// replay sequences, so over any run the replay share is r to within one
// sequence, and each single batch to within one sequence too. Within a group
// (new data or replay) each row picks its dataset by a seeded hash of
// (b, row) with probability proportional to the dataset weight.
// The sampler's whole state is {batch index, per-dataset epoch and cursor}:
// restoring it reproduces the exact batches an uninterrupted run would see.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace moecpt {

class Shard;

struct MixtureSource {
  std::string name;
  std::shared_ptr<const Shard> shard;
  double weight = 1.0;
  bool replay = false;
};

struct SamplerState {
  uint64_t batch = 0;
  std::vector<uint64_t> epoch;   // per source
  std::vector<uint64_t> cursor;  // per source: next position in the epoch's permutation
};
nlohmann::json to_json(const SamplerState& s);
SamplerState sampler_state_from_json(const nlohmann::json& j);

struct Batch {
  std::vector<int64_t> tokens;   // [B, seq_len+1] row-major
  std::vector<int32_t> source;   // [B]: index into the sources
  int64_t batch_size = 0;
  int64_t seq_len = 0;
};

class MixtureSampler {
 public:
  MixtureSampler(std::vector<MixtureSource> sources, double replay_fraction, int64_t seq_len,
                 int64_t batch_size, uint64_t seed);

  Batch next();
  // Number of replay rows in batch `b` (pure function; see the header comment).
  static int64_t replay_rows(double r, int64_t batch_size, uint64_t b);

  const SamplerState& state() const { return state_; }
  void restore(const SamplerState& s);
  const std::vector<MixtureSource>& sources() const { return sources_; }
  uint64_t windows(size_t source) const { return n_windows_[source]; }

 private:
  size_t pick(bool replay, uint64_t b, int64_t row) const;
  void take_window(size_t source, int64_t* out);
  const std::vector<uint32_t>& permutation(size_t source);

  std::vector<MixtureSource> sources_;
  double replay_fraction_;
  int64_t seq_len_, batch_size_;
  uint64_t seed_;
  std::vector<uint64_t> n_windows_;
  std::vector<double> weight_total_;  // [0] new data, [1] replay
  SamplerState state_;
  // Cached permutation per source for its current epoch.
  std::vector<std::vector<uint32_t>> perm_;
  std::vector<uint64_t> perm_epoch_;
};

// A fixed evaluation set: the first `n_batches × batch_size` windows of a
// shard in order (wrapping never), so every evaluation sees the same tokens.
std::vector<Batch> fixed_eval_batches(const std::shared_ptr<const Shard>& shard, int64_t seq_len,
                                      int64_t batch_size, int64_t n_batches);

uint64_t splitmix64(uint64_t x);

}  // namespace moecpt
