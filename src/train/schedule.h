// Learning-rate schedules as pure functions of the step (SPEC §4).
#pragma once
#include <cstdint>

#include "core/config.h"

namespace moecpt {

// Learning rate for step t (0-based) of a phase of `total` steps.
// Warmup: W = max(1, round(warmup_fraction · total)) steps, linear from η0
// (0, or η_min when re-warming for CPT) reaching η_max at the end of step W−1:
//   η(t) = η0 + (η_max − η0)·(t+1)/W                      for t < W
// cosine: η(t) = η_min + ½(η_max − η_min)(1 + cos(π·(t−W)/(total−W)))  for t ≥ W
// constant: η(t) = η_max after warmup.
double learning_rate(const ScheduleConfig& s, const OptimConfig& o, int64_t t, int64_t total);

}  // namespace moecpt
