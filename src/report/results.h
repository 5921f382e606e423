// The saved results of a study (<out>/results/*.json): everything the report
// needs, so that `moecpt report --study DIR` rebuilds it without training.
//   study.json  — the plan: recipe (text), data sets, replay fraction, tie tolerances, wall time
//   arms.json   — one object per arm: kind, model, router, replay, schedule, parent, steps,
//                 tokens, FLOPs, seconds, parameters, validation before/after (loss, MRI and
//                 per-expert loads per layer, per data set), the effective config (TOML)
//   curves.json — per arm: training lines (step, tokens, lr, loss, training-mode MRI per
//                 layer) and evaluation lines (step, per data set loss and MRI per layer)
//   analysis.json — routing analyses of checkpoints (router saturation), when computed
#pragma once
#include <nlohmann/json.hpp>
#include <string>

#include "core/pch.h"
#include "report/study.h"

namespace moecpt::report {

struct StudyResults {
  nlohmann::json study = nlohmann::json::object();
  nlohmann::json arms = nlohmann::json::array();
  nlohmann::json curves = nlohmann::json::object();
  nlohmann::json analysis = nlohmann::json::object();
  // The arm object named `name`, or nullptr.
  const nlohmann::json* arm(const std::string& name) const;
};

// Reads every finished arm's summary.json, metrics.jsonl and config.toml and
// writes study.json, arms.json and curves.json under `results_dir`.
void collect_results(const StudyPlan& plan, const std::string& results_dir, double wall_seconds);

// Router saturation (overlap of each CPT checkpoint's routing with the final
// one's, per layer, on the validation sets) → analysis.json.
void run_analyses(const StudyPlan& plan, const std::string& results_dir);

// overlap(a, b) = mean over tokens of |I_k^a(x) ∩ I_k^b(x)| / k, for expert
// choices a_TK and b_TK of the same tokens (SPEC §5, router saturation).
double routing_overlap(const torch::Tensor& a_TK, const torch::Tensor& b_TK);

// Loads results/*.json; errors name the missing or malformed file.
StudyResults load_results(const std::string& results_dir);

}  // namespace moecpt::report
