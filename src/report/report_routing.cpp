#include "report/report_routing.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <set>

#include "analysis/reports.h"
#include "core/atomic_file.h"
#include "core/error.h"
#include "core/log.h"
#include "report/svg.h"

namespace moecpt::report {
namespace fs = std::filesystem;
using nlohmann::json;

// ------------------------------------------------------------------ saving

json read_sinkhorn_convergence(const std::string& metrics_path) {
  json c = {{"step", json::array()}, {"iters", json::array()}, {"error", json::array()}, {"mri", json::array()},
            {"mri_ideal", nullptr}};
  std::ifstream in(metrics_path);
  std::string line;
  while (std::getline(in, line)) {
    const json j = json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.is_object() || j.value("kind", "") != "train" || !j.contains("sinkhorn_iters")) continue;
    c["step"].push_back(j.value("step", int64_t(0)));
    c["iters"].push_back(j["sinkhorn_iters"]);
    c["error"].push_back(j.value("sinkhorn_error", json::array()));
    c["mri"].push_back(j.value("mri", json::array()));
    if (j.contains("mri_ideal")) c["mri_ideal"] = j["mri_ideal"];
  }
  return c;
}

namespace {

std::string canonical(const std::string& p) {
  std::error_code ec;
  auto c = fs::weakly_canonical(p, ec);
  return ec ? p : c.string();
}

// Size and modification time of a file: changes when a checkpoint is rewritten.
std::string file_stamp(const std::string& path) {
  std::error_code ec;
  const auto size = fs::file_size(path, ec);
  const auto t = fs::last_write_time(path, ec);
  return std::to_string(size) + "@" + std::to_string(t.time_since_epoch().count());
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

void save_routing_diagnostics(const StudyPlan& plan, const std::string& results_dir, int64_t max_tokens) {
  const auto t0 = std::chrono::steady_clock::now();
  // PT checkpoints some CPT arm compares with: their statistics are in that arm's "compare".
  std::set<std::string> compared;
  for (const auto& a : plan.arms)
    if (a.kind == "cpt" && a.config.model.ffn == "moe" &&
        fs::exists(a.config.run.out_dir + "/checkpoints/final/model.safetensors"))
      compared.insert(canonical(a.config.train.init_from));
  json arms = json::array(), conv = json::array();
  std::string main_variant;
  int64_t budget_used = 0;
  for (const auto& a : plan.arms) {
    if (a.config.model.ffn != "moe") continue;
    const std::string dir = a.config.run.out_dir, final_dir = dir + "/checkpoints/final";
    if (!fs::exists(final_dir + "/model.safetensors")) continue;
    if (a.config.router.type == "sinkhorn") {
      json c = read_sinkhorn_convergence(dir + "/metrics.jsonl");
      if (!c["step"].empty()) {
        c["name"] = a.name;
        c["kind"] = a.kind;
        c["model"] = a.model;
        c["variant"] = a.variant;
        c["tol"] = a.config.router.sinkhorn_tol;
        c["max_iters"] = a.config.router.sinkhorn_max_iters;
        conv.push_back(std::move(c));
      }
    }
    if (a.kind == "full" || (a.kind == "pt" && compared.count(canonical(final_dir)))) continue;
    if (a.kind == "cpt" && main_variant.empty()) main_variant = a.variant;
    analysis::RoutingOptions o;
    o.checkpoint = final_dir;
    if (a.kind == "cpt") o.compare = a.config.train.init_from;
    o.datasets = plan.validation;
    o.data.shard_dir = a.config.data.shard_dir;
    const int64_t bs = a.config.train.micro_batch_size > 0 ? a.config.train.micro_batch_size : a.config.train.batch_size;
    const int64_t batches = plan.quick ? std::min<int64_t>(plan.saturation_batches, 2) : plan.saturation_batches;
    o.data.max_tokens = max_tokens > 0 ? max_tokens : batches * bs * a.config.model.seq_len;
    budget_used = o.data.max_tokens;
    o.min_occurrences = plan.quick ? 3 : 10;
    o.top_tokens = 12;
    const auto t1 = std::chrono::steady_clock::now();
    // Cached in <arm>/routing_diagnostics.json, keyed by the options and the checkpoints' files.
    const json key = {{"checkpoint", o.checkpoint}, {"compare", o.compare}, {"datasets", o.datasets},
                      {"max_tokens", o.data.max_tokens}, {"min_occurrences", o.min_occurrences},
                      {"top_tokens", o.top_tokens}, {"weights", file_stamp(final_dir + "/model.safetensors")},
                      {"compare_weights", o.compare.empty() ? "" : file_stamp(o.compare + "/model.safetensors")}};
    const std::string cache = dir + "/routing_diagnostics.json";
    json rep, cached = fs::exists(cache) ? json::parse(read_file(cache), nullptr, false) : json();
    double secs = 0;
    if (cached.is_object() && cached.value("key", json()) == key && cached.contains("report")) {
      rep = cached["report"];
      secs = cached.value("seconds", 0.0);
    } else {
      try {
        rep = analysis::routing_report(o);
      } catch (const std::exception& e) {
        log::warn("study: routing diagnostics of '" + a.name + "' skipped: " + e.what());
        continue;
      }
      secs = seconds_since(t1);
      write_file_atomic(cache, json{{"key", key}, {"seconds", secs}, {"report", rep}}.dump() + "\n");
    }
    arms.push_back({{"name", a.name},
                    {"kind", a.kind},
                    {"model", a.model},
                    {"variant", a.variant},
                    {"router", a.config.router.type},
                    {"compare_label", a.kind == "cpt" ? (a.parent_checkpoint == "pre_anneal" ? "PT (pre-anneal)" : "PT")
                                                      : ""},
                    {"seconds", secs},
                    {"report", std::move(rep)}});
  }
  const double secs = seconds_since(t0);
  json routing = {{"tokens_per_dataset", budget_used}, {"seconds", secs}, {"main_variant", main_variant},
                  {"old", plan.old_data}, {"new", plan.new_data}, {"arms", arms}, {"convergence", conv}};
  const std::string path = results_dir + "/analysis.json";
  json analysis = json::object();
  if (fs::exists(path)) {
    analysis = json::parse(read_file(path), nullptr, false);
    if (analysis.is_discarded() || !analysis.is_object()) throw Error(path + ": not a JSON object");
  }
  analysis["routing"] = std::move(routing);
  write_file_atomic(path, analysis.dump(1) + "\n");
  log::info("study: routing diagnostics of " + std::to_string(arms.size()) + " MoE checkpoints (" +
            std::to_string(budget_used) + " tokens per dataset, " + std::to_string(int(secs)) + " s)");
}

// ------------------------------------------------------------------ rendering

namespace {

std::string s_of(const json& j, const char* k) { return j.contains(k) && j[k].is_string() ? j[k].get<std::string>() : ""; }
double d_of(const json& j, const char* k) { return j.contains(k) && j[k].is_number() ? j[k].get<double>() : kNaN; }
std::string f3(double v) { return fmt_fixed(v, 3); }
std::string signed3(double v) { return std::string(std::isfinite(v) && v >= 0 ? "+" : "").append(fmt_fixed(v, 3)); }

std::vector<std::vector<double>> matrix(const json& j) {
  std::vector<std::vector<double>> m;
  if (!j.is_array()) return m;
  for (const auto& row : j) {
    std::vector<double> r;
    for (const auto& v : row) r.push_back(v.is_number() ? v.get<double>() : kNaN);
    m.push_back(std::move(r));
  }
  return m;
}

std::string figure(const std::string& svg, const std::string& caption = "") {
  return "<figure>" + svg + (caption.empty() ? "" : "<figcaption>" + xml_escape(caption) + "</figcaption>") + "</figure>";
}

std::vector<std::string> expert_labels(size_t E) {
  std::vector<std::string> l;
  for (size_t e = 0; e < E; ++e) l.push_back(std::string("e").append(std::to_string(e)));
  return l;
}

const json& report_of(const json& arm) {
  static const json empty = json::object();
  return arm.contains("report") ? arm["report"] : empty;
}

// routing[mode][ds][l], or nullptr.
const json* layer_of(const json& arm, const std::string& mode, const std::string& ds, size_t l) {
  const json& r = report_of(arm);
  if (!r.contains("routing") || !r["routing"].contains(mode) || !r["routing"][mode].contains(ds)) return nullptr;
  const json& layers = r["routing"][mode][ds];
  return l < layers.size() ? &layers[l] : nullptr;
}

size_t n_layers(const json& arm) {
  const json& r = report_of(arm);
  return r.contains("moe_layers") ? r["moe_layers"].size() : 0;
}
std::string layer_name(const json& arm, size_t l) {
  const json& r = report_of(arm);
  return "layer " + (r.contains("moe_layers") && l < r["moe_layers"].size() ? std::to_string(r["moe_layers"][l].get<int>())
                                                                             : std::to_string(l));
}
bool has_compare(const json& arm) { return report_of(arm).contains("compare") && report_of(arm)["compare"].is_string(); }

std::vector<std::string> datasets_of(const json& arm) {
  std::vector<std::string> d;
  const json& r = report_of(arm);
  if (r.contains("routing") && r["routing"].contains("inference"))
    for (const auto& [k, v] : r["routing"]["inference"].items()) d.push_back(k);
  // The affinity entry keeps the order the study gave.
  if (r.contains("domain_affinity") && r["domain_affinity"].contains("inference") &&
      !r["domain_affinity"]["inference"].empty())
    d = r["domain_affinity"]["inference"][0].value("datasets", d);
  return d;
}

std::string before_label(const json& arm) {
  const std::string l = s_of(arm, "compare_label");
  return l.empty() ? "before" : l;
}

// Co-activation for display: the diagonal (1 by definition) as NaN (grey).
std::vector<std::vector<double>> off_diagonal(std::vector<std::vector<double>> m) {
  for (size_t i = 0; i < m.size(); ++i)
    if (i < m[i].size()) m[i][i] = kNaN;
  return m;
}
double max_finite(const std::vector<std::vector<double>>& m) {
  double mx = 0;
  for (const auto& r : m)
    for (double v : r)
      if (std::isfinite(v)) mx = std::max(mx, std::abs(v));
  return mx;
}

// The MoE layer whose co-activation changed most on `ds` (mean |Δ|), 0 without compare.
size_t most_changed_layer(const json& arm, const std::string& ds) {
  size_t best = 0;
  double best_v = -1;
  for (size_t l = 0; l < n_layers(arm); ++l) {
    const json* lj = layer_of(arm, "inference", ds, l);
    if (!lj || !lj->contains("compare")) continue;
    double s = 0;
    size_t n = 0;
    for (const auto& row : matrix((*lj)["compare"].value("coactivation_delta", json::array())))
      for (double v : row) s += std::abs(v), ++n;
    if (n && s / double(n) > best_v) best_v = s / double(n), best = l;
  }
  return best;
}

std::string layer_mean(const json& arm, const std::string& ds, const std::function<double(const json&)>& f) {
  double s = 0;
  size_t n = 0;
  for (size_t l = 0; l < n_layers(arm); ++l)
    if (const json* lj = layer_of(arm, "inference", ds, l)) {
      const double v = f(*lj);
      if (std::isfinite(v)) s += v, ++n;
    }
  return n ? f3(s / double(n)) : "–";
}

}  // namespace

std::string visible_token(const std::string& text) {
  std::string out;
  size_t a = 0, b = text.size();
  while (a < b && text[a] == ' ') out += "\u2423", ++a;
  size_t trail = 0;
  while (b > a && text[b - 1] == ' ') --b, ++trail;
  for (size_t i = a; i < b; ++i) {
    if (text[i] == '\n') out += "\u21b5";
    else if (text[i] == '\t') out += "\u2192";
    else if (text[i] == '\r') out += "\\r";
    else out += text[i];
  }
  for (size_t i = 0; i < trail; ++i) out += "\u2423";
  return xml_escape(out);
}

std::string coactivation_figures(const json& arm, const std::string& ds, size_t l, bool change_only) {
  const json* lj = layer_of(arm, "inference", ds, l);
  if (!lj) return "<p class=\"note\">No co-activation for " + xml_escape(ds) + ".</p>";
  const auto after = off_diagonal(matrix((*lj)["coactivation"]));
  const bool cmp = lj->contains("compare");
  const auto before = cmp ? off_diagonal(matrix((*lj)["compare"]["coactivation"])) : std::vector<std::vector<double>>{};
  const auto delta = cmp ? off_diagonal(matrix((*lj)["compare"]["coactivation_delta"])) : std::vector<std::vector<double>>{};
  const size_t E = after.size();
  const double vmax = std::max({max_finite(after), max_finite(before), 1e-6});
  auto base = [&](const std::string& title) {
    Heatmap h;
    h.title = title;
    h.x_label = "also routed to expert j";
    h.y_label = "token routed to expert i";
    h.row_labels = h.col_labels = expert_labels(E);
    h.width = 330;
    h.height = std::max(200.0, 14.0 * double(E) + 76);
    h.vmin = 0;
    h.vmax = vmax;
    h.colorbar_label = "share of i's tokens";
    h.annotate = E <= 8;
    return h;
  };
  const std::string where = layer_name(arm, l) + ", " + ds;
  std::string s;
  if (cmp && !change_only) {
    Heatmap b = base(before_label(arm) + ": co-activation, " + where);
    b.values = before;
    s += figure(render_heatmap(b));
  }
  if (!cmp || !change_only) {
    Heatmap a = base(std::string(cmp ? "after CPT" : "final") + ": co-activation, " + where);
    a.values = after;
    s += figure(render_heatmap(a));
  }
  if (cmp) {
    Heatmap d = base("change (after − before), " + where);
    d.values = delta;
    d.vmin = d.vmax = kNaN;
    d.diverging = true;
    d.colorbar_label = "Δ share";
    s += figure(render_heatmap(d));
  }
  return "<div class=\"row\">" + s + "</div>";
}

std::string domain_affinity_figures(const json& arm, size_t l) {
  const json& r = report_of(arm);
  if (!r.contains("domain_affinity") || !r["domain_affinity"].contains("inference") ||
      l >= r["domain_affinity"]["inference"].size())
    return "";
  const json& aj = r["domain_affinity"]["inference"][l];
  const auto names = aj.value("datasets", std::vector<std::string>{});
  const auto after = matrix(aj["share"]);
  const bool cmp = aj.contains("compare_share");
  const auto before = cmp ? matrix(aj["compare_share"]) : std::vector<std::vector<double>>{};
  const size_t E = after.size(), D = names.size();
  Heatmap h;
  h.title = "Domain affinity, " + layer_name(arm, l) + (cmp ? ": " + before_label(arm) + " | after CPT" : "");
  h.x_label = "data set whose tokens make up the expert's load";
  h.y_label = "expert";
  h.row_labels = expert_labels(E);
  for (int side = cmp ? 0 : 1; side < 2; ++side)
    for (const auto& n : names) h.col_labels.push_back((cmp ? (side == 0 ? "PT " : "CPT ") : "") + n);
  for (size_t e = 0; e < E; ++e) {
    std::vector<double> row;
    if (cmp)
      for (size_t d = 0; d < D; ++d) row.push_back(e < before.size() && d < before[e].size() ? before[e][d] : kNaN);
    for (size_t d = 0; d < D; ++d) row.push_back(d < after[e].size() ? after[e][d] : kNaN);
    h.values.push_back(std::move(row));
  }
  h.vmin = 0;
  h.vmax = 1;
  h.annotate = true;
  h.decimals = 2;
  h.colorbar_label = "share of load";
  h.width = std::max(260.0, 70.0 + 40.0 * double(h.col_labels.size()) + 72);
  h.height = std::max(200.0, 15.0 * double(E) + 76);
  std::string s = figure(render_heatmap(h));
  if (cmp) {
    Heatmap d;
    d.title = "Domain affinity change, " + layer_name(arm, l);
    d.x_label = "data set";
    d.y_label = "expert";
    d.row_labels = h.row_labels;
    d.col_labels = names;
    for (size_t e = 0; e < E; ++e) {
      std::vector<double> row;
      for (size_t k = 0; k < D; ++k)
        row.push_back(e < before.size() && k < before[e].size() && k < after[e].size() ? after[e][k] - before[e][k] : kNaN);
      d.values.push_back(std::move(row));
    }
    d.diverging = true;
    d.annotate = true;
    d.decimals = 2;
    d.colorbar_label = "Δ share";
    d.width = std::max(220.0, 70.0 + 44.0 * double(D) + 72);
    d.height = h.height;
    s += figure(render_heatmap(d));
  }
  return "<div class=\"row\">" + s + "</div>";
}

namespace {

// Experts whose share of load from `ds` grew by at least `min_gain` (normalised shares).
std::string took_over_text(const json& arm, const std::string& ds, double min_gain) {
  const json& r = report_of(arm);
  if (!r.contains("domain_affinity") || !r["domain_affinity"].contains("inference")) return "";
  std::string out;
  for (const auto& aj : r["domain_affinity"]["inference"]) {
    if (!aj.contains("compare_share")) return "";
    const auto names = aj.value("datasets", std::vector<std::string>{});
    const auto it = std::find(names.begin(), names.end(), ds);
    if (it == names.end()) return "";
    const size_t d = size_t(it - names.begin());
    const auto after = matrix(aj["share"]), before = matrix(aj["compare_share"]);
    std::vector<std::pair<double, size_t>> gains;
    for (size_t e = 0; e < after.size() && e < before.size(); ++e)
      if (after[e][d] - before[e][d] >= min_gain) gains.push_back({after[e][d] - before[e][d], e});
    std::sort(gains.rbegin(), gains.rend());
    std::string part;
    for (const auto& [g, e] : gains)
      part += (part.empty() ? "" : ", ") + std::string("e") + std::to_string(e) + " " + f3(before[e][d]) + "→" +
              f3(after[e][d]);
    out += "<li>layer " + std::to_string(aj.value("layer", 0)) + ": " + (part.empty() ? "none" : xml_escape(part)) + "</li>";
  }
  return out;
}

}  // namespace

std::string specialisation_html(const json& arm, const std::string& old_ds, const std::string& new_ds) {
  const json& r = report_of(arm);
  const size_t L = n_layers(arm);
  const bool cmp = has_compare(arm);
  std::vector<std::string> sets;
  for (const auto& d : {old_ds, new_ds})
    if (!d.empty() && layer_of(arm, "inference", d, 0) && std::find(sets.begin(), sets.end(), d) == sets.end())
      sets.push_back(d);
  if (sets.empty() || L == 0) return "";
  auto spec = [&](const json* lj, bool before) {
    if (!lj) return kNaN;
    const json& src = before ? (lj->contains("compare") ? (*lj)["compare"] : json()) : *lj;
    return src.is_object() && src.contains("specialisation") ? d_of(src["specialisation"], "mean") : kNaN;
  };
  BarChart b;
  b.title = "Vocabulary specialisation per layer";
  b.y_label = "share of a token id's uses on its favourite expert";
  b.width = 480;
  b.height = 290;
  for (size_t l = 0; l < L; ++l) b.categories.push_back(layer_name(arm, l));
  const char* colours[] = {"#999", "#0072B2", "#E69F00", "#D55E00"};
  size_t ci = 0;
  for (const auto& d : sets)
    for (int before = cmp ? 1 : 0; before >= 0; --before) {
      BarSeries s;
      s.name = (cmp ? std::string(before ? before_label(arm) : "after CPT") + ", " : "") + d;
      s.color = colours[ci++ % 4];
      for (size_t l = 0; l < L; ++l) s.values.push_back(spec(layer_of(arm, "inference", d, l), before));
      b.series.push_back(std::move(s));
    }
  const double kE = d_of(r, "balanced_mri");
  if (std::isfinite(kE)) b.hlines.push_back({kE, "k/E (token-blind routing)"});
  std::string h = "<div class=\"row\">" + figure(render_bar_chart(b), "Per MoE layer, over token ids seen at least " +
                                                                          std::to_string(r.value("min_occurrences", 0)) +
                                                                          " times: the occurrence-weighted mean share of "
                                                                          "an id's uses routed (in top-k) to its most "
                                                                          "frequent expert. 1 = each id always on one expert "
                                                                          "(k = 1); about k/E = routing ignores the token.");
  // Table of the numbers.
  h += "<div class=\"scroll\"><table><thead><tr><th>layer</th>";
  for (const auto& d : sets)
    h += cmp ? "<th>" + xml_escape(d) + " before</th><th>" + xml_escape(d) + " after</th><th>Δ</th><th>ids</th>"
             : "<th>" + xml_escape(d) + "</th><th>ids</th>";
  h += "</tr></thead><tbody>";
  for (size_t l = 0; l < L; ++l) {
    h += "<tr><td>" + xml_escape(layer_name(arm, l)) + "</td>";
    for (const auto& d : sets) {
      const json* lj = layer_of(arm, "inference", d, l);
      const double a = spec(lj, false), bf = spec(lj, true);
      const std::string ids = lj && lj->contains("specialisation") ? std::to_string((*lj)["specialisation"].value("token_ids", 0)) : "–";
      if (cmp)
        h += "<td class=\"n\">" + f3(bf) + "</td><td class=\"n\">" + f3(a) + "</td><td class=\"n\">" + signed3(a - bf) +
             "</td><td class=\"n\">" + ids + "</td>";
      else
        h += "<td class=\"n\">" + f3(a) + "</td><td class=\"n\">" + ids + "</td>";
    }
    h += "</tr>";
  }
  h += "</tbody></table></div></div>";
  if (!cmp) return h;
  // The tokens whose favourite expert changed most, per data set and layer.
  for (const auto& d : sets) {
    std::string rows;
    for (size_t l = 0; l < L; ++l) {
      const json* lj = layer_of(arm, "inference", d, l);
      if (!lj || !lj->contains("compare")) continue;
      size_t n = 0;
      for (const auto& t : (*lj)["compare"].value("top_changed_tokens", json::array())) {
        if (n++ == 8) break;
        const std::string text = t.contains("text") && t["text"].is_string() ? t["text"].get<std::string>() : "";
        rows += "<tr><td>" + xml_escape(layer_name(arm, l)) + "</td><td><code>" +
                (text.empty() ? "#" + std::to_string(t.value("token_id", 0)) : visible_token(text)) +
                "</code></td><td class=\"n\">" + std::to_string(t.value("occurrences", 0)) + "</td><td class=\"n\">e" +
                std::to_string(t.value("expert_before", 0)) + " → e" + std::to_string(t.value("expert_after", 0)) +
                "</td><td class=\"n\">" + f3(d_of(t, "share_before")) + " → " + f3(d_of(t, "share_before_after")) +
                "</td><td class=\"n\">" + f3(d_of(t, "share_after")) + "</td></tr>";
      }
    }
    h += "<details" + std::string(d == old_ds ? " open" : "") + "><summary>Tokens whose favourite expert changed most on " +
         xml_escape(d) + " (" + xml_escape(before_label(arm)) + " → after CPT)</summary>";
    if (rows.empty())
      h += "<p class=\"note\">No token id (seen often enough) changed its favourite expert.</p>";
    else
      h += "<div class=\"scroll\"><table><thead><tr><th>layer</th><th>token</th><th>uses</th><th>favourite expert</th>"
           "<th>share on the old favourite (before → after)</th><th>share on the new favourite</th></tr></thead><tbody>" +
           rows + "</tbody></table></div>";
    h += "</details>";
  }
  return h;
}

std::string sinkhorn_modes_html(const json& arm) {
  const json& r = report_of(arm);
  if (!r.contains("mode_gap") || !r.contains("routing") || !r["routing"].contains("training")) return "";
  const double kE = d_of(r, "balanced_mri");
  BarChart b;
  b.title = "Sinkhorn model: MRI in both routing modes";
  b.y_label = "MRI (largest share of tokens on one expert)";
  b.width = 520;
  b.height = 290;
  BarSeries inf{"inference mode (top-k of raw scores)", {}, "#D55E00"}, tr{"training mode (Sinkhorn-balanced)", {}, "#0072B2"};
  std::string rows;
  for (const auto& [ds, layers] : r["mode_gap"].items()) {
    for (size_t l = 0; l < layers.size(); ++l) {
      const json& g = layers[l];
      const json* li = layer_of(arm, "inference", ds, l);
      const json* lt = layer_of(arm, "training", ds, l);
      b.categories.push_back(ds + " L" + std::to_string(g.value("layer", 0)));
      inf.values.push_back(d_of(g, "mri_inference"));
      tr.values.push_back(d_of(g, "mri_training"));
      auto dead = [](const json* lj) {
        return lj && lj->contains("dead_experts") ? std::to_string((*lj)["dead_experts"].size()) : std::string("–");
      };
      auto spec = [](const json* lj) {
        return lj && lj->contains("specialisation") ? f3(d_of((*lj)["specialisation"], "mean")) : std::string("–");
      };
      auto ent = [](const json* lj) { return lj ? f3(d_of(*lj, "entropy")) : std::string("–"); };
      const json sk = lt && lt->contains("sinkhorn") ? (*lt)["sinkhorn"] : json::object();
      rows += "<tr><td>" + xml_escape(ds) + "</td><td>" + std::to_string(g.value("layer", 0)) + "</td><td class=\"n\">" +
              f3(d_of(g, "mri_inference")) + "</td><td class=\"n\">" + f3(d_of(g, "mri_training")) + "</td><td class=\"n\">" +
              signed3(d_of(g, "mri_inference") - d_of(g, "mri_training")) + "</td><td class=\"n\">" + f3(kE) +
              "</td><td class=\"n\">" + f3(d_of(g, "overlap")) + "</td><td class=\"n\">" + f3(d_of(g, "changed_share")) +
              "</td><td class=\"n\">" + dead(li) + " / " + dead(lt) + "</td><td class=\"n\">" + spec(li) + " / " + spec(lt) +
              "</td><td class=\"n\">" + ent(li) + "</td><td class=\"n\">" + fmt_fixed(d_of(sk, "iters_mean"), 1) + " / " +
              fmt_fixed(d_of(sk, "iters_max"), 0) + "</td><td class=\"n\">" + fmt_fixed(d_of(sk, "error_mean"), 4) + " / " +
              fmt_fixed(d_of(sk, "error_max"), 4) + "</td></tr>";
    }
  }
  b.series = {inf, tr};
  if (std::isfinite(kE)) b.hlines.push_back({kE, "balanced k/E"});
  b.value_decimals = 2;
  return "<div class=\"row\">" +
         figure(render_bar_chart(b), "The same router inputs, two choice rules: what a serving system sees (inference) "
                                     "vs the balanced choice training used (Sinkhorn over one batch of " +
                                         std::to_string(r.value("batch_size", 0) * r.value("seq_len", 0)) + " tokens).") +
         "<div class=\"scroll\"><table><thead><tr><th>data</th><th>layer</th><th>MRI inference</th><th>MRI training</th>"
         "<th>gap</th><th>k/E</th><th>overlap of the two choices</th><th>tokens whose choice differs</th>"
         "<th>dead experts inf / train</th><th>specialisation inf / train</th><th>router entropy</th>"
         "<th>Sinkhorn iters mean / max</th><th>final error mean / max</th></tr></thead><tbody>" +
         rows + "</tbody></table></div></div>";
}

std::string convergence_figures(const json& c) {
  const auto steps = c.value("step", std::vector<double>{});
  if (steps.empty()) return "";
  const std::string name = s_of(c, "name");
  auto plot = [&](const char* key, const std::string& title, const std::string& ylabel) {
    LinePlot p;
    p.title = title;
    p.x_label = "training step";
    p.y_label = ylabel;
    p.width = 400;
    p.height = 260;
    const json& rows = c[key];
    size_t L = 0;
    for (const auto& row : rows) L = std::max(L, row.size());
    for (size_t l = 0; l < L; ++l) {
      Series s;
      s.name = "MoE layer " + std::to_string(l);
      s.markers = steps.size() < 40;
      for (size_t i = 0; i < steps.size() && i < rows.size(); ++i) {
        s.x.push_back(steps[i]);
        s.y.push_back(l < rows[i].size() && rows[i][l].is_number() ? rows[i][l].get<double>() : kNaN);
      }
      p.series.push_back(std::move(s));
    }
    p.y_min = 0;
    return p;
  };
  LinePlot it = plot("iters", name + ": Sinkhorn iterations used", "iterations (last micro-batch)");
  if (std::isfinite(d_of(c, "max_iters"))) it.hlines.push_back({d_of(c, "max_iters"), "cap"});
  LinePlot er = plot("error", name + ": final Sinkhorn error", "mean |d1 − d1_prev| at the stop");
  if (std::isfinite(d_of(c, "tol"))) er.hlines.push_back({d_of(c, "tol"), "tol"});
  LinePlot mr = plot("mri", name + ": MRI of the balanced choice", "training-mode MRI");
  if (std::isfinite(d_of(c, "mri_ideal"))) mr.hlines.push_back({d_of(c, "mri_ideal"), "k/E"});
  return "<div class=\"row\">" + figure(render_line_plot(it)) + figure(render_line_plot(er)) +
         figure(render_line_plot(mr)) + "</div>";
}

namespace {

std::string arm_title(const json& arm) {
  std::string t = s_of(arm, "name") + " — " + s_of(arm, "model") + ", router " + s_of(arm, "router");
  if (has_compare(arm)) t += ", compared with " + before_label(arm) + " checkpoint";
  return xml_escape(t);
}

std::string arm_block(const json& arm, const std::string& old_ds, const std::string& new_ds) {
  const auto sets = datasets_of(arm);
  const std::string focus = std::find(sets.begin(), sets.end(), new_ds) != sets.end() ? new_ds
                            : sets.empty()                                            ? old_ds
                                                                                      : sets.front();
  const size_t L = n_layers(arm), lf = most_changed_layer(arm, focus);
  const bool cmp = has_compare(arm);
  std::string h = "<h3>" + arm_title(arm) + "</h3>";
  h += "<p class=\"note\"><b>Expert co-activation</b> (row i: share of the tokens routed to expert i that also go to "
       "expert j; the diagonal, 1 by definition, is grey) on held-out " +
       xml_escape(focus) + " tokens, " + xml_escape(layer_name(arm, lf)) +
       (cmp ? " (the layer whose co-activation changed most)" : "") + ".</p>";
  h += coactivation_figures(arm, focus, lf);
  std::string more;  // the other layers: the change only (a 15×15 heatmap is ~30 kB of SVG)
  for (size_t l = 0; l < L; ++l)
    if (l != lf) more += coactivation_figures(arm, focus, l, /*change_only=*/true);
  if (!more.empty())
    h += "<details><summary>co-activation " + std::string(cmp ? "change" : "") + " in the other layers (" +
         xml_escape(focus) + ")</summary>" + more + "</details>";
  h += "<p class=\"note\"><b>Domain affinity</b>: per expert, the share of its load coming from each data set (each data "
       "set's loads normalised first, as if all had the same number of tokens).";
  if (cmp) {
    const std::string t = took_over_text(arm, new_ds, 0.1);
    if (!t.empty())
      h += " Experts the new domain (" + xml_escape(new_ds) + ") took over (its share up by ≥ 0.1):</p><ul class=\"note\">" +
           t + "</ul>";
    else
      h += "</p>";
  } else {
    h += "</p>";
  }
  h += domain_affinity_figures(arm, lf);
  std::string aff_more;
  for (size_t l = 0; l < L; ++l)
    if (l != lf) aff_more += domain_affinity_figures(arm, l);
  if (!aff_more.empty()) h += "<details><summary>domain affinity of the other layers</summary>" + aff_more + "</details>";
  h += "<p class=\"note\"><b>Vocabulary specialisation</b>.</p>" + specialisation_html(arm, old_ds, new_ds);
  const std::string sk = sinkhorn_modes_html(arm);
  if (!sk.empty()) h += "<p class=\"note\"><b>Sinkhorn: inference mode vs training mode</b>.</p>" + sk;
  return h;
}

}  // namespace

std::string render_routing_section(const StudyResults& r) {
  std::string h = "<h2 id=\"routing\">7. What CPT did to the experts: routing diagnostics</h2>";
  if (!r.analysis.is_object() || !r.analysis.contains("routing") || !r.analysis["routing"].is_object())
    return h + "<p class=\"verdict na\">No routing diagnostics in this study's results (run <code>moecpt study</code> "
               "without --no-analyses).</p>";
  const json& g = r.analysis["routing"];
  const std::string old_ds = s_of(g, "old").empty() ? s_of(r.study, "old") : s_of(g, "old");
  const std::string new_ds = s_of(g, "new").empty() ? s_of(r.study, "new") : s_of(g, "new");
  const std::string main = s_of(g, "main_variant");
  const json arms = g.value("arms", json::array());
  char meta[256];
  std::snprintf(meta, sizeof meta, "%lld held-out tokens per data set and checkpoint, inference-mode routing; %.0f s.",
                (long long)g.value("tokens_per_dataset", int64_t(0)), d_of(g, "seconds"));
  h += "<p class=\"note\"><code>moecpt analyze routing</code> on the final checkpoint of every MoE CPT arm, compared "
       "with the checkpoint it started from (docs/analysis.md): " +
       std::string(meta) + "</p>";
  if (arms.empty()) h += "<p class=\"verdict na\">No MoE checkpoint was analysed.</p>";
  // Summary table.
  if (!arms.empty()) {
    h += "<div class=\"scroll\"><table><thead><tr><th>arm</th><th>router</th><th>data</th><th>loss before → after</th>"
         "<th>MRI before → after (mean over layers)</th><th>overlap with before</th><th>tokens whose experts changed</th>"
         "<th>specialisation before → after</th></tr></thead><tbody>";
    for (const auto& a : arms) {
      const json& rep = report_of(a);
      for (const auto& d : datasets_of(a)) {
        const json ds = rep.contains("datasets") && rep["datasets"].contains(d) ? rep["datasets"][d] : json::object();
        auto cmpv = [](const char* k) {
          return [k](const json& lj) { return lj.contains("compare") ? d_of(lj["compare"], k) : kNaN; };
        };
        h += "<tr><td>" + xml_escape(s_of(a, "name")) + "</td><td>" + xml_escape(s_of(a, "router")) + "</td><td>" +
             xml_escape(d) + "</td><td class=\"n\">" + f3(d_of(ds, "compare_loss")) + " → " + f3(d_of(ds, "loss")) +
             "</td><td class=\"n\">" + layer_mean(a, d, cmpv("mri")) + " → " +
             layer_mean(a, d, [](const json& lj) { return d_of(lj, "mri"); }) + "</td><td class=\"n\">" +
             layer_mean(a, d, cmpv("overlap")) + "</td><td class=\"n\">" + layer_mean(a, d, cmpv("changed_share")) +
             "</td><td class=\"n\">" +
             layer_mean(a, d,
                        [](const json& lj) {
                          return lj.contains("compare") && lj["compare"].contains("specialisation")
                                     ? d_of(lj["compare"]["specialisation"], "mean")
                                     : kNaN;
                        }) +
             " → " +
             layer_mean(a, d,
                        [](const json& lj) {
                          return lj.contains("specialisation") ? d_of(lj["specialisation"], "mean") : kNaN;
                        }) +
             "</td></tr>";
      }
    }
    h += "</tbody></table></div>";
  }
  for (const auto& a : arms) {
    const bool open = s_of(a, "kind") != "cpt" || s_of(a, "variant") == main || main.empty();
    if (open)
      h += arm_block(a, old_ds, new_ds);
    else
      h += "<details><summary>" + arm_title(a) + "</summary>" + arm_block(a, old_ds, new_ds) + "</details>";
  }
  const json conv = g.value("convergence", json::array());
  if (!conv.empty()) {
    h += "<h3>Sinkhorn convergence in training</h3><p class=\"note\">From each Sinkhorn arm's training metrics (every "
         "log_every steps, the last micro-batch): iterations the balancing used per MoE layer, its final error (it stops "
         "below tol or at the cap), and the MRI of the balanced choice against its ideal k/E.</p>";
    for (const auto& c : conv) {
      const bool open = s_of(c, "kind") == "pt" || s_of(c, "variant") == main || main.empty();
      h += open ? convergence_figures(c)
                : "<details><summary>" + xml_escape(s_of(c, "name")) + "</summary>" + convergence_figures(c) + "</details>";
    }
  }
  return h;
}

}  // namespace moecpt::report
