// core/malloc_policy.h: freed activations stay in the process. The pattern is a
// training step's: many blocks of a few MiB, all freed at the end of the step,
// then the same again. glibc by default trims the top of its heap once the free
// space there passes its trim threshold (twice the largest block it has mmapped,
// at most 64 MiB), so each "step" page-faults its memory in afresh; with the
// policy, the second and later steps fault in nothing new.
#include <gtest/gtest.h>
#include <sys/resource.h>

#include <cstdint>
#include <cstdlib>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/malloc_policy.h"
#include "test_util.h"

using namespace moecpt;

namespace {

int64_t minor_faults() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return int64_t(ru.ru_minflt);
}

constexpr int64_t kBlockFloats = 1 << 20;  // 4 MiB
constexpr int kBlocks = 64;                // 256 MiB a "step"
constexpr int64_t kPagesPerStep = kBlocks * kBlockFloats * 4 / 4096;

// Minor faults of one step: allocate, touch, free every block.
int64_t step_faults() {
  const int64_t f0 = minor_faults();
  {
    std::vector<torch::Tensor> live;
    for (int i = 0; i < kBlocks; ++i) live.push_back(torch::empty({kBlockFloats}).fill_(float(i)));
  }
  return minor_faults() - f0;
}

}  // namespace

TEST(MallocPolicy, FreedStepMemoryIsFaultedInOnlyOnce) {
#if !defined(__GLIBC__)
  GTEST_SKIP() << "glibc only";
#endif
  if (std::getenv("GLIBC_TUNABLES") || keeping_freed_memory())
    GTEST_SKIP() << "malloc already tuned in this process or by GLIBC_TUNABLES";
  // glibc's default: the steps after the first fault their memory in again.
  step_faults();
  const int64_t default_faults = step_faults();
  EXPECT_GT(default_faults, kPagesPerStep / 2) << "glibc kept the freed memory by itself";

  if (std::getenv("MOECPT_KEEP_FREED_MEMORY")) GTEST_SKIP() << "MOECPT_KEEP_FREED_MEMORY is set";
  ASSERT_TRUE(keep_freed_memory());
  EXPECT_TRUE(keeping_freed_memory());
  step_faults();  // grows the heap to the step's size
  step_faults();
  // Then a few MiB now and then (the heap settling), against the 256 MiB each
  // step faulted in before.
  int64_t kept_faults = 0;
  for (int s = 0; s < 4; ++s) kept_faults += step_faults();
  EXPECT_LT(kept_faults, kPagesPerStep / 10) << "4 steps with the policy; a step without it: " << default_faults;
}

// The switch is checked by name, and GLIBC_TUNABLES' malloc settings win.
TEST(MallocPolicy, SwitchAndTunablesAreRespected) {
  const std::string cmd = "bench train --config " + std::string(MOECPT_SOURCE_DIR) +
                          "/recipes/mini/dense.toml --set model.vocab_size=256 --set model.d_model=32 --set "
                          "model.seq_len=16 --layers 1 --steps 1 --warmup 0 --batch 1 --threads 1 --peak-tflops 1 --json";
  auto kept = [&](const std::string& env) {
    auto r = moecpt::testing::run_command(env + " " + std::string(MOECPT_BINARY) + " " + cmd);
    EXPECT_EQ(r.exit_code, 0) << r.output;
    return r.exit_code == 0 && nlohmann::json::parse(r.output)["page_faults_per_step"]["keep_freed_memory"].get<bool>();
  };
  EXPECT_TRUE(kept("env -u MOECPT_KEEP_FREED_MEMORY -u GLIBC_TUNABLES"));
  EXPECT_FALSE(kept("env -u GLIBC_TUNABLES MOECPT_KEEP_FREED_MEMORY=0"));
  EXPECT_FALSE(kept("env -u MOECPT_KEEP_FREED_MEMORY GLIBC_TUNABLES=glibc.malloc.arena_max=2"));
  auto bad = moecpt::testing::run_command("env MOECPT_KEEP_FREED_MEMORY=yes " + std::string(MOECPT_BINARY) + " " + cmd);
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_NE(bad.output.find("error: MOECPT_KEEP_FREED_MEMORY must be 0 or 1, got 'yes'"), std::string::npos)
      << bad.output;
}
