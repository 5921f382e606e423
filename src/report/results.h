// The saved results of a study (<out>/results/*.json): everything the report
// needs, so that `moecpt report --study DIR` rebuilds it without training.
//   study.json  — the plan: recipe (text), data sets, replay fraction, tie tolerances, wall time
//   arms.json   — one object per arm: kind, model, router, replay, schedule, parent, steps,
//                 tokens, FLOPs, seconds, parameters, validation before/after (loss, MRI and
//                 per-expert loads per layer, per data set), the effective config (TOML)
//   curves.json — per arm: training lines (step, tokens, lr, loss, training-mode MRI per
//                 layer) and evaluation lines (step, per data set loss and MRI per layer)
//   analysis.json — router saturation of the MoE CPT arms' checkpoints and zero-shot task
//                 accuracies of every arm's final checkpoint, when computed
#pragma once
#include <functional>
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
// `wall_seconds` is the whole invocation (data, training, analyses); `phases`
// its breakdown ({"data", "train", "saturation", "tasks": seconds, "arms":
// {arm: seconds}, "arms_skipped": n}).
void collect_results(const StudyPlan& plan, const std::string& results_dir, double wall_seconds,
                     const nlohmann::json& phases = nlohmann::json::object());

// The analyses of the analysis library on the study's checkpoints → analysis.json:
// router saturation (analysis::saturation_report: overlap of each CPT
// checkpoint's routing with the final one's, per layer, on D0 and D1) and the
// zero-shot tasks (analysis::eval_report) on every arm's final checkpoint.
// Adds "saturation" and "tasks" seconds to `phases`; stops between arms when
// `stop()` returns true. Per-arm results are cached in <arm>/analysis.json.
void run_analyses(const StudyPlan& plan, const std::string& results_dir, nlohmann::json& phases,
                  const std::function<bool()>& stop = nullptr);

// "data 3 s, training 80 s, router saturation 9 s, task evaluations 12 s".
std::string phase_summary(const nlohmann::json& phases);
// "42 s", "7 min 5 s", "1 h 3 min".
std::string duration_text(double seconds);

// Loads results/*.json; errors name the missing or malformed file.
StudyResults load_results(const std::string& results_dir);

}  // namespace moecpt::report
