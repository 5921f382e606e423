// Learning-rate schedules as pure functions of the step (SPEC §4).
#pragma once
#include <cstdint>

#include "core/config.h"

namespace moecpt {

// Learning rate for step t (0-based) of a phase of N = `total` steps.
//
// Warmup (all types except infinite with start = "constant"):
//   W = max(1, round(warmup_fraction·N)); η(t) = η0 + (η_max − η0)·(t+1)/W for t < W,
//   η0 = 0, or η_min when re-warming (warmup_from = "min_lr"). Step W−1 runs at η_max.
// cosine:   η(t) = η_min + ½(η_max − η_min)(1 + cos(π·(t−W)/(N−W)))
// constant: η(t) = η_max
// wsd:      η_max until D = N − round(decay_fraction·N), then with p = (t−D)/(N−D)
//           linear: η_max − (η_max − η_min)·p;  sqrt: η_min + (η_max − η_min)(1 − √p)
// infinite: C = round(cooldown_end_fraction·N), A = N − round(anneal_fraction·N)
//   W ≤ t < C  cooldown to η_const, p = (t−W)/(C−W):
//              cosine:   η_const + ½(η_max − η_const)(1 + cos(πp))
//              inv_sqrt: η_const + (η_max − η_const)·(1/√(1+αp) − 1/√(1+α)) / (1 − 1/√(1+α))
//   C ≤ t < A  η_const
//   t ≥ A      η_const·(η_min/η_const)^((t−A)/(N−A))     (exponential anneal)
//   start = "constant" (CPT from the pre-anneal checkpoint): η_const until A, then the anneal.
double learning_rate(const ScheduleConfig& s, const OptimConfig& o, int64_t t, int64_t total);

// First step of the final anneal of an infinite schedule (A above), or -1 when
// the schedule has none. The trainer keeps a checkpoint taken just before it.
int64_t anneal_start_step(const ScheduleConfig& s, int64_t total);

}  // namespace moecpt
