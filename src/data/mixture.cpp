#include "data/mixture.h"

#include <cmath>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "data/shard.h"

namespace moecpt {

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

namespace {
double unit(uint64_t h) { return double(h >> 11) * (1.0 / 9007199254740992.0); }
int64_t round_half_up(double x) { return int64_t(std::floor(x + 0.5)); }
}  // namespace

MixtureSampler::MixtureSampler(std::vector<MixtureSource> sources, double replay_fraction, int64_t seq_len,
                               int64_t batch_size, uint64_t seed)
    : sources_(std::move(sources)),
      replay_fraction_(replay_fraction),
      seq_len_(seq_len),
      batch_size_(batch_size),
      seed_(seed),
      weight_total_(2, 0.0) {
  if (replay_fraction < 0 || replay_fraction > 1) throw Error("replay fraction must be in [0, 1]");
  for (const auto& s : sources_) {
    const uint64_t n = s.shard->size() > uint64_t(seq_len) ? (s.shard->size() - 1) / uint64_t(seq_len) : 0;
    if (n == 0)
      throw file_error(s.shard->path(), "dataset '" + s.name + "' has " + std::to_string(s.shard->size()) +
                                            " tokens, too few for one window of " + std::to_string(seq_len + 1));
    if (n > UINT32_MAX) throw file_error(s.shard->path(), "too many windows for one shard");
    n_windows_.push_back(n);
    weight_total_[s.replay ? 1 : 0] += s.weight;
  }
  if (replay_fraction_ < 1 && weight_total_[0] <= 0) throw Error("the mixture has no new-data dataset");
  if (replay_fraction_ > 0 && weight_total_[1] <= 0) throw Error("replay fraction > 0 but no replay dataset");
  state_.epoch.assign(sources_.size(), 0);
  state_.cursor.assign(sources_.size(), 0);
  perm_.resize(sources_.size());
  perm_epoch_.assign(sources_.size(), UINT64_MAX);
}

int64_t MixtureSampler::replay_rows(double r, int64_t batch_size, uint64_t b) {
  const double per = r * double(batch_size);
  return round_half_up(per * double(b + 1)) - round_half_up(per * double(b));
}

size_t MixtureSampler::pick(bool replay, uint64_t b, int64_t row) const {
  double u = unit(splitmix64(seed_ ^ splitmix64(b * 0x1000003ULL + uint64_t(row)))) * weight_total_[replay];
  size_t last = 0;
  for (size_t i = 0; i < sources_.size(); ++i) {
    if (sources_[i].replay != replay) continue;
    last = i;
    if (u < sources_[i].weight) return i;
    u -= sources_[i].weight;
  }
  return last;  // rounding at the top end
}

const std::vector<uint32_t>& MixtureSampler::permutation(size_t s) {
  if (perm_epoch_[s] != state_.epoch[s]) {
    auto& p = perm_[s];
    p.resize(n_windows_[s]);
    for (uint32_t i = 0; i < p.size(); ++i) p[i] = i;
    // Fisher–Yates with our own generator: identical on every platform.
    uint64_t h = splitmix64(seed_ ^ splitmix64(fnv1a64(sources_[s].name.data(), sources_[s].name.size())) ^
                            splitmix64(state_.epoch[s] + 1));
    for (size_t i = p.size(); i > 1; --i) {
      h = splitmix64(h);
      const size_t j = size_t(unit(h) * double(i));
      std::swap(p[i - 1], p[std::min(j, i - 1)]);
    }
    perm_epoch_[s] = state_.epoch[s];
  }
  return perm_[s];
}

void MixtureSampler::take_window(size_t s, int64_t* out) {
  const uint64_t w = permutation(s)[state_.cursor[s]];
  sources_[s].shard->copy(w * uint64_t(seq_len_), uint64_t(seq_len_) + 1, out);
  if (++state_.cursor[s] == n_windows_[s]) {
    state_.cursor[s] = 0;
    ++state_.epoch[s];
  }
}

Batch MixtureSampler::next() {
  Batch batch;
  batch.batch_size = batch_size_;
  batch.seq_len = seq_len_;
  batch.tokens.resize(size_t(batch_size_ * (seq_len_ + 1)));
  batch.source.resize(size_t(batch_size_));
  const uint64_t b = state_.batch;
  const int64_t n_replay = replay_rows(replay_fraction_, batch_size_, b);
  for (int64_t row = 0; row < batch_size_; ++row) {
    const bool replay = row >= batch_size_ - n_replay;  // replay rows last
    const size_t s = pick(replay, b, row);
    take_window(s, batch.tokens.data() + row * (seq_len_ + 1));
    batch.source[size_t(row)] = int32_t(s);
  }
  ++state_.batch;
  return batch;
}

void MixtureSampler::restore(const SamplerState& s) {
  if (s.epoch.size() != sources_.size() || s.cursor.size() != sources_.size())
    throw Error("sampler state has " + std::to_string(s.epoch.size()) + " datasets, the mixture has " +
                std::to_string(sources_.size()));
  for (size_t i = 0; i < sources_.size(); ++i)
    if (s.cursor[i] >= n_windows_[i])
      throw Error("sampler state: cursor of dataset '" + sources_[i].name + "' is past its " +
                  std::to_string(n_windows_[i]) + " windows (was the shard changed?)");
  state_ = s;
}

nlohmann::json to_json(const SamplerState& s) {
  return {{"batch", s.batch}, {"epoch", s.epoch}, {"cursor", s.cursor}};
}

SamplerState sampler_state_from_json(const nlohmann::json& j) {
  SamplerState s;
  s.batch = j.at("batch").get<uint64_t>();
  s.epoch = j.at("epoch").get<std::vector<uint64_t>>();
  s.cursor = j.at("cursor").get<std::vector<uint64_t>>();
  return s;
}

std::vector<Batch> fixed_eval_batches(const std::shared_ptr<const Shard>& shard, int64_t seq_len,
                                      int64_t batch_size, int64_t n_batches) {
  const uint64_t windows = shard->size() > uint64_t(seq_len) ? (shard->size() - 1) / uint64_t(seq_len) : 0;
  if (windows == 0)
    throw file_error(shard->path(), "validation split too small for one window of " + std::to_string(seq_len + 1));
  std::vector<Batch> out;
  uint64_t w = 0;
  for (int64_t b = 0; b < n_batches && w < windows; ++b) {
    Batch batch;
    batch.seq_len = seq_len;
    batch.batch_size = std::min<int64_t>(batch_size, int64_t(windows - w));
    batch.tokens.resize(size_t(batch.batch_size * (seq_len + 1)));
    batch.source.assign(size_t(batch.batch_size), 0);
    for (int64_t r = 0; r < batch.batch_size; ++r, ++w)
      shard->copy(w * uint64_t(seq_len), uint64_t(seq_len) + 1, batch.tokens.data() + r * (seq_len + 1));
    out.push_back(std::move(batch));
  }
  return out;
}

}  // namespace moecpt
