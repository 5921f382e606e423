#include "model/weight_casts.h"

#include <torch/autograd.h>

#include <map>
#include <mutex>
#include <tuple>
#include <vector>

#include "core/env.h"
#include "core/error.h"

namespace moecpt::model {

namespace {

struct Entry {
  std::vector<torch::Tensor> keys;  // held, so no address is reused while the entry lives
  std::vector<int64_t> versions;
  torch::Tensor cast;
};

// (key tensors' addresses, dtype, grad mode) → the copy. The first pass of a
// checkpointed block runs without grad mode: its copies have no autograd node
// and must not serve a pass that needs one, hence the grad mode in the key.
using Key = std::tuple<std::vector<const void*>, int, bool>;

struct Cache {
  std::mutex mu;
  int open = 0;  // enabled scopes open (the trainer opens one at a time)
  std::map<Key, Entry> entries;
  CastCacheCounts counts;
};

Cache& cache() {
  static Cache c;
  return c;
}

}  // namespace

StepCasts::StepCasts(bool enabled) : enabled_(enabled) {
  if (!enabled_) return;
  auto& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  ++c.open;
}

StepCasts::~StepCasts() {
  if (!enabled_) return;
  std::map<Key, Entry> dropped;  // freed outside the lock
  auto& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  if (--c.open == 0) dropped.swap(c.entries);
}

bool step_casts_wanted(int64_t micro_batches, bool cuda_graph, bool activation_checkpointing) {
  const bool env = env_switch("MOECPT_CAST_CACHE", true);
  return env && micro_batches > 1 && !cuda_graph && !activation_checkpointing;
}

torch::Tensor cached_cast(std::initializer_list<torch::Tensor> keys, torch::ScalarType dtype,
                          const std::function<torch::Tensor()>& make) {
  auto& c = cache();
  bool open = false;
  {
    std::lock_guard<std::mutex> lock(c.mu);
    open = c.open > 0;
  }
  if (!open) return make();
  Key key{{}, int(dtype), torch::GradMode::is_enabled()};
  std::vector<int64_t> versions;
  for (const auto& k : keys) {
    std::get<0>(key).push_back(k.unsafeGetTensorImpl());
    versions.push_back(k._version());
  }
  {
    std::lock_guard<std::mutex> lock(c.mu);
    auto it = c.entries.find(key);
    if (it != c.entries.end() && it->second.versions == versions) {
      ++c.counts.hits;
      return it->second.cast;
    }
  }
  auto cast = make();  // outside the lock: it may be a large copy
  if (cast.scalar_type() != dtype)
    throw Error("cached_cast: the cast made a " + std::string(c10::toString(cast.scalar_type())) + " tensor, not " +
                std::string(c10::toString(dtype)));
  std::lock_guard<std::mutex> lock(c.mu);
  if (c.open == 0) return cast;
  ++c.counts.misses;
  c.entries[key] = Entry{std::vector<torch::Tensor>(keys), std::move(versions), cast};
  return cast;
}

torch::Tensor cached_to(const torch::Tensor& w, torch::ScalarType dtype) {
  if (w.scalar_type() == dtype) return w;
  return cached_cast({w}, dtype, [&] { return w.to(dtype); });
}

CastCacheCounts cast_cache_counts() {
  auto& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  return c.counts;
}

}  // namespace moecpt::model
