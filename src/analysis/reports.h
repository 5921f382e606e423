// The analysis reports behind `moecpt analyze …` (docs/analysis.md has the
// JSON schema of each). Library functions returning nlohmann::json, so the
// study and its HTML report call them directly, without a subprocess.
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "analysis/model_runner.h"

namespace moecpt::analysis {

// `analyze routing`: per dataset and MoE layer — MRI, loads, entropy, dead
// experts, co-activation, vocabulary specialisation; domain affinity per
// layer; with `compare` the same for the other checkpoint plus overlap,
// changed share and the tokens whose favourite expert moved. For Sinkhorn
// models every statistic in both modes ("inference", "training") and the gap.
struct RoutingOptions {
  std::string checkpoint;
  std::string compare;                  // "" = none
  std::vector<std::string> datasets;    // names or .bin paths
  DataOptions data;
  std::string tokenizer;                // "" = the checkpoint's data.tokenizer (decodes top tokens)
  int64_t min_occurrences = 10;         // vocabulary statistics: ids seen at least this often
  int64_t top_tokens = 20;              // favourite-change tokens listed per layer
  double dead_threshold = 0.01;         // dead = load < threshold × fair share 1/E
};
nlohmann::json routing_report(const RoutingOptions& opt);

// `analyze saturation`: per dataset, per checkpoint and MoE layer, the overlap
// of its choices with the final (last) checkpoint's on the same tokens
// (inference mode). Models are loaded one at a time; the final checkpoint's
// choices are kept (int16) for the tokens looked at.
struct SaturationOptions {
  std::vector<std::string> checkpoints;  // C1 … Cfinal (at least 2)
  std::vector<std::string> datasets;
  DataOptions data;
};
nlohmann::json saturation_report(const SaturationOptions& opt);
// CSV with header dataset,checkpoint,step,layer,overlap,changed_share.
std::string saturation_csv(const nlohmann::json& report);

// `analyze forgetting`: loss/perplexity of `before` and `after` (and
// `reference`) on every dataset; forgetting = Δloss on datasets[0] (D0),
// adaptation = Δloss on datasets[1] (D1), gap = after − reference.
struct ForgettingOptions {
  std::string before, after, reference;  // reference "" = none
  std::vector<std::string> datasets;     // D0 D1 [more]
  DataOptions data;
};
nlohmann::json forgetting_report(const ForgettingOptions& opt);

// Human-readable summaries (the CLI's default output without --json).
std::string routing_text(const nlohmann::json& report);
std::string saturation_text(const nlohmann::json& report);
std::string forgetting_text(const nlohmann::json& report);

}  // namespace moecpt::analysis
