#include "report/report.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <set>

#include "report/report_routing.h"
#include "report/svg.h"

namespace moecpt::report {
using nlohmann::json;

namespace {

// --- reading the results ---------------------------------------------------------

std::string s_of(const json& j, const char* k) { return j.contains(k) && j[k].is_string() ? j[k].get<std::string>() : ""; }
double d_of(const json& j, const char* k) { return j.contains(k) && j[k].is_number() ? j[k].get<double>() : kNaN; }

double loss(const json* arm, const char* which, const std::string& ds) {
  if (!arm || !(*arm).contains(which) || !(*arm)[which].contains(ds)) return kNaN;
  return d_of((*arm)[which][ds], "loss");
}
std::vector<double> mri_layers(const json* arm, const char* which, const std::string& ds) {
  if (!arm || !(*arm).contains(which) || !(*arm)[which].contains(ds)) return {};
  return (*arm)[which][ds].value("mri", std::vector<double>{});
}
double mean(const std::vector<double>& v) {
  double s = 0;
  int n = 0;
  for (double x : v)
    if (std::isfinite(x)) s += x, ++n;
  return n ? s / n : kNaN;
}
double balanced(const json& arm) {
  const double E = d_of(arm, "n_experts"), k = d_of(arm, "top_k");
  return E > 0 ? k / E : kNaN;
}

std::string pretty_model(const std::string& m) {
  static const std::map<std::string, std::string> names = {{"dense", "Dense"},
                                                           {"switch-aux", "Switch Z+Aux"},
                                                           {"switch-sinkhorn", "Switch Sinkhorn"},
                                                           {"granular-aux", "Granular Z+Aux"},
                                                           {"granular-sinkhorn", "Granular Sinkhorn"}};
  auto it = names.find(m);
  return it == names.end() ? m : it->second;
}

struct View {
  const StudyResults& r;
  std::string old_ds, new_ds;
  std::vector<std::string> sets;
  double tie_nats, tie_mri, replay;
  std::vector<std::string> models;    // in recipe order (from the PT arms)
  std::vector<std::string> variants;  // CPT variants in order
  std::string main_variant;           // rewarm with the study's replay fraction

  explicit View(const StudyResults& res) : r(res) {
    old_ds = s_of(r.study, "old");
    new_ds = s_of(r.study, "new");
    sets = r.study.value("validation", std::vector<std::string>{});
    tie_nats = r.study.value("tie_nats", 0.02);
    tie_mri = r.study.value("tie_mri", 0.02);
    replay = r.study.value("replay_fraction", 0.0);
    for (const auto& a : r.arms) {
      if (s_of(a, "kind") == "pt") models.push_back(s_of(a, "model"));
      if (s_of(a, "kind") == "cpt" &&
          std::find(variants.begin(), variants.end(), s_of(a, "variant")) == variants.end())
        variants.push_back(s_of(a, "variant"));
    }
    for (const auto& v : variants) {
      const json* a = any_of_variant(v);
      if (a && s_of(*a, "schedule") == "rewarm" && std::abs(d_of(*a, "replay") - replay) < 1e-9) {
        main_variant = v;
        break;
      }
    }
    if (main_variant.empty() && !variants.empty()) main_variant = variants.front();
  }
  const json* any_of_variant(const std::string& v) const {
    for (const auto& a : r.arms)
      if (s_of(a, "kind") == "cpt" && s_of(a, "variant") == v) return &a;
    return nullptr;
  }
  const json* pt(const std::string& m) const { return r.arm("pt-" + m); }
  const json* cpt(const std::string& v, const std::string& m) const { return r.arm("cpt-" + v + "-" + m); }
  const json* full(const std::string& m) const { return r.arm("full-" + m); }
  bool is_moe(const std::string& m) const {
    const json* a = pt(m);
    return a && s_of(*a, "ffn") == "moe";
  }
  std::string colour(const std::string& m) const {
    static const std::map<std::string, std::string> fixed = {{"dense", "#222222"},
                                                             {"switch-aux", "#0072B2"},
                                                             {"switch-sinkhorn", "#56B4E9"},
                                                             {"granular-aux", "#D55E00"},
                                                             {"granular-sinkhorn", "#E69F00"}};
    auto it = fixed.find(m);
    if (it != fixed.end()) return it->second;
    const auto pos = std::find(models.begin(), models.end(), m) - models.begin();
    return palette(size_t(pos) + 2);
  }
  std::string variant_label(const std::string& v) const {
    const json* a = any_of_variant(v);
    if (!a) return v;
    char buf[96];
    std::snprintf(buf, sizeof buf, "%.0f %% replay, %s", 100 * d_of(*a, "replay"),
                  s_of(*a, "schedule") == "infinite" ? "infinite schedule" : "re-warm/re-decay");
    return buf;
  }
  double tokens_per_step(const json& a) const {
    const double s = d_of(a, "steps");
    return s > 0 ? d_of(a, "tokens") / s : kNaN;
  }
  // Tokens seen from scratch at the first step of this arm (CPT joins its PT parent's curve).
  double token_offset(const json& a) const {
    if (s_of(a, "kind") != "cpt") return 0;
    const json* p = r.arm(s_of(a, "parent"));
    return p ? d_of(a, "parent_step") * tokens_per_step(*p) : 0;
  }
};

std::string f3(double v) { return fmt_fixed(v, 3); }
std::string f2(double v) { return fmt_fixed(v, 2); }
// Appended, not "literal" + std::string&& (GCC 12's false -Wstringop-overflow, bug 105651).
std::string signed3(double v) { return std::string(std::isfinite(v) && v >= 0 ? "+" : "").append(fmt_fixed(v, 3)); }
std::string signed2(double v) { return std::string(std::isfinite(v) && v >= 0 ? "+" : "").append(fmt_fixed(v, 2)); }

// Moving average over `w` points (ignoring NaN), for noisy per-step MRI.
std::vector<double> smooth(const std::vector<double>& v, int w) {
  std::vector<double> out(v.size(), kNaN);
  for (size_t i = 0; i < v.size(); ++i) {
    double s = 0;
    int n = 0;
    for (int j = -w / 2; j <= w / 2; ++j) {
      const long k = long(i) + j;
      if (k >= 0 && k < long(v.size()) && std::isfinite(v[size_t(k)])) s += v[size_t(k)], ++n;
    }
    if (n) out[i] = s / n;
  }
  return out;
}

// Training-mode MRI of one layer (or, layer < 0, the worst layer) per step.
std::vector<double> train_mri(const json& curve, int layer) {
  std::vector<double> out;
  for (const auto& row : curve["train"]["mri"]) {
    if (!row.is_array() || row.empty()) {
      out.push_back(kNaN);
      continue;
    }
    if (layer < 0) {
      double m = 0;
      for (const auto& x : row) m = std::max(m, x.get<double>());
      out.push_back(m);
    } else {
      out.push_back(size_t(layer) < row.size() ? row[size_t(layer)].get<double>() : kNaN);
    }
  }
  return out;
}
std::vector<double> as_vec(const json& a) {
  std::vector<double> v;
  for (const auto& x : a) v.push_back(x.is_number() ? x.get<double>() : kNaN);
  return v;
}

// Shift statistics of a CPT arm's worst-layer training MRI (5-step average):
// before = mean over the parent's last 10 % of steps; peak = max over the first
// 20 % of CPT steps; end = mean over the last 10 % of CPT steps.
struct Spike {
  double before = kNaN, peak = kNaN, end = kNaN;
  double rise() const { return peak - before; }
};
Spike shift_stats(const View& v, const json& arm) {
  Spike s;
  const std::string parent = s_of(arm, "parent");
  if (!v.r.curves.contains(parent) || !v.r.curves.contains(s_of(arm, "name"))) return s;
  const auto pm = smooth(train_mri(v.r.curves[parent], -1), 5);
  const auto cm = smooth(train_mri(v.r.curves[s_of(arm, "name")], -1), 5);
  const size_t pstep = size_t(std::max(0.0, d_of(arm, "parent_step")));
  const size_t pend = std::min(pm.size(), pstep > 0 ? pstep : pm.size());
  std::vector<double> tail(pm.begin() + long(pend - std::min(pend, std::max<size_t>(3, pend / 10))), pm.begin() + long(pend));
  s.before = mean(tail);
  const size_t head = std::max<size_t>(3, cm.size() / 5);
  for (size_t i = 0; i < std::min(head, cm.size()); ++i)
    if (std::isfinite(cm[i])) s.peak = std::isfinite(s.peak) ? std::max(s.peak, cm[i]) : cm[i];
  const size_t t = std::max<size_t>(3, cm.size() / 10);
  s.end = mean(std::vector<double>(cm.end() - long(std::min(t, cm.size())), cm.end()));
  return s;
}

// --- findings ------------------------------------------------------------------------

std::string list_join(const std::vector<std::string>& parts, const std::string& sep = ", ") {
  std::string s;
  for (size_t i = 0; i < parts.size(); ++i) s += (i ? sep : "") + parts[i];
  return s;
}

Finding finding_forgetting(const View& v) {
  Finding f{3, "Do MoEs forget more than FLOP-matched dense models?", "", true};
  const json* d = v.cpt(v.main_variant, "dense");
  if (!d) return {3, f.question, "Not measured: the study has no dense CPT arm.", false};
  const double fd = loss(d, "final_eval", v.old_ds) - loss(d, "initial_eval", v.old_ds);
  std::vector<std::string> parts;
  double worst = -INFINITY;
  std::string worst_m;
  for (const auto& m : v.models) {
    const json* a = v.cpt(v.main_variant, m);
    if (!a || !v.is_moe(m)) continue;
    const double fm = loss(a, "final_eval", v.old_ds) - loss(a, "initial_eval", v.old_ds);
    parts.push_back(pretty_model(m) + " " + signed3(fm));
    if (fm > worst) worst = fm, worst_m = m;
  }
  if (parts.empty()) return {3, f.question, "Not measured: the study has no MoE CPT arm.", false};
  const std::string nums = "forgetting on " + v.old_ds + " (Δ loss, nats) after CPT with " + v.variant_label(v.main_variant) +
                           ": " + list_join(parts) + "; Dense " + signed3(fd) + ".";
  if (worst <= v.tie_nats && fd <= v.tie_nats)
    f.verdict = "Not measurable at this scale: no arm forgot (" + v.old_ds + " loss fell or stayed within " +
                f2(v.tie_nats) + " nats during CPT: the models were still learning " + v.old_ds + " from the replay) — " + nums;
  else if (worst <= fd + v.tie_nats)
    f.verdict = "MoEs forgot no more than dense: " + nums;
  else
    f.verdict = "At this scale " + pretty_model(worst_m) + " forgot more than dense (by " + f3(worst - fd) +
                " nats, above the " + f2(v.tie_nats) + "-nat tie tolerance): " + nums;
  return f;
}

Finding finding_sample_efficiency(const View& v) {
  Finding f{4, "Do MoEs keep their sample-efficiency edge over dense during CPT?", "", true};
  const json* d = v.cpt(v.main_variant, "dense");
  if (!d) return {4, f.question, "Not measured: the study has no dense CPT arm.", false};
  const double ld = loss(d, "final_eval", v.new_ds), pd = loss(v.pt("dense"), "final_eval", v.old_ds);
  std::vector<std::string> parts;
  int better = 0, n = 0, pt_better = 0;
  for (const auto& m : v.models) {
    const json* a = v.cpt(v.main_variant, m);
    if (!a || !v.is_moe(m)) continue;
    const double lm = loss(a, "final_eval", v.new_ds);
    parts.push_back(pretty_model(m) + " " + f3(lm));
    ++n;
    better += lm < ld - v.tie_nats;
    pt_better += loss(v.pt(m), "final_eval", v.old_ds) < pd - v.tie_nats;
  }
  if (!n) return {4, f.question, "Not measured: the study has no MoE CPT arm.", false};
  const std::string nums = v.new_ds + " loss after CPT: " + list_join(parts) + "; Dense " + f3(ld) + ".";
  if (better == n)
    f.verdict = "Yes: every MoE ends CPT below dense on " + v.new_ds + " — " + nums;
  else if (better == 0)
    f.verdict = "Not shown at this scale: no MoE beats dense on " + v.new_ds + " by more than " + f2(v.tie_nats) +
                " nats (" + std::to_string(pt_better) + "/" + std::to_string(n) + " beat it after PT on " + v.old_ds +
                ") — " + nums;
  else
    f.verdict = "Partly: " + std::to_string(better) + " of " + std::to_string(n) + " MoEs beat dense on " + v.new_ds +
                " by more than " + f2(v.tie_nats) + " nats — " + nums;
  return f;
}

Finding finding_spike(const View& v) {
  Finding f{1, "Is the router robust to the shift? (Sinkhorn vs Z+Aux MRI at the shift)", "", true};
  std::vector<std::string> parts;
  double aux_rise = -INFINITY, sk_rise = -INFINITY, aux_end = INFINITY, sk_end = -INFINITY;
  for (const auto& m : v.models) {
    const json* a = v.cpt(v.main_variant, m);
    if (!a || !v.is_moe(m)) continue;
    const Spike s = shift_stats(v, *a);
    const bool sk = s_of(*a, "router") == "sinkhorn";
    parts.push_back(pretty_model(m) + " " + f2(s.before) + "→" + f2(s.peak) + "→" + f2(s.end));
    if (sk) sk_rise = std::max(sk_rise, s.rise()), sk_end = std::max(sk_end, s.end - balanced(*a));
    else aux_rise = std::max(aux_rise, s.rise()), aux_end = std::min(aux_end, s.end - balanced(*a));
  }
  if (parts.empty() || !std::isfinite(aux_rise) || !std::isfinite(sk_rise))
    return {1, f.question, "Not measured: needs CPT arms of both a Z+Aux and a Sinkhorn model.", false};
  const std::string nums = "worst-layer training MRI before → peak after the shift → end of CPT: " + list_join(parts) + ".";
  std::string v1;
  if (aux_rise > sk_rise + v.tie_mri)
    v1 = "Z+Aux routers spike at the shift (up to +" + f2(aux_rise) + " MRI), Sinkhorn stays flat (+" +
         f2(std::max(0.0, sk_rise)) + ")";
  else
    v1 = "No Z+Aux spike beyond Sinkhorn's at this scale (MRI rise " + signed2(aux_rise) + " vs " + signed2(sk_rise) + ")";
  const std::string v2 = aux_end < sk_end - v.tie_mri ? "; Z+Aux ends CPT closer to balance than Sinkhorn"
                                                      : "; Z+Aux does not end closer to balance than Sinkhorn";
  // Decayed (re-warm) vs non-decayed (infinite) start, same model.
  std::string v3;
  for (const auto& var : v.variants) {
    const json* inf = v.any_of_variant(var);
    if (!inf || s_of(*inf, "schedule") != "infinite") continue;
    for (const auto& m : v.models) {
      const json* ai = v.cpt(var, m);
      const json* ar = v.cpt(v.main_variant, m);
      if (!ai || !ar || !v.is_moe(m) || s_of(*ai, "router") == "sinkhorn") continue;
      const double ri = shift_stats(v, *ai).rise(), rr = shift_stats(v, *ar).rise();
      v3 = "; " + pretty_model(m) + " spikes " + (rr > ri + v.tie_mri ? "more" : rr < ri - v.tie_mri ? "less" : "about as much") +
           " from the decayed checkpoint (" + signed2(rr) + ") than from the pre-anneal one (" + signed2(ri) + ")";
      break;
    }
    break;
  }
  f.verdict = v1 + v2 + v3 + ". " + nums;
  return f;
}

Finding finding_balance(const View& v) {
  Finding f{2, "Is balance on old data after CPT as good as after full re-training?", "", true};
  for (const auto& m : v.models) {
    const json* full = v.full(m);
    if (!full || !v.is_moe(m)) continue;
    const double fm = mean(mri_layers(full, "final_eval", v.old_ds));
    std::vector<std::string> parts;
    bool all_ok = true, any = false, r0_ok = false, has_r0 = false;
    for (const auto& var : v.variants) {
      const json* a = v.cpt(var, m);
      if (!a) continue;
      const double cm = mean(mri_layers(a, "final_eval", v.old_ds));
      any = true;
      const bool ok = cm <= fm + v.tie_mri;
      all_ok &= ok;
      if (d_of(*a, "replay") == 0) has_r0 = true, r0_ok = ok;
      parts.push_back(v.variant_label(var) + " " + f3(cm));
    }
    if (!any) continue;
    const std::string nums = "mean inference-mode MRI on " + v.old_ds + " of " + pretty_model(m) + " after CPT: " +
                             list_join(parts) + "; full re-training " + f3(fm) + " (balanced = " + f3(balanced(*full)) + ").";
    if (all_ok)
      f.verdict = std::string("Yes") + (has_r0 && r0_ok ? ", even without replay" : "") + ": " + nums;
    else
      f.verdict = "Not everywhere at this scale (a CPT arm is more than " + f2(v.tie_mri) +
                  " MRI less balanced than full re-training): " + nums;
    return f;
  }
  return {2, f.question, "Not measured: needs a full re-training arm of an MoE model.", false};
}

Finding finding_replay(const View& v) {
  Finding f{5, "Are replay and re-warming (or the infinite schedule) enough to match full re-training?", "", true};
  for (const auto& m : v.models) {
    const json* full = v.full(m);
    if (!full) continue;
    std::vector<std::string> parts;
    double best_gap = INFINITY;
    std::string best;
    for (const auto& var : v.variants) {
      const json* a = v.cpt(var, m);
      if (!a) continue;
      const double go = loss(a, "final_eval", v.old_ds) - loss(full, "final_eval", v.old_ds);
      const double gn = loss(a, "final_eval", v.new_ds) - loss(full, "final_eval", v.new_ds);
      const double ratio = d_of(*a, "train_flops") / d_of(*full, "train_flops");
      parts.push_back(v.variant_label(var) + ": " + signed3(go) + " on " + v.old_ds + ", " + signed3(gn) + " on " +
                      v.new_ds + " at " + fmt_fixed(100 * ratio, 0) + " % of the compute");
      if (d_of(*a, "replay") > 0 && std::max(go, gn) < best_gap) best_gap = std::max(go, gn), best = var;
    }
    if (parts.empty()) continue;
    const std::string nums = "gap of " + pretty_model(m) + " CPT to full re-training (loss, nats) — " + list_join(parts, "; ") + ".";
    if (best.empty())
      f.verdict = "Not measured with replay: " + nums;
    else if (best_gap <= v.tie_nats)
      f.verdict = "Yes: with " + v.variant_label(best) + " CPT matches full re-training within " + f2(v.tie_nats) +
                  " nats on both data sets — " + nums;
    else if (best_gap <= 5 * v.tie_nats)
      f.verdict = "Close: the best replay arm (" + v.variant_label(best) + ") is within " + f3(best_gap) +
                  " nats of full re-training — " + nums;
    else
      f.verdict = "Not at this scale: the best replay arm (" + v.variant_label(best) + ") stays " + f3(best_gap) +
                  " nats behind full re-training — " + nums;
    return f;
  }
  return {5, f.question, "Not measured: the study has no full re-training arm.", false};
}

// Overlap of the PT routing (first checkpoint) with the final CPT routing, per layer.
std::vector<double> start_overlap(const View& v, const std::string& arm, const std::string& ds) {
  const auto& s = v.r.analysis.value("saturation", json::object());
  if (!s.contains(arm) || !s[arm]["overlap"].contains(ds) || s[arm]["overlap"][ds].empty()) return {};
  return as_vec(s[arm]["overlap"][ds][0]);
}

Finding finding_saturation(const View& v) {
  Finding f{6, "Which layers' routing changes most, and does no replay change it most?", "", true};
  const json* a = nullptr;
  std::string model;
  for (const auto& m : v.models)
    if (v.is_moe(m) && (a = v.cpt(v.main_variant, m))) {
      model = m;
      if (!start_overlap(v, s_of(*a, "name"), v.old_ds).empty()) break;
    }
  if (!a) return {6, f.question, "Not measured: no MoE CPT arm.", false};
  const auto ov = start_overlap(v, s_of(*a, "name"), v.old_ds);
  if (ov.empty()) return {6, f.question, "Not measured: the routing analyses (analysis.json) were not run.", false};
  size_t lo = 0, hi = 0;
  for (size_t l = 0; l < ov.size(); ++l) {
    if (ov[l] < ov[lo]) lo = l;
    if (ov[l] > ov[hi]) hi = l;
  }
  std::vector<std::string> per;
  for (size_t l = 0; l < ov.size(); ++l) per.push_back("L" + std::to_string(l) + " " + f2(ov[l]));
  f.verdict = "Routing of " + pretty_model(model) + " changed most in layer " + std::to_string(lo) + " and least in layer " +
              std::to_string(hi) + " (overlap of PT and final CPT routing on " + v.old_ds + ": " + list_join(per) + ")";
  // No replay vs replay, same model.
  for (const auto& var : v.variants) {
    const json* z = v.cpt(var, model);
    if (!z || d_of(*z, "replay") != 0 || var == v.main_variant) continue;
    const double oz = mean(start_overlap(v, s_of(*z, "name"), v.old_ds)), om = mean(ov);
    const double fz = loss(z, "final_eval", v.old_ds) - loss(z, "initial_eval", v.old_ds);
    const double fm = loss(a, "final_eval", v.old_ds) - loss(a, "initial_eval", v.old_ds);
    f.verdict += std::string("; no replay ") + (oz < om - 0.01 ? "changed routing more" : "did not change routing more") +
                 " (mean overlap " + f3(oz) + " vs " + f3(om) + ") and " +
                 (fz > fm + v.tie_nats ? "forgot more" : "did not forget clearly more") + " (" + signed3(fz) + " vs " +
                 signed3(fm) + " nats on " + v.old_ds + ")";
    break;
  }
  f.verdict += ".";
  return f;
}

Finding finding_architecture(const View& v) {
  Finding f{7, "Granular vs Switch at equal FLOPs; Z+Aux vs Sinkhorn on loss", "", true};
  auto l = [&](const std::string& m) { return loss(v.cpt(v.main_variant, m), "final_eval", v.new_ds); };
  auto lp = [&](const std::string& m) { return loss(v.pt(m), "final_eval", v.old_ds); };
  std::vector<std::string> parts;
  int g_wins = 0, g_n = 0, a_wins = 0, a_n = 0;
  for (const char* r : {"aux", "sinkhorn"}) {
    const std::string g = std::string("granular-") + r, s = std::string("switch-") + r;
    if (!v.pt(g) || !v.pt(s)) continue;
    ++g_n;
    g_wins += lp(g) < lp(s) - v.tie_nats;
    parts.push_back(pretty_model(g) + " " + f3(lp(g)) + " vs " + pretty_model(s) + " " + f3(lp(s)) + " (PT, " + v.old_ds + ")");
  }
  for (const char* a : {"granular", "switch"}) {
    const std::string x = std::string(a) + "-aux", y = std::string(a) + "-sinkhorn";
    if (!v.cpt(v.main_variant, x) || !v.cpt(v.main_variant, y)) continue;
    ++a_n;
    a_wins += l(x) < l(y) - v.tie_nats;
    parts.push_back(pretty_model(x) + " " + f3(l(x)) + " vs " + pretty_model(y) + " " + f3(l(y)) + " (after CPT, " + v.new_ds + ")");
  }
  if (!g_n && !a_n) return {7, f.question, "Not measured: needs Switch and Granular (or Z+Aux and Sinkhorn) arms.", false};
  std::string a1 = g_n == 0 ? "" : g_wins == g_n ? "Granular beats Switch" : g_wins == 0 ? "Granular does not beat Switch at this scale" : "Granular beats Switch for one router only";
  std::string a2 = a_n == 0 ? "" : a_wins == a_n ? "Z+Aux beats Sinkhorn" : a_wins == 0 ? "Z+Aux does not beat Sinkhorn at this scale" : "Z+Aux beats Sinkhorn for one model only";
  f.verdict = a1 + (a1.empty() || a2.empty() ? "" : "; ") + a2 + " (by more than " + f2(v.tie_nats) + " nats): " + list_join(parts, "; ") + ".";
  return f;
}

// --- plots -----------------------------------------------------------------------------

std::string figure(const std::string& svg, const std::string& caption) {
  return "<figure>" + svg + (caption.empty() ? "" : "<figcaption>" + xml_escape(caption) + "</figcaption>") + "</figure>";
}

// Validation loss on one data set across PT→CPT for the arms given.
std::string loss_curves(const View& v, const std::string& ds, const std::vector<std::pair<const json*, std::string>>& arms,
                        const std::string& title) {
  LinePlot p;
  p.title = title;
  p.x_label = "tokens seen from scratch (M)";
  p.y_label = "validation loss on " + ds + " (nats/token)";
  p.width = 440;
  p.height = 290;
  double shift = kNaN;
  for (size_t i = 0; i < arms.size(); ++i) {
    const json& a = *arms[i].first;
    const std::string name = s_of(a, "name");
    if (!v.r.curves.contains(name)) continue;
    const auto& ev = v.r.curves[name]["eval"];
    if (!ev["sets"].contains(ds)) continue;
    Series s;
    s.name = arms[i].second;
    s.color = s_of(a, "kind") == "pt" ? "#999" : palette(i);
    const double off = v.token_offset(a), tps = v.tokens_per_step(a);
    for (size_t k = 0; k < ev["step"].size(); ++k) {
      s.x.push_back((off + ev["step"][k].get<double>() * tps) / 1e6);
      s.y.push_back(ev["sets"][ds]["loss"][k].get<double>());
    }
    s.markers = true;
    s.dashed = s_of(a, "kind") == "full";
    if (s_of(a, "kind") == "pt") shift = d_of(a, "tokens") / 1e6;
    p.series.push_back(std::move(s));
  }
  if (std::isfinite(shift)) p.vlines.push_back({shift, "end of PT"});
  return render_line_plot(p);
}

std::string mri_shift_plot(const View& v, const json& arm, const std::string& title) {
  LinePlot p;
  p.title = title;
  p.x_label = "step (0 = start of CPT)";
  p.y_label = "training-mode MRI (share of tokens)";
  p.width = 440;
  p.height = 270;
  const std::string parent = s_of(arm, "parent"), name = s_of(arm, "name");
  const int layers = int(d_of(arm, "n_layers"));
  const double pstep = d_of(arm, "parent_step");
  const double cpt_steps = d_of(arm, "steps");
  for (int l = 0; l < layers; ++l) {
    Series s;
    s.name = "layer " + std::to_string(l);
    s.width = 1.5;
    if (v.r.curves.contains(parent)) {
      const auto pm = smooth(train_mri(v.r.curves[parent], l), 5);
      const auto& steps = v.r.curves[parent]["train"]["step"];
      for (size_t i = 0; i < pm.size(); ++i) {
        const double st = steps[i].get<double>() - pstep;
        if (st > 0 || st < -cpt_steps * 0.6) continue;  // the PT steps just before the CPT start
        s.x.push_back(st);
        s.y.push_back(pm[i]);
      }
    }
    s.x.push_back(kNaN);
    s.y.push_back(kNaN);
    if (v.r.curves.contains(name)) {
      const auto cm = smooth(train_mri(v.r.curves[name], l), 5);
      const auto& steps = v.r.curves[name]["train"]["step"];
      for (size_t i = 0; i < cm.size(); ++i) {
        s.x.push_back(steps[i].get<double>());
        s.y.push_back(cm[i]);
      }
    }
    p.series.push_back(std::move(s));
  }
  p.vlines.push_back({0, "CPT starts"});
  p.hlines.push_back({balanced(arm), "balanced k/E"});
  p.y_min = 0;
  return render_line_plot(p);
}

std::string load_heatmap(const json& arm, const char* which, const std::string& ds, const std::string& title, double vmax) {
  Heatmap h;
  h.title = title;
  h.x_label = "expert";
  h.width = 300;
  h.height = 150;
  h.vmin = 0;
  h.vmax = vmax;
  h.colorbar_label = "load share";
  if (arm.contains(which) && arm[which].contains(ds))
    for (const auto& row : arm[which][ds].value("loads", json::array())) h.values.push_back(as_vec(row));
  for (size_t l = 0; l < h.values.size(); ++l) h.row_labels.push_back(std::string("L").append(std::to_string(l)));
  const size_t E = h.values.empty() ? 0 : h.values[0].size();
  for (size_t e = 0; e < E; ++e) h.col_labels.push_back(std::to_string(e));
  return render_heatmap(h);
}

// What the accuracy columns are: task files, items scored, chance level.
std::string task_note(const json& analysis) {
  const json files = analysis.value("task_files", json::array());
  if (files.empty()) return "";
  const json tasks = analysis.value("tasks", json::object());
  std::vector<std::string> parts;
  for (const auto& f : files) {
    const std::string name = s_of(f, "name");
    for (const auto& [arm, per] : tasks.items())
      if (per.contains(name)) {
        parts.push_back(name + " " + fmt_fixed(d_of(per[name], "items"), 0) + " items (chance " +
                        f2(d_of(per[name], "chance")) + ")");
        break;
      }
  }
  return " Accuracy columns: zero-shot multiple choice on the final checkpoint (moecpt eval; the choice with the "
         "highest log-likelihood), " + xml_escape(list_join(parts)) + ".";
}

std::string table_html(const View& v) {
  std::string s = "<div class=\"scroll\"><table><thead><tr><th>arm</th><th>kind</th><th>model</th><th>router</th><th>replay</th>"
                  "<th>schedule</th><th>from</th><th>steps</th><th>tokens</th><th>train FLOPs</th><th>params (active)</th>"
                  "<th>wall time</th><th>final train loss</th>";
  for (const auto& ds : v.sets) s += "<th>val loss " + xml_escape(ds) + "</th>";
  for (const auto& ds : v.sets) s += "<th>mean MRI " + xml_escape(ds) + "</th>";
  const json tasks = v.r.analysis.value("tasks", json::object());
  const json task_files = v.r.analysis.value("task_files", json::array());
  for (const auto& t : task_files) s += "<th>acc " + xml_escape(s_of(t, "name")) + "</th>";
  s += "</tr></thead><tbody>";
  for (const auto& a : v.r.arms) {
    char secs[32];
    std::snprintf(secs, sizeof secs, "%.0f s", d_of(a, "seconds"));
    s += "<tr><td>" + xml_escape(s_of(a, "name")) + "</td><td>" + s_of(a, "kind") + "</td><td>" +
         xml_escape(pretty_model(s_of(a, "model"))) + "</td><td>" + xml_escape(s_of(a, "router")) + "</td><td>" +
         (s_of(a, "kind") != "cpt" ? "–" : fmt_fixed(100 * d_of(a, "replay"), 0) + " %") + "</td><td>" +
         xml_escape(s_of(a, "schedule")) + "</td><td>" +
         xml_escape(s_of(a, "parent").empty() ? "scratch" : s_of(a, "parent") + "/" + s_of(a, "parent_checkpoint")) +
         "</td><td class=\"n\">" + fmt_fixed(d_of(a, "steps"), 0) + "</td><td class=\"n\">" + format_si(d_of(a, "tokens")) +
         "</td><td class=\"n\">" + format_si(d_of(a, "train_flops")) + "</td><td class=\"n\">" +
         format_si(d_of(a, "params_total")) + " (" + format_si(d_of(a, "params_active")) + ")</td><td class=\"n\">" + secs +
         "</td><td class=\"n\">" + f3(d_of(a, "final_train_loss")) + "</td>";
    for (const auto& ds : v.sets) s += "<td class=\"n\">" + f3(loss(&a, "final_eval", ds)) + "</td>";
    for (const auto& ds : v.sets) s += "<td class=\"n\">" + f3(mean(mri_layers(&a, "final_eval", ds))) + "</td>";
    for (const auto& t : task_files) {
      const std::string arm = s_of(a, "name"), task = s_of(t, "name");
      const bool has = tasks.contains(arm) && tasks[arm].contains(task);
      s += "<td class=\"n\">" + (has ? f2(d_of(tasks[arm][task], "acc")) : std::string("–")) + "</td>";
    }
    s += "</tr>";
  }
  return s + "</tbody></table></div>";
}

const char* kCss = R"(
body{font-family:Helvetica,Arial,sans-serif;color:#222;max-width:1380px;margin:0 auto;padding:18px 24px;line-height:1.4}
h1{font-size:24px;margin:4px 0}h2{font-size:19px;margin:28px 0 6px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#555;font-size:13px}.verdict{background:#f3f7fb;border-left:4px solid #0072B2;padding:8px 12px;margin:8px 0;font-size:14px}
.verdict.na{border-left-color:#999;background:#f6f6f6;color:#555}
.tldr li{margin:4px 0;font-size:14px}.row{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:4px 0;border:1px solid #eee;border-radius:4px;padding:4px}figcaption{font-size:12px;color:#555;max-width:440px;padding:2px 6px}
table{border-collapse:collapse;font-size:12px}th,td{border:1px solid #ddd;padding:3px 6px;white-space:nowrap}th{background:#f4f4f4}
td.n{text-align:right;font-variant-numeric:tabular-nums}.scroll{overflow-x:auto}pre{font-size:11px;background:#fafafa;padding:8px;overflow-x:auto}
details{margin:4px 0}summary{cursor:pointer;font-size:13px}.note{font-size:13px;color:#444}
)";

// The header line: what ran, and how long the whole study took (data,
// training, analyses) on which machine.
std::string study_meta(const StudyResults& r, const View& v) {
  const json phases = r.study.value("phases", json::object());
  const int sessions = phases.value("sessions", 1);
  const std::string when = "whole study " + duration_text(d_of(r.study, "wall_seconds")) +
                           (sessions > 1 ? " over " + std::to_string(sessions) + " sessions" : "");
  const std::string parts = phase_summary(phases);
  char head[512];
  std::snprintf(head, sizeof head, "Recipe %s · PT on <b>%s</b>, CPT on <b>%s</b> (study replay %.0f %%) · %zu arms · ",
                xml_escape(s_of(r.study, "recipe")).c_str(), xml_escape(v.old_ds).c_str(), xml_escape(v.new_ds).c_str(),
                100 * v.replay, r.arms.size());
  const std::string machine = r.study.contains("machine")
                                  ? xml_escape(s_of(r.study["machine"], "hostname")) + " (" +
                                        std::to_string(int(d_of(r.study["machine"], "cores"))) + " cores)"
                                  : "";
  return head + std::string("<b>") + when + "</b>" + (parts.empty() ? "" : ": " + parts) + " on " + machine + " · " +
         xml_escape(s_of(r.study, "created"));
}

std::string verdict_html(const Finding& f) {
  return std::string("<p class=\"verdict") + (f.available ? "" : " na") + "\"><b>Verdict (finding " + std::to_string(f.id) +
         "):</b> " + xml_escape(f.verdict) + "</p>";
}

}  // namespace

std::vector<Finding> compute_findings(const StudyResults& r) {
  const View v(r);
  std::vector<Finding> f = {finding_spike(v),  finding_balance(v),    finding_forgetting(v),  finding_sample_efficiency(v),
                            finding_replay(v), finding_saturation(v), finding_architecture(v)};
  return f;
}

void print_findings(const StudyResults& r) {
  std::printf("\nFindings (SPEC §6) on this study's numbers:\n");
  for (const auto& f : compute_findings(r)) std::printf("  %d. %s\n     %s\n", f.id, f.question.c_str(), f.verdict.c_str());
  std::fflush(stdout);
}

std::string render_report(const StudyResults& r) {
  const View v(r);
  const auto findings = compute_findings(r);
  auto find = [&](int id) -> const Finding& {
    for (const auto& f : findings)
      if (f.id == id) return f;
    return findings.front();
  };
  std::string h = "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>moecpt study: " +
                  xml_escape(s_of(r.study, "name")) + "</title><style>" + kCss + "</style></head><body>";
  h += "<h1>Continual pre-training of MoEs — miniature replication (" + xml_escape(s_of(r.study, "name")) +
       (r.study.value("quick", false) ? ", --quick" : "") + ")</h1>";
  h += "<p class=\"meta\">" + study_meta(r, v) + "</p>";
  const auto planned = r.study.value("arms_planned", std::vector<std::string>{});
  if (planned.size() > r.arms.size())
    h += "<p class=\"verdict na\">Incomplete study: " + std::to_string(r.arms.size()) + " of " +
         std::to_string(planned.size()) + " arms finished; re-run <code>moecpt study</code> to finish it.</p>";
  h += "<p class=\"note\">Verdicts are computed from the numbers below: loss differences under " + f2(v.tie_nats) +
       " nats and MRI differences under " + f2(v.tie_mri) +
       " count as ties. MRI = the largest share of tokens any one expert receives (balanced = k/E). "
       "Losses are on held-out windows of each data set.</p>";
  h += "<h2>Summary</h2><ol class=\"tldr\">";
  for (const auto& f : findings)
    h += "<li><b>" + xml_escape(f.question) + "</b><br>" + xml_escape(f.verdict) + "</li>";
  h += "</ol>";

  // Q: forgetting vs dense (3, 4).
  h += "<h2 id=\"forgetting\">1. Do MoEs forget more than dense models? (findings 3, 4)</h2>";
  h += verdict_html(find(3)) + verdict_html(find(4));
  {
    std::vector<std::pair<const json*, std::string>> arms;
    for (const auto& m : v.models)
      if (const json* a = v.cpt(v.main_variant, m)) arms.push_back({a, pretty_model(m)});
    std::string row;
    for (const auto& ds : v.sets) {
      // PT curves in grey, each model's CPT in its colour.
      LinePlot dummy;
      (void)dummy;
      std::vector<std::pair<const json*, std::string>> with_pt;
      for (const auto& [a, label] : arms) with_pt.push_back({a, label});
      row += figure(loss_curves(v, ds, with_pt, "Validation loss on " + ds + " (CPT: " + v.variant_label(v.main_variant) + ")"),
                    ds == v.old_ds ? "Rising after the shift = forgetting." : ds == v.new_ds ? "Falling after the shift = adaptation." : "A domain no arm trains on.");
    }
    h += "<div class=\"row\">" + row + "</div>";
    // Forgetting / adaptation bars per arm.
    BarChart fb, ab;
    fb.title = "Forgetting: Δ loss on " + v.old_ds + " during CPT";
    fb.y_label = "Δ loss (nats/token)";
    ab.title = "Adaptation: Δ loss on " + v.new_ds + " during CPT";
    ab.y_label = "Δ loss (nats/token)";
    fb.width = ab.width = 540;
    fb.height = ab.height = 300;
    for (const auto& m : v.models) {
      std::string label = pretty_model(m);
      const auto sp = label.find(' ');
      if (sp != std::string::npos) label[sp] = '\n';
      fb.categories.push_back(label);
      ab.categories.push_back(label);
    }
    for (size_t vi = 0; vi < v.variants.size(); ++vi) {
      BarSeries bf{v.variant_label(v.variants[vi]), {}, palette(vi)}, ba = bf;
      for (const auto& m : v.models) {
        const json* a = v.cpt(v.variants[vi], m);
        bf.values.push_back(loss(a, "final_eval", v.old_ds) - loss(a, "initial_eval", v.old_ds));
        ba.values.push_back(loss(a, "final_eval", v.new_ds) - loss(a, "initial_eval", v.new_ds));
      }
      fb.series.push_back(bf);
      ab.series.push_back(ba);
    }
    h += "<div class=\"row\">" + figure(render_bar_chart(fb), "Loss after CPT minus loss of the PT checkpoint it started from.") +
         figure(render_bar_chart(ab), "") + "</div>";
  }

  // Q: balance after CPT (2).
  h += "<h2 id=\"balance\">2. Is the load balanced after CPT? (finding 2)</h2>" + verdict_html(find(2));
  {
    std::string grid;
    double vmax = 0;
    for (const auto& m : v.models)
      if (const json* a = v.cpt(v.main_variant, m); a && v.is_moe(m))
        for (const char* w : {"initial_eval", "final_eval"})
          for (const auto& ds : {v.old_ds, v.new_ds})
            if ((*a)[w].contains(ds))
              for (const auto& row : (*a)[w][ds].value("loads", json::array()))
                for (double x : as_vec(row)) vmax = std::max(vmax, x);
    for (const auto& m : v.models) {
      const json* a = v.cpt(v.main_variant, m);
      if (!a || !v.is_moe(m)) continue;
      std::string row;
      row += figure(load_heatmap(*a, "initial_eval", v.new_ds, pretty_model(m) + ": " + v.new_ds + ", before CPT", vmax), "");
      row += figure(load_heatmap(*a, "final_eval", v.new_ds, pretty_model(m) + ": " + v.new_ds + ", after CPT", vmax), "");
      row += figure(load_heatmap(*a, "initial_eval", v.old_ds, pretty_model(m) + ": " + v.old_ds + ", before CPT", vmax), "");
      row += figure(load_heatmap(*a, "final_eval", v.old_ds, pretty_model(m) + ": " + v.old_ds + ", after CPT", vmax), "");
      grid += "<div class=\"row\">" + row + "</div>";
    }
    h += "<p class=\"note\">Expert loads (share of routed slots per expert, inference-mode top-k) per layer on the "
         "validation sets, before CPT (the PT checkpoint) and after CPT with " +
         xml_escape(v.variant_label(v.main_variant)) + ". A balanced layer is a uniform row.</p>" + grid;
  }

  // Q: replay + re-warming (5) — compute vs loss, variants, schedules.
  h += "<h2 id=\"replay\">3. Are replay and re-warming enough? (finding 5)</h2>" + verdict_html(find(5));
  {
    std::string ref;
    for (const auto& m : v.models)
      if (v.full(m)) {
        ref = m;
        break;
      }
    if (ref.empty() && !v.models.empty()) ref = v.models.front();
    std::vector<std::pair<const json*, std::string>> arms;
    if (const json* p = v.pt(ref)) arms.push_back({p, "PT"});
    for (const auto& var : v.variants)
      if (const json* a = v.cpt(var, ref)) arms.push_back({a, v.variant_label(var)});
    if (const json* f = v.full(ref)) arms.push_back({f, "full re-training"});
    std::string row;
    for (const auto& ds : {v.old_ds, v.new_ds})
      row += figure(loss_curves(v, ds, arms, pretty_model(ref) + ": loss on " + ds), "");
    // Compute vs loss: total training FLOPs from scratch.
    LinePlot cp;
    cp.title = pretty_model(ref) + ": compute vs loss on " + v.new_ds;
    cp.x_label = "training FLOPs from scratch";
    cp.y_label = "validation loss on " + v.new_ds + " (nats/token)";
    cp.width = 440;
    cp.height = 290;
    size_t ci = 0;
    for (const auto& [a, label] : arms) {
      const std::string name = s_of(*a, "name");
      if (!r.curves.contains(name) || s_of(*a, "kind") == "pt") continue;
      const auto& ev = r.curves[name]["eval"];
      if (!ev["sets"].contains(v.new_ds)) continue;
      Series s;
      s.name = label;
      s.markers = true;
      s.color = palette(ci++);
      s.dashed = s_of(*a, "kind") == "full";
      const double fpt = d_of(*a, "train_flops_per_token"), off = v.token_offset(*a), tps = v.tokens_per_step(*a);
      for (size_t k = 0; k < ev["step"].size(); ++k) {
        s.x.push_back((off + ev["step"][k].get<double>() * tps) * fpt);
        s.y.push_back(ev["sets"][v.new_ds]["loss"][k].get<double>());
      }
      cp.series.push_back(std::move(s));
    }
    if (const json* p = v.pt(ref)) cp.vlines.push_back({d_of(*p, "train_flops"), "PT done"});
    row += figure(render_line_plot(cp), "CPT curves start where their PT checkpoint was taken: their own cost is the part "
                                         "right of that point; full re-training pays for everything.");
    // Learning-rate schedules.
    LinePlot lp;
    lp.title = "Learning-rate schedules";
    lp.x_label = "tokens seen from scratch (M)";
    lp.y_label = "learning rate";
    lp.width = 440;
    lp.height = 290;
    ci = 0;
    for (const auto& [a, label] : arms) {
      const std::string name = s_of(*a, "name");
      if (!r.curves.contains(name)) continue;
      const auto& t = r.curves[name]["train"];
      Series s;
      s.name = label;
      s.color = s_of(*a, "kind") == "pt" ? "#999" : palette(ci++);
      s.dashed = s_of(*a, "kind") == "full";
      const double off = v.token_offset(*a), tps = v.tokens_per_step(*a);
      for (size_t k = 0; k < t["step"].size(); ++k) {
        s.x.push_back((off + (t["step"][k].get<double>() - 1) * tps) / 1e6);
        s.y.push_back(t["lr"][k].get<double>() * 1e3);
      }
      lp.series.push_back(std::move(s));
    }
    lp.y_label = "learning rate (×10⁻³)";
    row += figure(render_line_plot(lp), "Re-warm/re-decay starts from the annealed PT checkpoint; the infinite schedule "
                                         "continues from the pre-anneal checkpoint at the constant rate.");
    h += "<div class=\"row\">" + row + "</div>";
  }

  // Q: router robustness (1) — MRI per layer around the shift.
  h += "<h2 id=\"robustness\">4. Router robustness: Sinkhorn vs Z+Aux at the shift (finding 1)</h2>" + verdict_html(find(1));
  {
    std::string row;
    for (const auto& m : v.models) {
      const json* a = v.cpt(v.main_variant, m);
      if (a && v.is_moe(m)) row += figure(mri_shift_plot(v, *a, pretty_model(m) + " (" + v.variant_label(v.main_variant) + ")"), "");
    }
    for (const auto& var : v.variants) {
      if (var == v.main_variant) continue;
      for (const auto& m : v.models) {
        const json* a = v.cpt(var, m);
        if (a && v.is_moe(m)) row += figure(mri_shift_plot(v, *a, pretty_model(m) + " (" + v.variant_label(var) + ")"), "");
      }
    }
    h += "<p class=\"note\">MRI of each MoE layer on the training batches (5-step moving average), over the last PT steps "
         "before the CPT start and through CPT. Sinkhorn's training-mode choice is balanced by construction; its "
         "inference-mode balance is in the table (mean MRI columns) and the heatmaps.</p><div class=\"row\">" + row + "</div>";
  }

  // Saturation (6).
  h += "<h2 id=\"saturation\">5. Router saturation per layer (finding 6)</h2>" + verdict_html(find(6));
  {
    const auto& sat = r.analysis.value("saturation", json::object());
    std::string row;
    for (const auto& [name, s] : sat.items()) {
      const json* a = r.arm(name);
      if (!a || !s["overlap"].contains(v.old_ds)) continue;
      LinePlot p;
      p.title = pretty_model(s_of(*a, "model")) + " (" + v.variant_label(s_of(*a, "variant")) + ")";
      p.x_label = "CPT step of the checkpoint";
      p.y_label = "overlap with final routing (" + v.old_ds + ")";
      p.width = 400;
      p.height = 250;
      p.y_max = 1;
      const auto steps = as_vec(s["steps"]);
      const auto& rows = s["overlap"][v.old_ds];
      const size_t L = rows.empty() ? 0 : rows[0].size();
      for (size_t l = 0; l < L; ++l) {
        Series ser;
        ser.name = "layer " + std::to_string(l);
        ser.markers = true;
        for (size_t k = 0; k < rows.size(); ++k) ser.x.push_back(steps[k]), ser.y.push_back(rows[k][l].get<double>());
        p.series.push_back(std::move(ser));
      }
      row += figure(render_line_plot(p), "");
    }
    if (row.empty())
      h += "<p class=\"verdict na\">No routing analyses in this study's results.</p>";
    else
      h += "<p class=\"note\">Router saturation: for every kept CPT checkpoint (step 0 = the PT checkpoint), the share of "
           "each token's top-k experts that agrees with the final checkpoint's choice, per layer, on held-out " +
           xml_escape(v.old_ds) + " windows (inference-mode routing).</p><div class=\"row\">" + row + "</div>";
  }

  // Granular vs Switch (7).
  h += "<h2 id=\"architecture\">6. Granular vs Switch, Z+Aux vs Sinkhorn (finding 7)</h2>" + verdict_html(find(7));
  {
    std::vector<std::pair<const json*, std::string>> pts;
    for (const auto& m : v.models)
      if (const json* a = v.pt(m)) pts.push_back({a, pretty_model(m)});
    LinePlot p;
    p.title = "Pre-training: validation loss on " + v.old_ds;
    p.x_label = "tokens seen (M)";
    p.y_label = "validation loss on " + v.old_ds + " (nats/token)";
    p.width = 440;
    p.height = 290;
    for (const auto& [a, label] : pts) {
      const std::string name = s_of(*a, "name");
      if (!r.curves.contains(name)) continue;
      const auto& ev = r.curves[name]["eval"];
      if (!ev["sets"].contains(v.old_ds)) continue;
      Series s;
      s.name = label;
      s.color = v.colour(s_of(*a, "model"));
      s.markers = true;
      const double tps = v.tokens_per_step(*a);
      for (size_t k = 0; k < ev["step"].size(); ++k) {
        s.x.push_back(ev["step"][k].get<double>() * tps / 1e6);
        s.y.push_back(ev["sets"][v.old_ds]["loss"][k].get<double>());
      }
      // The first evaluation (random init, ~ln V) squashes the interesting part: start at the second.
      if (s.x.size() > 2) s.x.erase(s.x.begin()), s.y.erase(s.y.begin());
      p.series.push_back(std::move(s));
    }
    BarChart b;
    b.title = "Final validation loss per model (" + v.variant_label(v.main_variant) + ")";
    b.y_label = "loss (nats/token)";
    b.width = 540;
    b.height = 290;
    for (const auto& m : v.models) {
      std::string label = pretty_model(m);
      const auto sp = label.find(' ');
      if (sp != std::string::npos) label[sp] = '\n';
      b.categories.push_back(label);
    }
    BarSeries p0{"after PT, " + v.old_ds, {}, "#999"}, c0{"after CPT, " + v.old_ds, {}, "#0072B2"},
        c1{"after CPT, " + v.new_ds, {}, "#D55E00"};
    for (const auto& m : v.models) {
      p0.values.push_back(loss(v.pt(m), "final_eval", v.old_ds));
      c0.values.push_back(loss(v.cpt(v.main_variant, m), "final_eval", v.old_ds));
      c1.values.push_back(loss(v.cpt(v.main_variant, m), "final_eval", v.new_ds));
    }
    b.series = {p0, c0, c1};
    b.value_decimals = 2;
    h += "<div class=\"row\">" + figure(render_line_plot(p), "") + figure(render_bar_chart(b), "") + "</div>";
  }

  h += render_routing_section(r);  // co-activation, domain affinity, specialisation, Sinkhorn modes (report_routing.h)
  h += "<h2 id=\"arms\">All arms</h2>" + table_html(v);
  h += "<p class=\"note\">FLOPs = tokens × training FLOPs per token (6·N<sub>active</sub> + attention, docs/model.md). "
       "Wall time is the arm's last training session. MRI columns: inference-mode, mean over layers, after the arm." +
       task_note(v.r.analysis) + "</p>";
  h += "<h2 id=\"configs\">Effective configs</h2><details><summary>study recipe (" + xml_escape(s_of(r.study, "recipe")) +
       ")</summary><pre>" + xml_escape(s_of(r.study, "recipe_text")) + "</pre></details>";
  for (const auto& a : r.arms)
    h += "<details><summary>" + xml_escape(s_of(a, "name")) + "</summary><pre>" + xml_escape(s_of(a, "config")) +
         "</pre></details>";
  h += "<p class=\"meta\">Generated by moecpt from " + xml_escape(s_of(r.study, "recipe")) +
       "; rebuild with <code>moecpt report --study DIR</code>.</p></body></html>\n";
  return h;
}

}  // namespace moecpt::report
