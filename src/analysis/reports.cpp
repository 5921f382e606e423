#include "analysis/reports.h"

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <sstream>

#include "analysis/routing_stats.h"
#include "core/error.h"
#include "core/log.h"
#include "data/shard.h"
#include "data/tokenizer.h"

namespace moecpt::analysis {
using nlohmann::json;

namespace {

std::string shard_dir_of(const LoadedModel& m, const DataOptions& opt) {
  return opt.shard_dir.empty() ? m.cfg.data.shard_dir : opt.shard_dir;
}

std::shared_ptr<const Shard> open_for(const LoadedModel& m, const std::string& path) {
  auto shard = Shard::open(path);
  if (int64_t(shard->info().vocab_size) > m.cfg.model.vocab_size)
    throw file_error(path, "shard vocabulary (" + std::to_string(shard->info().vocab_size) +
                               ") is larger than the vocabulary of " + m.dir + " (" +
                               std::to_string(m.cfg.model.vocab_size) + ")");
  return shard;
}

void require_moe(const LoadedModel& m) {
  if (!m.is_moe() || m.model->moe_layer_indices().empty())
    throw file_error(m.dir + "/config.toml", "model.ffn = \"" + m.cfg.model.ffn +
                                                 "\": a dense model has no router to analyse");
}

void require_same_routing_shape(const LoadedModel& a, const LoadedModel& b) {
  if (a.cfg.model.n_experts != b.cfg.model.n_experts || a.cfg.model.top_k != b.cfg.model.top_k ||
      a.model->moe_layer_indices() != b.model->moe_layer_indices())
    throw Error(b.dir + ": routing cannot be compared with " + a.dir +
                " (different n_experts, top_k or MoE layers)");
}

bool is_sinkhorn(const LoadedModel& m) { return m.cfg.router.type == "sinkhorn"; }

// The choice of one layer in one mode (docs/analysis.md, "two modes").
struct Choice {
  torch::Tensor ids_TK;
  int64_t iters = -1;
  double error = 0;
};
Choice choose(const LoadedModel& m, const model::RoutingInfo& r, const std::string& mode) {
  if (mode == "training" && is_sinkhorn(m)) {
    auto c = sinkhorn_choice(r.scores_TE, m.cfg.model.top_k, m.cfg.router.sinkhorn_tol, m.cfg.router.sinkhorn_max_iters);
    return {c.topk_ids_TK, c.iters, c.error};
  }
  return {r.topk_ids_TK, -1, 0};
}

json specialisation_json(const Specialisation& s) {
  return {{"mean", s.mean}, {"mean_unweighted", s.mean_unweighted}, {"token_ids", s.token_ids},
          {"occurrences", s.occurrences}};
}

json layer_stats_json(const LayerRoutingAccumulator& acc, const RoutingOptions& opt) {
  const auto loads = load_fractions(acc.counts_E);
  json j = {{"mri", acc.mri()},
            {"loads", loads},
            {"entropy", acc.mean_entropy()},
            {"entropy_max", std::log(double(acc.n_experts))},
            {"dead_experts", dead_experts(loads, opt.dead_threshold)},
            {"dropped_share", 0.0},
            {"coactivation", coactivation_shares(acc.coact_EE)}};
  if (acc.token_expert_VE.defined())
    j["specialisation"] = specialisation_json(vocabulary_specialisation(acc.token_expert_VE, acc.top_k, opt.min_occurrences));
  if (acc.sinkhorn_batches > 0)
    j["sinkhorn"] = {{"iters_mean", double(acc.sinkhorn_iters_sum) / double(acc.sinkhorn_batches)},
                     {"iters_max", acc.sinkhorn_iters_max},
                     {"error_mean", acc.sinkhorn_error_sum / double(acc.sinkhorn_batches)},
                     {"error_max", acc.sinkhorn_error_max}};
  return j;
}

std::vector<std::vector<double>> matrix_delta(const std::vector<std::vector<double>>& a,
                                              const std::vector<std::vector<double>>& b) {
  auto d = a;
  for (size_t i = 0; i < d.size(); ++i)
    for (size_t j = 0; j < d[i].size(); ++j) d[i][j] -= b[i][j];
  return d;
}

std::string fmt(double x, int prec = 3) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", prec, x);
  return buf;
}

}  // namespace

json routing_report(const RoutingOptions& opt) {
  if (opt.datasets.empty()) throw Error("analyze routing: give at least one dataset (--data)");
  LoadedModel A = load_model(opt.checkpoint, opt.data.device);
  require_moe(A);
  std::optional<LoadedModel> B;
  if (!opt.compare.empty()) {
    B = load_model(opt.compare, opt.data.device);
    require_moe(*B);
    require_same_routing_shape(A, *B);
    if (B->cfg.model.vocab_size != A.cfg.model.vocab_size)
      throw Error(opt.compare + ": vocabulary size differs from " + opt.checkpoint + "; token statistics cannot be compared");
  }
  const int64_t E = A.cfg.model.n_experts, K = A.cfg.model.top_k, V = opt.min_occurrences > 0 ? A.cfg.model.vocab_size : 0;
  const auto layers = A.model->moe_layer_indices();
  const size_t L = layers.size();
  std::vector<std::string> modes = {"inference"};
  if (is_sinkhorn(A) || (B && is_sinkhorn(*B))) modes.push_back("training");
  const int64_t bs = effective_batch_size(A, opt.data), seq = effective_seq_len(A, opt.data);

  json report = {{"kind", "routing"},
                 {"checkpoint", opt.checkpoint},
                 {"compare", B ? json(opt.compare) : json(nullptr)},
                 {"router", A.cfg.router.type},
                 {"n_experts", E},
                 {"top_k", K},
                 {"balanced_mri", double(K) / double(E)},
                 {"moe_layers", layers},
                 {"batch_size", bs},
                 {"seq_len", seq},
                 {"min_occurrences", opt.min_occurrences},
                 {"modes", modes},
                 {"datasets", json::object()},
                 {"routing", json::object()},
                 {"domain_affinity", json::object()}};
  if (modes.size() > 1) report["mode_gap"] = json::object();

  // acc[mode][dataset][layer], likewise for the compare model.
  using Accs = std::vector<std::vector<std::vector<LayerRoutingAccumulator>>>;
  auto make_accs = [&] {  // constructed one by one: copies would share their count tensors
    Accs a(modes.size(), std::vector<std::vector<LayerRoutingAccumulator>>(opt.datasets.size()));
    for (auto& per_ds : a)
      for (auto& per_layer : per_ds)
        for (size_t l = 0; l < L; ++l) per_layer.emplace_back(E, K, V);
    return a;
  };
  Accs accA = make_accs(), accB = B ? make_accs() : Accs{};
  std::vector<std::vector<std::vector<OverlapCounts>>> overlap(
      modes.size(), std::vector<std::vector<OverlapCounts>>(opt.datasets.size(), std::vector<OverlapCounts>(L)));
  std::vector<std::vector<OverlapCounts>> gap(opt.datasets.size(), std::vector<OverlapCounts>(L));
  std::vector<std::string> names;

  for (size_t d = 0; d < opt.datasets.size(); ++d) {
    const auto ds = resolve_dataset(opt.datasets[d], shard_dir_of(A, opt.data));
    names.push_back(ds.name);
    auto shard = open_for(A, ds.path);
    double lossA = 0, lossB = 0;
    const int64_t tokens = for_each_batch(*shard, seq, bs, opt.data.max_tokens, [&](const torch::Tensor& w) {
      auto ra = forward_batch(A, w);
      lossA += ra.loss_sum;
      std::optional<BatchResult> rb;
      if (B) {
        rb = forward_batch(*B, w);
        lossB += rb->loss_sum;
      }
      for (size_t l = 0; l < L; ++l) {
        std::vector<torch::Tensor> a_ids_per_mode;
        for (size_t mo = 0; mo < modes.size(); ++mo) {
          auto ca = choose(A, ra.routing[l], modes[mo]);
          auto& acc = accA[mo][d][l];
          acc.add(ca.ids_TK, ra.input_ids_T, ra.routing[l].scores_TE);
          if (ca.iters >= 0) {
            acc.sinkhorn_batches += 1;
            acc.sinkhorn_iters_sum += ca.iters;
            acc.sinkhorn_iters_max = std::max(acc.sinkhorn_iters_max, ca.iters);
            acc.sinkhorn_error_sum += ca.error;
            acc.sinkhorn_error_max = std::max(acc.sinkhorn_error_max, ca.error);
          }
          a_ids_per_mode.push_back(ca.ids_TK);
          if (B) {
            auto cb = choose(*B, rb->routing[l], modes[mo]);
            auto& bacc = accB[mo][d][l];
            bacc.add(cb.ids_TK, rb->input_ids_T, rb->routing[l].scores_TE);
            if (cb.iters >= 0) {
              bacc.sinkhorn_batches += 1;
              bacc.sinkhorn_iters_sum += cb.iters;
              bacc.sinkhorn_iters_max = std::max(bacc.sinkhorn_iters_max, cb.iters);
              bacc.sinkhorn_error_sum += cb.error;
              bacc.sinkhorn_error_max = std::max(bacc.sinkhorn_error_max, cb.error);
            }
            auto o = overlap_counts(ca.ids_TK, cb.ids_TK);
            auto& to = overlap[mo][d][l];
            to.overlap_sum += o.overlap_sum;
            to.changed += o.changed;
            to.tokens += o.tokens;
          }
        }
        if (modes.size() > 1) {
          auto o = overlap_counts(a_ids_per_mode[0], a_ids_per_mode[1]);
          gap[d][l].overlap_sum += o.overlap_sum;
          gap[d][l].changed += o.changed;
          gap[d][l].tokens += o.tokens;
        }
      }
    });
    json dj = {{"path", ds.path}, {"tokens", tokens}, {"loss", lossA / double(std::max<int64_t>(1, tokens))}};
    if (B) dj["compare_loss"] = lossB / double(std::max<int64_t>(1, tokens));
    report["datasets"][ds.name] = dj;
  }

  std::unique_ptr<Tokenizer> tok;
  if (B && V > 0) {
    const std::string tpath = opt.tokenizer.empty() ? A.cfg.data.tokenizer : opt.tokenizer;
    if (std::filesystem::exists(tpath)) tok = std::make_unique<Tokenizer>(tpath);
    else log::warn(tpath + ": tokenizer not found; top changed tokens are listed by id only");
  }

  for (size_t mo = 0; mo < modes.size(); ++mo) {
    json per_ds = json::object();
    for (size_t d = 0; d < names.size(); ++d) {
      json layers_j = json::array();
      for (size_t l = 0; l < L; ++l) {
        json lj = layer_stats_json(accA[mo][d][l], opt);
        lj["layer"] = layers[l];
        if (B) {
          json cj = layer_stats_json(accB[mo][d][l], opt);
          cj.erase("dropped_share");
          cj["coactivation_delta"] = matrix_delta(lj["coactivation"].get<std::vector<std::vector<double>>>(),
                                                  cj["coactivation"].get<std::vector<std::vector<double>>>());
          cj["overlap"] = overlap[mo][d][l].overlap();
          cj["changed_share"] = overlap[mo][d][l].changed_share();
          json top = json::array();
          if (V > 0)
            for (const auto& c : favourite_changes(accB[mo][d][l].token_expert_VE, accA[mo][d][l].token_expert_VE, K,
                                                   opt.min_occurrences, opt.top_tokens))
              top.push_back({{"token_id", c.token_id},
                             {"text", tok ? json(tok->decode({int(c.token_id)})) : json(nullptr)},
                             {"occurrences", c.occurrences},
                             {"expert_before", c.expert_before},
                             {"expert_after", c.expert_after},
                             {"share_before", c.share_before},
                             {"share_after", c.share_after},
                             {"share_before_after", c.share_before_after},
                             {"change", c.change}});
          cj["top_changed_tokens"] = top;
          lj["compare"] = cj;
        }
        layers_j.push_back(lj);
      }
      per_ds[names[d]] = layers_j;
    }
    report["routing"][modes[mo]] = per_ds;

    json aff = json::array();
    for (size_t l = 0; l < L; ++l) {
      std::vector<torch::Tensor> cA, cB;
      for (size_t d = 0; d < names.size(); ++d) {
        cA.push_back(accA[mo][d][l].counts_E);
        if (B) cB.push_back(accB[mo][d][l].counts_E);
      }
      json aj = {{"layer", layers[l]}, {"datasets", names}, {"share", domain_affinity(cA, true)},
                 {"share_raw", domain_affinity(cA, false)}};
      if (B) {
        aj["compare_share"] = domain_affinity(cB, true);
        aj["compare_share_raw"] = domain_affinity(cB, false);
      }
      aff.push_back(aj);
    }
    report["domain_affinity"][modes[mo]] = aff;
  }
  if (modes.size() > 1)
    for (size_t d = 0; d < names.size(); ++d) {
      json g = json::array();
      for (size_t l = 0; l < L; ++l)
        g.push_back({{"layer", layers[l]},
                     {"overlap", gap[d][l].overlap()},
                     {"changed_share", gap[d][l].changed_share()},
                     {"mri_inference", accA[0][d][l].mri()},
                     {"mri_training", accA[1][d][l].mri()}});
      report["mode_gap"][names[d]] = g;
    }
  return report;
}

json saturation_report(const SaturationOptions& opt) {
  if (opt.checkpoints.size() < 2) throw Error("analyze saturation: give at least two checkpoints (… and the final one)");
  if (opt.datasets.empty()) throw Error("analyze saturation: give at least one dataset (--data)");
  // The final checkpoint's choices on every token looked at, per dataset, batch and layer.
  LoadedModel F = load_model(opt.checkpoints.back(), opt.data.device);
  require_moe(F);
  const auto layers = F.model->moe_layer_indices();
  const size_t L = layers.size();
  const int64_t bs = effective_batch_size(F, opt.data), seq = effective_seq_len(F, opt.data);
  const std::string shard_dir = shard_dir_of(F, opt.data);
  std::vector<ResolvedDataset> ds;
  std::vector<std::vector<std::vector<torch::Tensor>>> final_ids(opt.datasets.size());  // [d][batch][layer]
  std::vector<int64_t> tokens(opt.datasets.size());
  for (size_t d = 0; d < opt.datasets.size(); ++d) {
    ds.push_back(resolve_dataset(opt.datasets[d], shard_dir));
    auto shard = open_for(F, ds[d].path);
    tokens[d] = for_each_batch(*shard, seq, bs, opt.data.max_tokens, [&](const torch::Tensor& w) {
      auto r = forward_batch(F, w);
      std::vector<torch::Tensor> per_layer;
      for (size_t l = 0; l < L; ++l) per_layer.push_back(r.routing[l].topk_ids_TK.to(torch::kCPU).to(torch::kInt16));
      final_ids[d].push_back(std::move(per_layer));
    });
  }
  json report = {{"kind", "saturation"},
                 {"final", opt.checkpoints.back()},
                 {"moe_layers", layers},
                 {"top_k", F.cfg.model.top_k},
                 {"n_experts", F.cfg.model.n_experts},
                 {"batch_size", bs},
                 {"seq_len", seq},
                 {"datasets", json::object()}};
  std::vector<json> per_ds(ds.size(), json::array());
  const int64_t final_step = F.step;
  F = LoadedModel{};  // free the final model before loading the others
  for (size_t c = 0; c + 1 < opt.checkpoints.size(); ++c) {
    LoadedModel M = load_model(opt.checkpoints[c], opt.data.device);
    require_moe(M);
    if (M.cfg.model.n_experts != int64_t(report["n_experts"]) || M.cfg.model.top_k != int64_t(report["top_k"]) ||
        M.model->moe_layer_indices() != layers)
      throw Error(opt.checkpoints[c] + ": routing cannot be compared with " + opt.checkpoints.back() +
                  " (different n_experts, top_k or MoE layers)");
    for (size_t d = 0; d < ds.size(); ++d) {
      auto shard = open_for(M, ds[d].path);
      std::vector<OverlapCounts> ov(L);
      size_t b = 0;
      for_each_batch(*shard, seq, bs, opt.data.max_tokens, [&](const torch::Tensor& w) {
        auto r = forward_batch(M, w);
        for (size_t l = 0; l < L; ++l) {
          auto o = overlap_counts(r.routing[l].topk_ids_TK, final_ids[d][b][l]);
          ov[l].overlap_sum += o.overlap_sum;
          ov[l].changed += o.changed;
          ov[l].tokens += o.tokens;
        }
        ++b;
      });
      std::vector<double> o, ch;
      for (const auto& x : ov) o.push_back(x.overlap()), ch.push_back(x.changed_share());
      per_ds[d].push_back({{"path", opt.checkpoints[c]}, {"step", M.step}, {"overlap", o}, {"changed_share", ch}});
    }
  }
  for (size_t d = 0; d < ds.size(); ++d) {
    per_ds[d].push_back({{"path", opt.checkpoints.back()},
                         {"step", final_step},
                         {"overlap", std::vector<double>(L, 1.0)},
                         {"changed_share", std::vector<double>(L, 0.0)}});
    report["datasets"][ds[d].name] = {{"path", ds[d].path}, {"tokens", tokens[d]}, {"checkpoints", per_ds[d]}};
  }
  return report;
}

std::string saturation_csv(const json& report) {
  std::ostringstream os;
  os << "dataset,checkpoint,step,layer,overlap,changed_share\n";
  const auto layers = report.at("moe_layers").get<std::vector<int64_t>>();
  for (const auto& [name, d] : report.at("datasets").items())
    for (const auto& c : d.at("checkpoints"))
      for (size_t l = 0; l < layers.size(); ++l) {
        char buf[64];
        std::snprintf(buf, sizeof buf, "%.6f,%.6f", c["overlap"][l].get<double>(), c["changed_share"][l].get<double>());
        os << name << "," << c["path"].get<std::string>() << "," << c["step"].get<int64_t>() << "," << layers[l] << ","
           << buf << "\n";
      }
  return os.str();
}

json forgetting_report(const ForgettingOptions& opt) {
  if (opt.datasets.size() < 2)
    throw Error("analyze forgetting: give the old and the new dataset (--data D0 D1 …)");
  json report = {{"kind", "forgetting"},
                 {"before", opt.before},
                 {"after", opt.after},
                 {"reference", opt.reference.empty() ? json(nullptr) : json(opt.reference)},
                 {"datasets", json::object()}};
  std::vector<ResolvedDataset> ds;
  std::vector<std::pair<std::string, std::string>> arms = {{"before", opt.before}, {"after", opt.after}};
  if (!opt.reference.empty()) arms.emplace_back("reference", opt.reference);
  for (const auto& [arm, dir] : arms) {
    LoadedModel m = load_model(dir, opt.data.device);
    if (ds.empty())
      for (const auto& d : opt.datasets) ds.push_back(resolve_dataset(d, shard_dir_of(m, opt.data)));
    for (const auto& d : ds) {
      auto r = evaluate_loss(m, d.path, opt.data);
      auto& dj = report["datasets"][d.name];
      dj["path"] = d.path;
      dj["tokens"] = r.tokens;
      dj[arm] = {{"loss", r.loss}, {"ppl", r.ppl}};
    }
  }
  for (auto& [name, dj] : report["datasets"].items()) {
    dj["delta_loss"] = dj["after"]["loss"].get<double>() - dj["before"]["loss"].get<double>();
    if (dj.contains("reference")) dj["gap_to_reference"] = dj["after"]["loss"].get<double>() - dj["reference"]["loss"].get<double>();
  }
  report["forgetting"] = {{"dataset", ds[0].name}, {"delta_loss", report["datasets"][ds[0].name]["delta_loss"]}};
  report["adaptation"] = {{"dataset", ds[1].name}, {"delta_loss", report["datasets"][ds[1].name]["delta_loss"]}};
  return report;
}

std::string routing_text(const json& r) {
  std::ostringstream os;
  os << "routing of " << r["checkpoint"].get<std::string>() << " (" << r["router"].get<std::string>() << ", E="
     << r["n_experts"] << ", k=" << r["top_k"] << ", balanced MRI k/E = " << fmt(r["balanced_mri"].get<double>(), 2)
     << ")";
  if (!r["compare"].is_null()) os << " vs " << r["compare"].get<std::string>();
  os << "\n";
  for (const auto& mode : r["modes"]) {
    os << "mode: " << mode.get<std::string>() << "\n";
    os << "  dataset  tokens   layer   MRI  entropy  spec.  dead";
    if (!r["compare"].is_null()) os << "  | MRI(cmp) overlap changed";
    os << "\n";
    for (const auto& [name, layers] : r["routing"][mode.get<std::string>()].items())
      for (const auto& l : layers) {
        char buf[256];
        std::snprintf(buf, sizeof buf, "  %-7s %7lld %6lld %6.3f %8.3f %6.3f %5zu", name.c_str(),
                      (long long)r["datasets"][name]["tokens"].get<int64_t>(), (long long)l["layer"].get<int64_t>(),
                      l["mri"].get<double>(), l["entropy"].get<double>(),
                      l.contains("specialisation") ? l["specialisation"]["mean"].get<double>() : NAN,
                      l["dead_experts"].size());
        os << buf;
        if (l.contains("compare")) {
          const auto& c = l["compare"];
          std::snprintf(buf, sizeof buf, "  | %8.3f %7.3f %7.3f", c["mri"].get<double>(), c["overlap"].get<double>(),
                        c["changed_share"].get<double>());
          os << buf;
        }
        os << "\n";
      }
  }
  if (r.contains("mode_gap")) {
    os << "Sinkhorn mode gap (same tokens): overlap of inference and training choices, MRI in each mode\n";
    for (const auto& [name, layers] : r["mode_gap"].items())
      for (const auto& g : layers)
        os << "  " << name << " layer " << g["layer"] << ": overlap " << fmt(g["overlap"].get<double>()) << ", MRI "
           << fmt(g["mri_inference"].get<double>()) << " (inference) vs " << fmt(g["mri_training"].get<double>())
           << " (training)\n";
  }
  return os.str();
}

std::string saturation_text(const json& r) {
  std::ostringstream os;
  os << "overlap with " << r["final"].get<std::string>() << " (1 = same experts for every token)\n";
  for (const auto& [name, d] : r["datasets"].items()) {
    os << name << " (" << d["tokens"] << " tokens)\n";
    for (const auto& c : d["checkpoints"]) {
      os << "  step " << c["step"] << ":";
      for (const auto& o : c["overlap"]) os << " " << fmt(o.get<double>());
      os << "   " << c["path"].get<std::string>() << "\n";
    }
  }
  return os.str();
}

std::string forgetting_text(const json& r) {
  std::ostringstream os;
  const bool ref = !r["reference"].is_null();
  os << "  dataset   tokens  loss before  loss after    change" << (ref ? "  reference  gap" : "") << "\n";
  for (const auto& [name, d] : r["datasets"].items()) {
    char buf[256];
    std::snprintf(buf, sizeof buf, "  %-8s %7lld %12.4f %11.4f %+9.4f", name.c_str(), (long long)d["tokens"].get<int64_t>(),
                  d["before"]["loss"].get<double>(), d["after"]["loss"].get<double>(), d["delta_loss"].get<double>());
    os << buf;
    if (ref) {
      std::snprintf(buf, sizeof buf, " %10.4f %+8.4f", d["reference"]["loss"].get<double>(),
                    d["gap_to_reference"].get<double>());
      os << buf;
    }
    os << "\n";
  }
  os << "  forgetting (Δ loss on " << r["forgetting"]["dataset"].get<std::string>()
     << "): " << fmt(r["forgetting"]["delta_loss"].get<double>(), 4) << "; adaptation (Δ loss on "
     << r["adaptation"]["dataset"].get<std::string>() << "): " << fmt(r["adaptation"]["delta_loss"].get<double>(), 4)
     << "\n";
  return os.str();
}

}  // namespace moecpt::analysis
