#include "report/results.h"

#include <chrono>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <thread>
#include <unistd.h>

#include "core/atomic_file.h"
#include "core/error.h"
#include "core/log.h"
#include "data/mixture.h"
#include "data/shard.h"
#include "model/transformer.h"
#include "train/checkpoint.h"

namespace moecpt::report {
namespace fs = std::filesystem;
using nlohmann::json;

const json* StudyResults::arm(const std::string& name) const {
  for (const auto& a : arms)
    if (a.value("name", "") == name) return &a;
  return nullptr;
}

namespace {

json read_json(const std::string& path) {
  if (!fs::exists(path)) throw Error(path + ": file not found");
  json j = json::parse(read_file(path), nullptr, false);
  if (j.is_discarded()) throw Error(path + ": not valid JSON");
  return j;
}

std::string utc_now() {
  const std::time_t t = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
  return buf;
}

// Training and evaluation curves of one arm from its metrics.jsonl.
json read_curves(const std::string& metrics_path) {
  json train = {{"step", json::array()}, {"tokens", json::array()}, {"lr", json::array()},
                {"loss", json::array()}, {"aux_loss", json::array()}, {"mri", json::array()}};
  json eval = {{"step", json::array()}, {"sets", json::object()}};
  std::ifstream in(metrics_path);
  std::string line;
  while (std::getline(in, line)) {
    json j = json::parse(line, nullptr, false);
    if (j.is_discarded()) continue;
    if (j.value("kind", "") == "train") {
      train["step"].push_back(j.value("step", 0));
      train["tokens"].push_back(j.value("tokens", int64_t(0)));
      train["lr"].push_back(j.value("lr", 0.0));
      train["loss"].push_back(j.value("loss", 0.0));
      train["aux_loss"].push_back(j.value("aux_loss", 0.0));
      train["mri"].push_back(j.value("mri", json::array()));
    } else if (j.value("kind", "") == "eval") {
      eval["step"].push_back(j.value("step", 0));
      for (const auto& [name, e] : j.at("eval").items()) {
        auto& s = eval["sets"][name];
        if (s.is_null()) s = {{"loss", json::array()}, {"mri", json::array()}};
        s["loss"].push_back(e.value("loss", 0.0));
        s["mri"].push_back(e.value("mri", json::array()));
      }
    }
  }
  return {{"train", train}, {"eval", eval}};
}

// Expert choices of every MoE layer on fixed validation windows, inference mode.
std::vector<torch::Tensor> routing_choices(model::Transformer& m, const std::vector<Batch>& batches) {
  torch::NoGradGuard ng;
  m->eval();
  std::vector<std::vector<torch::Tensor>> per_layer;
  for (const auto& b : batches) {
    auto t = torch::from_blob(const_cast<int64_t*>(b.tokens.data()), {b.batch_size, b.seq_len + 1}, torch::kInt64);
    auto out = m->forward(t.narrow(1, 0, b.seq_len).clone());
    if (per_layer.empty()) per_layer.resize(out.routing.size());
    for (size_t l = 0; l < out.routing.size(); ++l) per_layer[l].push_back(out.routing[l].topk_ids_TK.to(torch::kCPU));
  }
  std::vector<torch::Tensor> ids;
  for (auto& p : per_layer) ids.push_back(torch::cat(p));
  return ids;
}

}  // namespace

// overlap(a, b) = mean over tokens of |I_k^a(x) ∩ I_k^b(x)| / k (SPEC §5).
double routing_overlap(const torch::Tensor& a_TK, const torch::Tensor& b_TK) {
  const int64_t k = a_TK.size(1);
  // [T, K, 1] == [T, 1, K]: each of a's choices found among b's (choices are distinct).
  auto hits = (a_TK.unsqueeze(2) == b_TK.unsqueeze(1)).any(2).sum(1).to(torch::kFloat64);
  return hits.mean().item<double>() / double(k);
}

void collect_results(const StudyPlan& plan, const std::string& results_dir, double wall_seconds) {
  fs::create_directories(results_dir);
  json arms = json::array(), curves = json::object();
  json finished = json::array(), planned = json::array();
  double train_seconds = 0;
  for (const auto& a : plan.arms) {
    planned.push_back(a.name);
    const std::string dir = a.config.run.out_dir;
    if (!fs::exists(dir + "/summary.json")) continue;
    const json s = read_json(dir + "/summary.json");
    const auto& c = a.config;
    json j = {{"name", a.name},
              {"kind", a.kind},
              {"model", a.model},
              {"variant", a.variant},
              {"replay", a.replay},
              {"schedule", a.schedule},
              {"parent", a.parent},
              {"parent_checkpoint", a.parent_checkpoint},
              {"ffn", c.model.ffn},
              {"router", c.model.ffn == "moe" ? c.router.type : "none"},
              {"n_experts", c.model.n_experts},
              {"n_shared_experts", c.model.n_shared_experts},
              {"top_k", c.model.top_k},
              {"n_layers", c.model.n_layers},
              {"steps", s.value("steps", 0)},
              {"tokens", s.value("tokens", int64_t(0))},
              {"seconds", s.value("seconds", 0.0)},
              {"params_total", s.value("params_total", int64_t(0))},
              {"params_active", s.value("params_active", int64_t(0))},
              {"train_flops_per_token", s.value("train_flops_per_token", int64_t(0))},
              {"train_flops", double(s.value("tokens", int64_t(0))) * double(s.value("train_flops_per_token", int64_t(0)))},
              {"final_train_loss", s.value("final_train_loss", 0.0)},
              {"initial_eval", s.value("initial_eval", json::object())},
              {"final_eval", s.value("final_eval", json::object())},
              {"config", read_file(dir + "/config.toml")}};
    // The step of the parent checkpoint (where the CPT curve joins the PT curve).
    if (!a.parent.empty()) {
      const std::string tj = c.train.init_from + "/trainer.json";
      j["parent_step"] = fs::exists(tj) ? read_json(tj).value("step", 0) : 0;
    }
    train_seconds += j["seconds"].get<double>();
    arms.push_back(j);
    curves[a.name] = read_curves(dir + "/metrics.jsonl");
    finished.push_back(a.name);
  }
  char host[256] = {0};
  ::gethostname(host, sizeof host - 1);
  json study = {{"name", plan.name},
                {"recipe", plan.recipe_path},
                {"recipe_text", plan.recipe_text},
                {"quick", plan.quick},
                {"old", plan.old_data},
                {"new", plan.new_data},
                {"validation", plan.validation},
                {"replay_fraction", plan.replay_fraction},
                {"tie_nats", plan.tie_nats},
                {"tie_mri", plan.tie_mri},
                {"wall_seconds", wall_seconds},
                {"train_seconds", train_seconds},
                {"created", utc_now()},
                {"machine", {{"hostname", host}, {"cores", std::thread::hardware_concurrency()}}},
                {"arms_planned", planned},
                {"arms_finished", finished}};
  write_file_atomic(results_dir + "/study.json", study.dump(1) + "\n");
  write_file_atomic(results_dir + "/arms.json", arms.dump(1) + "\n");
  write_file_atomic(results_dir + "/curves.json", curves.dump() + "\n");
}

void run_analyses(const StudyPlan& plan, const std::string& results_dir) {
  const auto t0 = std::chrono::steady_clock::now();
  json saturation = json::object();
  for (const auto& a : plan.arms) {
    if (a.kind != "cpt" || a.config.model.ffn != "moe") continue;
    const std::string dir = a.config.run.out_dir;
    if (!fs::exists(dir + "/checkpoints/final/model.safetensors")) continue;
    // The checkpoints of the phase: its start (the PT checkpoint), every kept step, the end.
    std::vector<std::pair<int64_t, std::string>> ckpts = {{0, a.config.train.init_from}};
    for (const auto& e : fs::directory_iterator(dir + "/checkpoints")) {
      const std::string n = e.path().filename().string();
      if (n.size() == 13 && n.rfind("step-", 0) == 0 && fs::exists(e.path() / "model.safetensors"))
        ckpts.emplace_back(std::stoll(n.substr(5)), e.path().string());
    }
    std::sort(ckpts.begin(), ckpts.end());
    model::Transformer m(a.config.model, a.config.router);
    json per_set = json::object();
    for (const auto& ds : {plan.old_data, plan.new_data}) {
      auto batches = fixed_eval_batches(Shard::open(a.config.data.shard_dir + "/" + ds + "/val.bin"),
                                        a.config.model.seq_len, a.config.train.batch_size, plan.saturation_batches);
      load_model_weights(dir + "/checkpoints/final", *m);
      const auto final_ids = routing_choices(m, batches);
      json rows = json::array();  // [checkpoint][layer]
      for (const auto& [step, path] : ckpts) {
        load_model_weights(path, *m);
        const auto ids = routing_choices(m, batches);
        json row = json::array();
        for (size_t l = 0; l < ids.size(); ++l) row.push_back(routing_overlap(ids[l], final_ids[l]));
        rows.push_back(row);
      }
      per_set[ds] = rows;
    }
    json steps = json::array();
    for (const auto& c : ckpts) steps.push_back(c.first);
    saturation[a.name] = {{"steps", steps}, {"overlap", per_set},
                          {"tokens_per_set", plan.saturation_batches * a.config.train.batch_size * a.config.model.seq_len}};
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  json analysis = {{"saturation", saturation}, {"seconds", secs}};
  write_file_atomic(results_dir + "/analysis.json", analysis.dump(1) + "\n");
  log::info("study: router saturation of " + std::to_string(saturation.size()) + " CPT arms (" +
            std::to_string(int(secs)) + " s)");
}

StudyResults load_results(const std::string& results_dir) {
  StudyResults r;
  r.study = read_json(results_dir + "/study.json");
  r.arms = read_json(results_dir + "/arms.json");
  r.curves = read_json(results_dir + "/curves.json");
  if (!r.arms.is_array()) throw Error(results_dir + "/arms.json: expected an array of arms");
  if (fs::exists(results_dir + "/analysis.json")) r.analysis = read_json(results_dir + "/analysis.json");
  return r;
}

}  // namespace moecpt::report
