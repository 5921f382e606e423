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

ScheduleConfig infinite() {
  ScheduleConfig s;
  s.type = "infinite";
  s.warmup_fraction = 0.1;        // W = 10
  s.cooldown_end_fraction = 0.6;  // C = 60
  s.anneal_fraction = 0.2;        // A = 80
  s.const_lr = 0.5;
  return s;
}

OptimConfig unit_lr() {
  OptimConfig o;
  o.lr = 1.0;
  o.min_lr = 0.1;
  return o;
}

TEST(Schedule, InfiniteCosineCooldownConstantAnneal) {
  auto s = infinite();
  auto o = unit_lr();
  EXPECT_DOUBLE_EQ(learning_rate(s, o, 9, 100), 1.0);
  EXPECT_DOUBLE_EQ(learning_rate(s, o, 10, 100), 1.0);
  EXPECT_NEAR(learning_rate(s, o, 35, 100), 0.75, 1e-12);  // halfway down to η_const
  EXPECT_DOUBLE_EQ(learning_rate(s, o, 60, 100), 0.5);
  EXPECT_DOUBLE_EQ(learning_rate(s, o, 79, 100), 0.5);
  EXPECT_DOUBLE_EQ(learning_rate(s, o, 80, 100), 0.5);  // anneal starts at η_const
  EXPECT_NEAR(learning_rate(s, o, 90, 100), 0.5 * std::sqrt(0.2), 1e-12);  // η_const·(η_min/η_const)^½
  EXPECT_NEAR(learning_rate(s, o, 100, 100), 0.1, 1e-12);
  EXPECT_EQ(anneal_start_step(s, 100), 80);
  EXPECT_EQ(anneal_start_step(ScheduleConfig{}, 100), -1);
}

TEST(Schedule, InfiniteInverseSqrtCooldown) {
  auto s = infinite();
  s.cooldown_shape = "inv_sqrt";
  s.inv_sqrt_alpha = 10;
  auto o = unit_lr();
  EXPECT_NEAR(learning_rate(s, o, 10, 100), 1.0, 1e-12);
  // p = 0.5: (1/√6 − 1/√11)/(1 − 1/√11) = 0.15281128…
  EXPECT_NEAR(learning_rate(s, o, 35, 100), 0.5 + 0.5 * 0.15281128, 1e-7);
  EXPECT_NEAR(learning_rate(s, o, 59, 100), 0.5 + 0.5 * ((1 / std::sqrt(1 + 10 * 49.0 / 50) - 1 / std::sqrt(11.0)) /
                                                         (1 - 1 / std::sqrt(11.0))), 1e-12);
  EXPECT_DOUBLE_EQ(learning_rate(s, o, 60, 100), 0.5);
}

TEST(Schedule, InfiniteFromPreAnnealCheckpointStartsConstant) {
  auto s = infinite();
  s.start = "constant";
  auto o = unit_lr();
  EXPECT_DOUBLE_EQ(learning_rate(s, o, 0, 100), 0.5);  // no re-warming
  EXPECT_DOUBLE_EQ(learning_rate(s, o, 79, 100), 0.5);
  EXPECT_NEAR(learning_rate(s, o, 100, 100), 0.1, 1e-12);
  s.anneal_fraction = 0;  // keep the phase open-ended: constant throughout
  EXPECT_DOUBLE_EQ(learning_rate(s, o, 99, 100), 0.5);
}

TEST(Schedule, WarmupStableDecay) {
  ScheduleConfig s;
  s.type = "wsd";
  s.warmup_fraction = 0.1;
  s.decay_fraction = 0.2;  // D = 80
  auto o = unit_lr();
  EXPECT_DOUBLE_EQ(learning_rate(s, o, 50, 100), 1.0);
  EXPECT_DOUBLE_EQ(learning_rate(s, o, 80, 100), 1.0);
  EXPECT_NEAR(learning_rate(s, o, 90, 100), 0.55, 1e-12);
  EXPECT_NEAR(learning_rate(s, o, 100, 100), 0.1, 1e-12);
  s.decay_shape = "sqrt";
  EXPECT_NEAR(learning_rate(s, o, 90, 100), 0.1 + 0.9 * (1 - std::sqrt(0.5)), 1e-12);
  EXPECT_NEAR(learning_rate(s, o, 100, 100), 0.1, 1e-12);
}

}  // namespace
}  // namespace moecpt
