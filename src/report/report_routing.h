// Routing diagnostics in the study report (issue 11): what CPT did to the
// experts. The study runs analysis::routing_report (docs/analysis.md) on the
// final checkpoint of every MoE CPT arm with --compare = the checkpoint it
// started from (and on MoE PT checkpoints no CPT arm compares with), on every
// validation set, and reads the Sinkhorn convergence lines of every Sinkhorn
// arm's metrics.jsonl. Both are saved as analysis.json "routing" (so
// `moecpt report --study DIR` renders them from the saved results):
//
//   "routing": {
//     "tokens_per_dataset": 8192, "seconds": 12.5, "main_variant": "r40-rewarm",
//     "arms": [ {"name", "kind", "model", "variant", "router", "compare_label",
//                "seconds", "report": <analyze routing JSON>} ],
//     "convergence": [ {"name", "model", "kind", "router_tol", "max_iters", "mri_ideal",
//                       "step": [..], "iters": [[per MoE layer]..], "error": [[..]..],
//                       "mri": [[..]..]} ]
//   }
//
// render_routing_section() turns that into HTML with inline SVG heatmaps
// (co-activation before/after/change, domain affinity), vocabulary
// specialisation (per layer, and the tokens whose favourite expert changed
// most, decoded and escaped), Sinkhorn inference vs training mode, and the
// Sinkhorn convergence in training.
#pragma once
#include <nlohmann/json.hpp>
#include <string>

#include "report/results.h"
#include "report/study.h"

namespace moecpt::report {

// Runs the routing analyses for the finished MoE arms of `plan` and merges
// them into <results_dir>/analysis.json under "routing" (the file is created
// when absent). Token budget per dataset: `max_tokens` (0 = the recipe's
// saturation_batches × the arm's batch size × seq_len; --quick: one batch).
void save_routing_diagnostics(const StudyPlan& plan, const std::string& results_dir, int64_t max_tokens = 0);

// The Sinkhorn convergence lines of one metrics.jsonl ("train" lines that carry
// sinkhorn_iters): {"step": [..], "iters": [[..]..], "error": [[..]..],
// "mri": [[..]..], "mri_ideal": x}; "step" is empty when there are none.
nlohmann::json read_sinkhorn_convergence(const std::string& metrics_path);

// The HTML section (an <h2> and its content) from r.analysis["routing"]; a
// short "not available" note when the study saved none.
std::string render_routing_section(const StudyResults& r);

// Pieces of the section, exposed for tests. `arm` is one entry of "arms".
// Co-activation before (compare), after and change for the MoE layer at
// position `layer` (index into moe_layers) on `dataset`, inference mode
// (`change_only`: just the change; without a compare, just the checkpoint's).
std::string coactivation_figures(const nlohmann::json& arm, const std::string& dataset, size_t layer,
                                 bool change_only = false);
// Domain affinity (rows = experts, columns = datasets; normalised shares)
// after CPT and its change, for the MoE layer at position `layer`.
std::string domain_affinity_figures(const nlohmann::json& arm, size_t layer);
// Vocabulary specialisation per layer (bar chart + table) and the tokens whose
// favourite expert changed most on `dataset`.
std::string specialisation_html(const nlohmann::json& arm, const std::string& old_ds, const std::string& new_ds);
// Sinkhorn: inference- vs training-mode statistics and their gap (empty for other routers).
std::string sinkhorn_modes_html(const nlohmann::json& arm);
// Sinkhorn convergence in training of one arm (one entry of "convergence").
std::string convergence_figures(const nlohmann::json& conv);
// A decoded token made readable: leading/trailing spaces as ␣, newlines as ↵,
// tabs as →, then XML-escaped.
std::string visible_token(const std::string& text);

}  // namespace moecpt::report
