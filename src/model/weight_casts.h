// Low-precision copies of the weights, kept for the micro-batches of one
// optimizer step.
//
// Under bf16 autocast every micro-batch casts each fp32 weight to bf16 again:
// the experts' w1 | w3 and w2, the dense and shared MLPs' weights, the head's,
// and the attention projections' (autocast's own cache is cleared when each
// micro-batch's autocast scope closes). The weights do not change between the
// micro-batches of one step, so with gradient accumulation every micro-batch
// after the first repeats those passes over the weights (session 8's H100
// profile of Granular-Sinkhorn: ~5.4 ms of a 235 ms micro-batch; the paper's
// 1024-sequence steps are 128 micro-batches of 8).
//
// A StepCasts scope, open over the micro-batches of one step, keeps them:
// cached_cast(keys, dtype, make) returns the copy `make` produced the first time
// in the scope for these parameters, dtype and grad mode, and makes it again if
// a key's version counter moved (the parameter was written in place). Every
// weight cast goes through it: the attention projections cast their weight
// themselves (model/threaded_linear.cpp) instead of leaving it to autocast. The
// scope drops the copies when it closes, before the optimizer writes the weights.
// The copies hold the same values and carry the same autograd nodes (a cast has
// no saved tensors, so a node may run once per micro-batch's backward), so
// training is bit-identical with and without (tests/test_weight_casts.cpp).
// Cost: the copies live from the first micro-batch's forward to the end of the
// step (without the scope each dies after its layer's backward).
//
// The trainer and `bench train` open an enabled scope when a step has more than
// one micro-batch, without CUDA graphs (a capture records the casts it sees; a
// copy kept from another capture would live in that graph's pool) and without
// activation checkpointing (which exists to free such tensors), unless
// MOECPT_CAST_CACHE=0.
#pragma once
#include <torch/types.h>

#include <functional>
#include <initializer_list>

namespace moecpt::model {

class StepCasts {
 public:
  explicit StepCasts(bool enabled);
  ~StepCasts();
  StepCasts(const StepCasts&) = delete;
  StepCasts& operator=(const StepCasts&) = delete;

 private:
  bool enabled_;
};

// Whether a step of `micro_batches` keeps its casts: the rule above, reading
// MOECPT_CAST_CACHE (0 or 1, default 1; anything else is an error naming it).
bool step_casts_wanted(int64_t micro_batches, bool cuda_graph, bool activation_checkpointing);

// make() (a cast of the parameters `keys` to `dtype`), or inside an enabled
// scope the tensor an earlier call made for the same keys, dtype and grad mode.
torch::Tensor cached_cast(std::initializer_list<torch::Tensor> keys, torch::ScalarType dtype,
                          const std::function<torch::Tensor()>& make);

// w cast to dtype through cached_cast (w itself when it has that dtype).
torch::Tensor cached_to(const torch::Tensor& w, torch::ScalarType dtype);

// Hits and misses of cached_cast inside enabled scopes since the process started.
struct CastCacheCounts {
  int64_t hits = 0, misses = 0;
};
CastCacheCounts cast_cache_counts();

}  // namespace moecpt::model
