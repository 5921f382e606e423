// scripts/gpu-check.sh is the one thing a session with a GPU runs, on a few
// minutes of device time; nothing else exercises it. Its dry run (DRY_RUN=1:
// no GPU, no build, each run "taking" DRY_RUN_S seconds of a virtual clock)
// must show the A/B plan a GPU call would run: every switch on together, then
// each left out, the tests before the budget runs out, and switch names that
// moecpt actually reads (a misspelt one would silently time the defaults).
#include <gtest/gtest.h>

#include <filesystem>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "test_util.h"

namespace {

using moecpt::testing::read_text;
using moecpt::testing::run_command;
using moecpt::testing::TempDir;

const std::string kSrc = MOECPT_SOURCE_DIR;

std::string dry_run(const TempDir& dir, const std::string& env) {
  auto r = run_command("cd " + kSrc + " && env -u AB_PHASES -u TESTS_REGEX DRY_RUN=1 AB=1 OUT=" + (dir / "out") +
                       " " + env + " bash scripts/gpu-check.sh");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  return r.output;
}

// The log line that starts the run of `tag` ("" when there is none).
std::string run_line(const std::string& log, const std::string& tag) {
  std::istringstream in(log);
  for (std::string line; std::getline(in, line);)
    if (line.find("] run " + tag + ": ") != std::string::npos) return line;
  return "";
}

std::vector<std::string> switches_in(const std::string& line) {
  std::vector<std::string> out;
  static const std::regex sw(R"((MOECPT_[A-Z0-9_]+)=\S+)");
  for (std::sregex_iterator it(line.begin(), line.end(), sw), end; it != end; ++it) out.push_back((*it)[1]);
  return out;
}

bool source_mentions(const std::string& name) {
  for (const auto& e : std::filesystem::recursive_directory_iterator(kSrc + "/src")) {
    if (!e.is_regular_file()) continue;
    if (read_text(e.path().string()).find("\"" + name + "\"") != std::string::npos) return true;
  }
  return false;
}

}  // namespace

TEST(GpuCheck, DryRunOfTheAbPlanTurnsEverySwitchOnThenLeavesEachOut) {
  TempDir dir;
  const auto log = dry_run(dir, "BUDGET_S=3000 TESTS_REGEX=CudaKernels");
  // phases in order, the tests among them
  size_t at = 0;
  for (const char* p : {"A/B 1:", "A/B 2:", "A/B 3:", "running ctest -R CudaKernels", "A/B 4:", "A/B 5:", "A/B 6:"}) {
    const auto next = log.find(p, at);
    ASSERT_NE(next, std::string::npos) << p << " missing or out of order:\n" << log;
    at = next;
  }
  EXPECT_EQ(log.find("skip "), std::string::npos) << "nothing skipped with this budget:\n" << log;

  const auto all = switches_in(run_line(log, "granular-all-1"));
  ASSERT_EQ(all.size(), 6u) << log;
  for (const auto& name : all) EXPECT_TRUE(source_mentions(name)) << name << " is read nowhere in src/";
  EXPECT_EQ(run_line(log, "granular-sinkhorn-1").find("MOECPT_"), std::string::npos);
  EXPECT_NE(run_line(log, "granular-all-graph-1").find("--cuda-graph"), std::string::npos);
  EXPECT_NE(run_line(log, "granular-all-accum4").find("--accum 4"), std::string::npos);
  EXPECT_NE(run_line(log, "granular-all-accum4-no-cast-cache").find("MOECPT_CAST_CACHE=0"), std::string::npos);
  EXPECT_NE(run_line(log, "granular-all-profile").find("--profile"), std::string::npos);
  EXPECT_NE(run_line(log, "granular-sinkhorn-2"), "");  // the second round

  // each left out in turn: the others stay
  int leave_one_out = 0;
  for (const auto& left_out : all) {
    std::string arm;
    for (const auto& [tag, name] : std::vector<std::pair<std::string, std::string>>{
             {"sinkhorn-kernel", "MOECPT_SINKHORN_KERNEL"}, {"moe-combine", "MOECPT_MOE_COMBINE"},
             {"slot-sort-kernel", "MOECPT_SLOT_SORT_KERNEL"},
             {"qkv-layout", "MOECPT_QKV_LAYOUT"}, {"rmsnorm-kernel", "MOECPT_RMSNORM_KERNEL"},
             {"add-rmsnorm-kernel", "MOECPT_ADD_RMSNORM_KERNEL"}})
      if (name == left_out) arm = "granular-all-but-" + tag + "-1";
    ASSERT_FALSE(arm.empty()) << left_out;
    const auto got = switches_in(run_line(log, arm));
    std::set<std::string> want(all.begin(), all.end());
    want.erase(left_out);
    EXPECT_EQ(std::set<std::string>(got.begin(), got.end()), want) << arm;
    ++leave_one_out;
  }
  EXPECT_EQ(leave_one_out, 6);
  // dense: the three switches that apply to it, and each left out
  EXPECT_EQ(switches_in(run_line(log, "dense-all-1")).size(), 3u);
  EXPECT_EQ(switches_in(run_line(log, "dense-all-but-qkv-layout-1")).size(), 2u);

  // the A/B table compares a leave-one-out arm with its model's "all" arm
  EXPECT_NE(log.find("vs granular-all\n"), std::string::npos) << log;
  // and reads each switch's worth off them (the dry run's arms all "take" the same time)
  EXPECT_NE(log.find("granular: all switches 100.0 ms vs 100.0 ms with the defaults; loss agrees"), std::string::npos)
      << log;
  EXPECT_NE(log.find("slot-sort-kernel             worth    +0.0 ms in 'all': within 1 %: no evidence either way"),
            std::string::npos)
      << log;
  EXPECT_NE(log.find("granular-all-graph"), std::string::npos);
}

// At the budget of one call (450 s: ~105 s of build, ~25 s per run) the
// defaults-vs-all arms, the tests and the profile all fit; what the budget
// cuts is the leave-one-out phase and the second round, in that order.
TEST(GpuCheck, DryRunAtOneCallsBudgetKeepsTheCoreArmsTheTestsAndTheProfile) {
  TempDir dir;
  const auto log = dry_run(dir, "BUDGET_S=450 DRY_RUN_S=25 DRY_BUILD_S=105");
  for (const char* tag : {"granular-sinkhorn-1", "granular-all-1", "granular-all-graph-1", "dense-1", "dense-all-1",
                          "dense-all-graph-1", "granular-all-accum4", "granular-all-profile"})
    EXPECT_NE(run_line(log, tag), "") << tag << " did not run:\n" << log;
  EXPECT_NE(log.find("tests built; running ctest"), std::string::npos) << log;
  const auto first_skip = log.find("skip ");
  ASSERT_NE(first_skip, std::string::npos);
  EXPECT_GT(first_skip, log.find("A/B 5:")) << log;
  EXPECT_NE(log.find("skip A/B 6 (budget)"), std::string::npos) << log;

  // a second call on the warm machine picks the phases left
  TempDir dir2;
  const auto log2 = dry_run(dir2, "BUDGET_S=450 AB_PHASES='5'");
  EXPECT_EQ(log2.find("A/B 1:"), std::string::npos);
  EXPECT_NE(run_line(log2, "dense-all-but-add-rmsnorm-kernel-1"), "") << log2;
}
