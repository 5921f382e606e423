// `moecpt analyze routing | saturation | forgetting`: flags → analysis/reports.h
// → JSON (--json), CSV (saturation --csv) or a short table. Schemas: docs/analysis.md.
#include <iostream>
#include <memory>

#include "analysis/reports.h"
#include "cli/commands.h"

namespace moecpt::cli {

namespace {
void add_data_flags(CLI::App* c, analysis::DataOptions& d) {
  c->add_option("--shard-dir", d.shard_dir, "directory of <name>/val.bin shards (default: the checkpoint's data.shard_dir)");
  c->add_option("--batch-size", d.batch_size, "windows per forward (default: the checkpoint's micro-batch)");
  c->add_option("--seq-len", d.seq_len, "tokens per window (default: the model's seq_len)");
  c->add_option("--max-tokens", d.max_tokens, "look at no more than this many tokens per dataset (0 = all)");
  c->add_option("--device", d.device, "cpu | cuda")->check(CLI::IsMember({"cpu", "cuda"}));
}
}  // namespace

void register_analyze_commands(CLI::App& app) {
  auto* an = app.add_subcommand("analyze", "Routing, router saturation and forgetting of checkpoints (docs/analysis.md)");
  an->require_subcommand(1);

  auto ro = std::make_shared<analysis::RoutingOptions>();
  auto ro_json = std::make_shared<bool>(false);
  auto* routing = an->add_subcommand("routing", "Per MoE layer and dataset: MRI, loads, entropy, dead experts, "
                                                "co-activation, specialisation, domain affinity [vs --compare]");
  routing->add_option("--checkpoint", ro->checkpoint, "checkpoint directory")->required();
  routing->add_option("--data", ro->datasets, "datasets (names under the shard dir, or .bin paths)")->required();
  routing->add_option("--compare", ro->compare, "another checkpoint (e.g. before CPT): overlap, changes");
  routing->add_option("--tokenizer", ro->tokenizer, "sentencepiece model to decode tokens (default: the checkpoint's)");
  routing->add_option("--min-occurrences", ro->min_occurrences,
                      "vocabulary statistics over token ids seen this often (0 = no vocabulary statistics)");
  routing->add_option("--top-tokens", ro->top_tokens, "tokens listed whose favourite expert changed most");
  routing->add_option("--dead-threshold", ro->dead_threshold, "dead expert: load below this share of 1/E");
  routing->add_flag("--json", *ro_json, "print the JSON report");
  add_data_flags(routing, ro->data);
  routing->callback([=] {
    auto r = analysis::routing_report(*ro);
    std::cout << (*ro_json ? r.dump(2) + "\n" : analysis::routing_text(r)) << std::flush;
  });

  auto so = std::make_shared<analysis::SaturationOptions>();
  auto so_json = std::make_shared<bool>(false), so_csv = std::make_shared<bool>(false);
  auto* sat = an->add_subcommand("saturation", "Per layer overlap of each checkpoint's routing with the final one's");
  sat->add_option("--checkpoints", so->checkpoints, "checkpoints in order, the final one last")->required();
  sat->add_option("--data", so->datasets, "datasets (names or .bin paths)")->required();
  auto* jf = sat->add_flag("--json", *so_json, "print the JSON report");
  sat->add_flag("--csv", *so_csv, "print CSV: dataset,checkpoint,step,layer,overlap,changed_share")->excludes(jf);
  add_data_flags(sat, so->data);
  sat->callback([=] {
    auto r = analysis::saturation_report(*so);
    std::cout << (*so_json ? r.dump(2) + "\n" : *so_csv ? analysis::saturation_csv(r) : analysis::saturation_text(r))
              << std::flush;
  });

  auto fo = std::make_shared<analysis::ForgettingOptions>();
  auto fo_json = std::make_shared<bool>(false);
  auto* fg = an->add_subcommand("forgetting", "Loss before/after CPT on old (D0) and new (D1) data, gap to a re-train");
  fg->add_option("--before", fo->before, "checkpoint before CPT")->required();
  fg->add_option("--after", fo->after, "checkpoint after CPT")->required();
  fg->add_option("--reference", fo->reference, "full re-training checkpoint");
  fg->add_option("--data", fo->datasets, "D0 (old) D1 (new) [more]")->required();
  fg->add_flag("--json", *fo_json, "print the JSON report");
  add_data_flags(fg, fo->data);
  fg->callback([=] {
    auto r = analysis::forgetting_report(*fo);
    std::cout << (*fo_json ? r.dump(2) + "\n" : analysis::forgetting_text(r)) << std::flush;
  });
}

}  // namespace moecpt::cli
