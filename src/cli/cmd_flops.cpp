// `moecpt flops`: parameter and FLOP counts of a recipe, from the config alone
// (model/flops.h; the formula is documented in docs/model.md), and for an MoE
// the FLOP-matched dense config with its own counts.
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cli/commands.h"
#include "core/config.h"
#include "model/flops.h"

namespace moecpt::cli {

namespace {

struct Counts {
  model::ParamCounts params;
  int64_t train_flops = 0;      // forward + backward, per token
  int64_t forward_flops = 0;    // = train / 3 (backward = 2 × forward)
  int64_t attention_train = 0;  // the 6·L·seq·d part of train_flops
};

Counts counts_of(const ModelConfig& mc) {
  Counts c;
  c.params = model::count_params(mc);
  c.train_flops = model::train_flops_per_token(mc);
  c.forward_flops = c.train_flops / 3;
  c.attention_train = 6 * mc.n_layers * mc.seq_len * mc.d_model;
  return c;
}

nlohmann::json to_json(const Counts& c) {
  return {
      {"params",
       {{"total", c.params.total},
        {"active", c.params.active},
        {"embedding", c.params.embedding},
        {"total_non_embedding", c.params.total - c.params.embedding},
        {"active_non_embedding", c.params.active - c.params.embedding}}},
      {"flops_per_token",
       {{"forward", c.forward_flops}, {"train", c.train_flops}, {"attention_train", c.attention_train}}},
  };
}

// 1234567 → "1,234,567 (1.23M)"
std::string human(int64_t n) {
  std::string digits = std::to_string(n), grouped;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) grouped += ',';
    grouped += digits[i];
  }
  const char* units[] = {"", "K", "M", "G", "T", "P"};
  double v = double(n);
  int u = 0;
  while (v >= 1000.0 && u < 5) v /= 1000.0, ++u;
  char buf[64];
  std::snprintf(buf, sizeof buf, "%s (%.3g%s)", grouped.c_str(), v, units[u]);
  return buf;
}

void print_counts(std::ostream& os, const Counts& c) {
  os << "  params total          " << human(c.params.total) << "\n"
     << "  params active         " << human(c.params.active) << "\n"
     << "  embedding (V·d)       " << human(c.params.embedding) << "\n"
     << "  total non-embedding   " << human(c.params.total - c.params.embedding) << "\n"
     << "  active non-embedding  " << human(c.params.active - c.params.embedding) << "\n"
     << "  forward FLOPs/token   " << human(c.forward_flops) << "\n"
     << "  training FLOPs/token  " << human(c.train_flops) << "  (attention term 6·L·seq·d: "
     << human(c.attention_train) << ")\n";
}

void run_flops(const std::string& path, const std::vector<std::string>& sets, bool as_json) {
  const Config cfg = load_config(path, sets);
  const ModelConfig& mc = cfg.model;
  const Counts c = counts_of(mc);
  const bool is_moe = mc.ffn == "moe";
  const int64_t n_moe = int64_t(model::moe_layer_indices(mc).size());

  nlohmann::json j = to_json(c);
  j["config"] = path;
  j["ffn"] = mc.ffn;
  j["model"] = {{"vocab_size", mc.vocab_size}, {"d_model", mc.d_model}, {"n_layers", mc.n_layers},
                {"n_heads", mc.n_heads},       {"seq_len", mc.seq_len}, {"ffn_hidden", mc.ffn_hidden},
                {"tie_embeddings", mc.tie_embeddings}};
  if (is_moe) {
    j["model"]["n_experts"] = mc.n_experts;
    j["model"]["n_shared_experts"] = mc.n_shared_experts;
    j["model"]["top_k"] = mc.top_k;
    j["model"]["expert_hidden"] = mc.expert_hidden;
    j["model"]["moe_layers"] = n_moe;
    const ModelConfig dense = model::flop_matched_dense(mc);
    nlohmann::json dj = to_json(counts_of(dense));
    dj["ffn_hidden"] = dense.ffn_hidden;
    j["flop_matched_dense"] = dj;
  }
  if (as_json) {
    std::cout << j.dump(2) << "\n";
    return;
  }

  std::ostringstream os;
  os << path << ": " << mc.ffn << " model, L=" << mc.n_layers << " d=" << mc.d_model
     << " heads=" << mc.n_heads << " seq=" << mc.seq_len << " vocab=" << mc.vocab_size
     << (mc.tie_embeddings ? " tied head" : " untied head");
  if (is_moe) {
    os << "\n  MoE in " << n_moe << "/" << mc.n_layers << " blocks: E=" << mc.n_experts
       << " routed + S=" << mc.n_shared_experts << " shared experts of hidden " << mc.expert_hidden
       << ", top-" << mc.top_k;
  } else {
    os << ", ffn_hidden=" << mc.ffn_hidden;
  }
  os << "\n";
  print_counts(os, c);
  if (is_moe) {
    const ModelConfig dense = model::flop_matched_dense(mc);
    os << "FLOP-matched dense config: model.ffn = \"dense\", model.ffn_hidden = " << dense.ffn_hidden
       << "\n";
    print_counts(os, counts_of(dense));
  }
  std::cout << os.str();
}

}  // namespace

void register_flops_commands(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "flops", "Parameters (total, active, embedding) and FLOPs per token of a recipe; for an MoE, "
               "the FLOP-matched dense config");
  auto path = std::make_shared<std::string>();
  auto sets = std::make_shared<std::vector<std::string>>();
  auto as_json = std::make_shared<bool>(false);
  cmd->add_option("--config,-c", *path, "recipe (TOML)")->required();
  cmd->add_option("--set", *sets, "override a key: section.key=value (repeatable)");
  cmd->add_flag("--json", *as_json, "print JSON instead of text");
  cmd->callback([=] { run_flops(*path, *sets, *as_json); });
}

}  // namespace moecpt::cli
