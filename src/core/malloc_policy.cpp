#include "core/malloc_policy.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "core/env.h"

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace moecpt {

namespace {
std::atomic<bool> g_kept{false};
}

bool keeping_freed_memory() { return g_kept.load(); }

bool keep_freed_memory() {
#if defined(__GLIBC__)
  if (!env_switch("MOECPT_KEEP_FREED_MEMORY", true)) return false;
  const char* tunables = std::getenv("GLIBC_TUNABLES");
  if (tunables && std::strstr(tunables, "glibc.malloc.")) return false;
  // Both together: setting either turns off glibc's dynamic mmap threshold, and
  // the trim threshold alone leaves it at 128 KiB (every activation mmapped and
  // faulted in afresh: a mini Granular step took 5x as long).
  constexpr int kMmapThresholdMax = 32 * 1024 * 1024;  // glibc's HEAP_MAX_SIZE / 2 on 64-bit
  constexpr int kTrimThreshold = 1 << 30;              // mallopt takes an int
  const bool kept =
      ::mallopt(M_MMAP_THRESHOLD, kMmapThresholdMax) == 1 && ::mallopt(M_TRIM_THRESHOLD, kTrimThreshold) == 1;
  if (kept) g_kept.store(true);
  return kept;
#else
  return false;
#endif
}

}  // namespace moecpt
