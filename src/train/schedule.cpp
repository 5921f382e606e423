#include "train/schedule.h"

#include <algorithm>
#include <cmath>

namespace moecpt {

double learning_rate(const ScheduleConfig& s, const OptimConfig& o, int64_t t, int64_t total) {
  const int64_t warmup = std::max<int64_t>(1, std::llround(s.warmup_fraction * double(total)));
  const double start = s.warmup_from == "min_lr" ? o.min_lr : 0.0;
  if (t < warmup) return start + (o.lr - start) * double(t + 1) / double(warmup);
  if (s.type == "constant") return o.lr;
  const double span = double(std::max<int64_t>(1, total - warmup));
  const double progress = std::clamp(double(t - warmup) / span, 0.0, 1.0);
  return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1.0 + std::cos(M_PI * progress));
}

}  // namespace moecpt
