#include "train/schedule.h"

#include <algorithm>
#include <cmath>

namespace moecpt {

namespace {
int64_t steps_of(double fraction, int64_t total) { return std::llround(fraction * double(total)); }
double progress(int64_t t, int64_t begin, int64_t end) {
  return std::clamp(double(t - begin) / double(std::max<int64_t>(1, end - begin)), 0.0, 1.0);
}
}  // namespace

int64_t anneal_start_step(const ScheduleConfig& s, int64_t total) {
  if (s.type != "infinite" || s.anneal_fraction <= 0) return -1;
  return total - std::max<int64_t>(1, steps_of(s.anneal_fraction, total));
}

double learning_rate(const ScheduleConfig& s, const OptimConfig& o, int64_t t, int64_t total) {
  const double lr = o.lr, lo = o.min_lr;
  if (s.type == "infinite") {
    const int64_t A = anneal_start_step(s, total);
    if (A >= 0 && t >= A) return s.const_lr * std::pow(lo / s.const_lr, progress(t, A, total));
    if (s.start == "constant") return s.const_lr;
  }
  const int64_t W = std::max<int64_t>(1, steps_of(s.warmup_fraction, total));
  const double start = s.warmup_from == "min_lr" ? lo : 0.0;
  if (t < W) return start + (lr - start) * double(t + 1) / double(W);
  if (s.type == "constant") return lr;
  if (s.type == "cosine") return lo + 0.5 * (lr - lo) * (1.0 + std::cos(M_PI * progress(t, W, total)));
  if (s.type == "wsd") {
    const int64_t D = total - steps_of(s.decay_fraction, total);
    if (t < D) return lr;
    const double p = progress(t, D, total);
    return s.decay_shape == "sqrt" ? lo + (lr - lo) * (1.0 - std::sqrt(p)) : lr - (lr - lo) * p;
  }
  // infinite, start = "warmup": cooldown, then constant (the anneal was handled above).
  const int64_t C = steps_of(s.cooldown_end_fraction, total);
  if (t >= C) return s.const_lr;
  const double p = progress(t, W, C);
  if (s.cooldown_shape == "inv_sqrt") {
    const double a = s.inv_sqrt_alpha, end = 1.0 / std::sqrt(1.0 + a);
    return s.const_lr + (lr - s.const_lr) * (1.0 / std::sqrt(1.0 + a * p) - end) / (1.0 - end);
  }
  return s.const_lr + 0.5 * (lr - s.const_lr) * (1.0 + std::cos(M_PI * p));
}

}  // namespace moecpt
