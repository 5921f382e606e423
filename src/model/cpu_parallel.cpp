#include "model/cpu_parallel.h"

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>

namespace moecpt::model {

int64_t cpu_workers(const at::Tensor& like, int64_t items, int64_t min_items_per_worker) {
  if (!like.is_cpu() || at::in_parallel_region()) return 1;
  const int64_t by_size = items / std::max<int64_t>(1, min_items_per_worker);
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), by_size));
}

void run_workers(int64_t n_workers, const std::function<void(int64_t)>& fn) {
  if (n_workers <= 1) {
    fn(0);
    return;
  }
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, n_workers, 1, [&](int64_t t0, int64_t t1) {
    at::ThreadLocalStateGuard state_guard(caller_state);
    for (int64_t t = t0; t < t1; ++t) fn(t);
  });
}

}  // namespace moecpt::model
