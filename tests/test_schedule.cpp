// Learning-rate schedule values at the boundaries, computed by hand.
#include <gtest/gtest.h>

#include <cmath>

#include "train/schedule.h"

namespace moecpt {
namespace {

TEST(Schedule, CosineWithWarmupFromZero) {
  ScheduleConfig s;  // cosine, warmup 1 %
  s.warmup_fraction = 0.1;
  OptimConfig o;
  o.lr = 1.0;
  o.min_lr = 0.1;
  const int64_t N = 100;  // W = 10
  EXPECT_DOUBLE_EQ(learning_rate(s, o, 0, N), 0.1);   // (0+1)/10
  EXPECT_DOUBLE_EQ(learning_rate(s, o, 4, N), 0.5);
  EXPECT_DOUBLE_EQ(learning_rate(s, o, 9, N), 1.0);   // peak at the end of warmup
  EXPECT_DOUBLE_EQ(learning_rate(s, o, 10, N), 1.0);  // cos(0)
  EXPECT_NEAR(learning_rate(s, o, 55, N), 0.55, 1e-12);  // halfway: (1+0.1)/2
  EXPECT_NEAR(learning_rate(s, o, 100, N), 0.1, 1e-12);
  EXPECT_NEAR(learning_rate(s, o, 70, N), 0.1 + 0.45 * (1 + std::cos(M_PI * 60.0 / 90.0)), 1e-12);
}

TEST(Schedule, RewarmStartsFromMinLr) {
  ScheduleConfig s;
  s.warmup_fraction = 0.1;
  s.warmup_from = "min_lr";
  OptimConfig o;
  o.lr = 1.0;
  o.min_lr = 0.1;
  EXPECT_DOUBLE_EQ(learning_rate(s, o, 0, 100), 0.1 + 0.9 * 0.1);
  EXPECT_DOUBLE_EQ(learning_rate(s, o, 9, 100), 1.0);
}

TEST(Schedule, ConstantAndTinyPhases) {
  ScheduleConfig s;
  s.type = "constant";
  s.warmup_fraction = 0.0;  // still one warmup step: W = max(1, 0)
  OptimConfig o;
  o.lr = 0.5;
  EXPECT_DOUBLE_EQ(learning_rate(s, o, 0, 10), 0.5);
  EXPECT_DOUBLE_EQ(learning_rate(s, o, 9, 10), 0.5);
  ScheduleConfig c;
  EXPECT_DOUBLE_EQ(learning_rate(c, o, 0, 1), 0.5);  // a one-step phase ends at its peak
}

}  // namespace
}  // namespace moecpt
