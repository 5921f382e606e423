#include "report/results.h"

#include <chrono>
#include <cmath>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <optional>
#include <thread>
#include <unistd.h>

#include "core/atomic_file.h"
#include "core/error.h"
#include "core/log.h"
#include "analysis/model_runner.h"
#include "analysis/reports.h"
#include "analysis/tasks.h"

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

}  // namespace

void collect_results(const StudyPlan& plan, const std::string& results_dir, double wall_seconds, const json& phases) {
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
                {"phases", phases},
                {"train_seconds", train_seconds},
                {"created", utc_now()},
                {"machine", {{"hostname", host}, {"cores", std::thread::hardware_concurrency()}}},
                {"arms_planned", planned},
                {"arms_finished", finished}};
  write_file_atomic(results_dir + "/study.json", study.dump(1) + "\n");
  write_file_atomic(results_dir + "/arms.json", arms.dump(1) + "\n");
  write_file_atomic(results_dir + "/curves.json", curves.dump() + "\n");
}

namespace {

json read_json_or_null(const std::string& path) {
  if (!fs::exists(path)) return nullptr;
  json j = json::parse(read_file(path), nullptr, false);
  return j.is_discarded() ? json(nullptr) : j;
}

// The first `items` lines of a task file (0 = the file itself), copied under
// results/tasks/ so the items scored are on disk next to the results.
std::string bounded_task(const std::string& task, int64_t items, const std::string& results_dir) {
  if (items <= 0) return task;
  const std::string dir = results_dir + "/tasks";
  fs::create_directories(dir);
  const std::string out = dir + "/" + fs::path(task).stem().string() + "-first" + std::to_string(items) + ".jsonl";
  std::ifstream in(task);
  if (!in) throw Error(task + ": cannot read the task file");
  std::string line, text;
  for (int64_t n = 0; n < items && std::getline(in, line);)
    if (!line.empty()) text += line + "\n", ++n;
  write_file_atomic(out, text);
  return out;
}

std::string task_name(const std::string& path) { return fs::path(path).stem().string(); }

}  // namespace

std::string duration_text(double seconds) {
  if (!std::isfinite(seconds)) return "?";
  const long t = std::lround(seconds);
  char buf[48];
  if (t < 60) std::snprintf(buf, sizeof buf, "%ld s", t);
  else if (t < 3600) std::snprintf(buf, sizeof buf, "%ld min %ld s", t / 60, t % 60);
  else std::snprintf(buf, sizeof buf, "%ld h %ld min", t / 3600, (t % 3600) / 60);
  return buf;
}

std::string phase_summary(const json& phases) {
  std::string s;
  auto add = [&](const char* key, const char* label) {
    if (!phases.contains(key) || !phases[key].is_number()) return;
    s += (s.empty() ? "" : ", ") + std::string(label) + " " + duration_text(phases[key].get<double>());
  };
  add("data", "data");
  add("train", "training");
  add("saturation", "router saturation");
  add("tasks", "task evaluations");
  add("routing", "routing diagnostics");
  return s;
}

// Router saturation (analysis::saturation_report) of every MoE CPT arm and
// zero-shot task accuracies (analysis::eval_report) of every arm's final
// checkpoint. Each arm's results are cached in <arm>/analysis.json with the
// settings that produced them, so a re-run (or a resumed study) redoes only
// what changed.
void run_analyses(const StudyPlan& plan, const std::string& results_dir, json& phases,
                  const std::function<bool()>& stop) {
  fs::create_directories(results_dir);
  json saturation = json::object(), tasks = json::object();
  double sat_secs = 0, task_secs = 0;
  std::vector<std::string> task_files;
  for (const auto& t : plan.tasks) task_files.push_back(bounded_task(t, plan.task_items, results_dir));
  int n_sat = 0, n_task = 0;
  for (const auto& a : plan.arms) {
    if (stop && stop()) break;
    const std::string dir = a.config.run.out_dir;
    const std::string final_dir = dir + "/checkpoints/final";
    if (!fs::exists(final_dir + "/model.safetensors")) continue;
    const std::string cache_path = dir + "/analysis.json";
    json cache = read_json_or_null(cache_path);
    if (!cache.is_object()) cache = json::object();
    bool changed = false;

    // Router saturation: the CPT phase's checkpoints — its start (the PT
    // checkpoint, step 0 here), every kept step checkpoint, the final one.
    if (a.kind == "cpt" && a.config.model.ffn == "moe") {
      std::vector<std::pair<int64_t, std::string>> ckpts = {{0, a.config.train.init_from}};
      for (const auto& e : fs::directory_iterator(dir + "/checkpoints")) {
        const std::string n = e.path().filename().string();
        if (n.size() == 13 && n.rfind("step-", 0) == 0 && fs::exists(e.path() / "model.safetensors")) {
          const int64_t st = std::stoll(n.substr(5));
          if (st < a.config.train.steps) ckpts.emplace_back(st, e.path().string());  // the last one is `final`
        }
      }
      std::sort(ckpts.begin(), ckpts.end());
      ckpts.emplace_back(a.config.train.steps, final_dir);
      analysis::SaturationOptions so;
      for (const auto& c : ckpts) so.checkpoints.push_back(c.second);
      so.datasets = {plan.old_data, plan.new_data};
      so.data.max_tokens = plan.saturation_batches * a.config.train.batch_size * a.config.model.seq_len;
      const json key = {{"checkpoints", so.checkpoints}, {"datasets", so.datasets}, {"max_tokens", so.data.max_tokens}};
      if (!cache.contains("saturation") || cache["saturation"].value("key", json()) != key) {
        const auto t0 = std::chrono::steady_clock::now();
        const json rep = analysis::saturation_report(so);
        const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        sat_secs += secs;
        ++n_sat;
        // The report's layout: per data set, rows [checkpoint][MoE layer].
        json steps = json::array(), overlap = json::object(), changed_share = json::object();
        for (const auto& c : ckpts) steps.push_back(c.first);
        int64_t tokens = 0;
        for (const auto& ds : so.datasets) {
          json rows = json::array(), ch = json::array();
          for (const auto& c : rep["datasets"][ds]["checkpoints"]) rows.push_back(c["overlap"]), ch.push_back(c["changed_share"]);
          overlap[ds] = rows;
          changed_share[ds] = ch;
          tokens = rep["datasets"][ds].value("tokens", int64_t(0));
        }
        cache["saturation"] = {{"key", key},
                               {"result", {{"steps", steps}, {"overlap", overlap}, {"changed_share", changed_share},
                                           {"tokens_per_set", tokens}, {"seconds", secs}}}};
        changed = true;
      }
      saturation[a.name] = cache["saturation"]["result"];
    }

    // Zero-shot tasks on the final checkpoint.
    if (!task_files.empty()) {
      json& tc = cache["tasks"];
      if (!tc.is_object()) tc = json::object();
      json per = json::object();
      std::optional<analysis::LoadedModel> model;  // loaded once, for the first task not in the cache
      for (size_t i = 0; i < task_files.size(); ++i) {
        if (stop && stop()) break;
        const std::string name = task_name(plan.tasks[i]);
        const json key = {{"task", plan.tasks[i]}, {"items", plan.task_items}};
        if (!tc.contains(name) || tc[name].value("key", json()) != key) {
          const auto t0 = std::chrono::steady_clock::now();
          analysis::EvalOptions eo;
          eo.checkpoint = final_dir;
          eo.task = task_files[i];
          eo.batch_size = 32;
          if (!model) model.emplace(analysis::load_model(final_dir, eo.device));
          json rep = analysis::eval_report(*model, eo);
          const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
          task_secs += secs;
          ++n_task;
          tc[name] = {{"key", key},
                      {"result", {{"items", rep["items"]}, {"acc", rep["acc"]}, {"acc_norm", rep["acc_norm"]},
                                  {"chance", rep["chance"]}, {"seconds", secs}}}};
          changed = true;
        }
        per[name] = tc[name]["result"];
      }
      tasks[a.name] = per;
    }
    if (changed) write_file_atomic(cache_path, cache.dump(1) + "\n");
  }
  phases["saturation"] = phases.value("saturation", 0.0) + sat_secs;
  phases["tasks"] = phases.value("tasks", 0.0) + task_secs;
  json task_list = json::array();
  for (size_t i = 0; i < plan.tasks.size(); ++i) task_list.push_back({{"name", task_name(plan.tasks[i])}, {"path", plan.tasks[i]}});
  json analysis = {{"saturation", saturation},
                   {"tasks", tasks},
                   {"task_files", task_list},
                   {"task_items", plan.task_items},
                   {"seconds", {{"saturation", sat_secs}, {"tasks", task_secs}}}};
  write_file_atomic(results_dir + "/analysis.json", analysis.dump(1) + "\n");
  char msg[200];
  std::snprintf(msg, sizeof msg, "study: router saturation of %d CPT arm(s) in %.1f s, %d task evaluation(s) in %.1f s "
                "(%zu cached)", n_sat, sat_secs, n_task, task_secs,
                size_t(saturation.size() - size_t(n_sat)));
  log::info(msg);
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
