#include "report/study.h"

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <toml++/toml.h>

#include "core/atomic_file.h"
#include "core/error.h"
#include "core/log.h"
#include "data/documents.h"
#include "data/prepare.h"
#include "data/tokenizer.h"
#include "report/report.h"
#include "report/report_routing.h"
#include "report/results.h"
#include "train/trainer.h"

namespace moecpt::report {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

std::atomic<bool> g_stop{false};

// --- reading the study recipe ------------------------------------------------

struct RecipeReader {
  std::string path;
  toml::table root;

  [[noreturn]] void fail(const std::string& key, const std::string& problem) const {
    throw Error(path + ": key '" + key + "': " + problem);
  }
  const toml::table* table(const std::string& key, bool required) const {
    const toml::node* n = root.at_path(key).node();
    if (!n) {
      if (required) fail(key, "missing (a table)");
      return nullptr;
    }
    if (!n->is_table()) fail(key, "expected a table");
    return n->as_table();
  }
  static std::string join(const std::string& prefix, const std::string& key) {
    return prefix.empty() ? key : prefix + "." + key;
  }
  std::string str(const toml::table& t, const std::string& prefix, const std::string& key,
                  const std::string* dflt = nullptr) const {
    const toml::node* n = t.get(key);
    if (!n) {
      if (dflt) return *dflt;
      fail(join(prefix, key), "missing (a string)");
    }
    if (!n->is_string()) fail(join(prefix, key), "expected a string");
    return n->as_string()->get();
  }
  double number(const toml::table& t, const std::string& prefix, const std::string& key, double dflt, double lo,
                double hi) const {
    const toml::node* n = t.get(key);
    if (!n) return dflt;
    double v;
    if (n->is_integer()) v = double(n->as_integer()->get());
    else if (n->is_floating_point()) v = n->as_floating_point()->get();
    else fail(join(prefix, key), "expected a number");
    if (!(v >= lo && v <= hi)) {
      std::ostringstream os;
      os << "expected a value in [" << lo << ", " << hi << "], got " << v;
      fail(join(prefix, key), os.str());
    }
    return v;
  }
  int64_t integer(const toml::table& t, const std::string& prefix, const std::string& key, int64_t dflt,
                  int64_t lo) const {
    const toml::node* n = t.get(key);
    if (!n) {
      if (dflt < lo) fail(join(prefix, key), "missing (an integer)");
      return dflt;
    }
    if (!n->is_integer()) fail(join(prefix, key), "expected an integer");
    const int64_t v = n->as_integer()->get();
    if (v < lo) fail(join(prefix, key), "expected an integer >= " + std::to_string(lo) + ", got " + std::to_string(v));
    return v;
  }
  std::vector<std::string> strings(const toml::table& t, const std::string& prefix, const std::string& key) const {
    std::vector<std::string> out;
    const toml::node* n = t.get(key);
    if (!n) return out;
    if (!n->is_array()) fail(join(prefix, key), "expected an array of strings");
    for (const auto& e : *n->as_array()) {
      if (!e.is_string()) fail(join(prefix, key), "expected an array of strings");
      out.push_back(e.as_string()->get());
    }
    return out;
  }
  // Keys a block may hold; anything else is a typo worth an error.
  void only(const toml::table& t, const std::string& prefix, const std::set<std::string>& allowed) const {
    for (const auto& [k, v] : t)
      if (!allowed.count(std::string(k.str()))) {
        std::string list;
        for (const auto& a : allowed) list += (list.empty() ? "" : ", ") + a;
        fail(join(prefix, std::string(k.str())), "unknown key (expected one of: " + list + ")");
      }
  }
};

std::string quoted(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out + "\"";
}
std::string toml_strings(const std::vector<std::string>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + quoted(v[i]);
  return s + "]";
}
std::string toml_number(double v) {
  char buf[40];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  std::string s = buf;
  if (s.find_first_of(".eEn") == std::string::npos) s += ".0";
  return s;
}

// The phase block's checkpoint and evaluation cadence, from counts per arm.
void cadence(std::vector<std::string>& sets, int64_t steps, int64_t evals, int64_t checkpoints) {
  if (evals > 0) sets.push_back("train.eval_every=" + std::to_string(std::max<int64_t>(1, steps / evals)));
  if (checkpoints > 0)
    sets.push_back("train.checkpoint_every=" + std::to_string(std::max<int64_t>(1, steps / checkpoints)));
}

std::string first_difference(const std::string& a, const std::string& b) {
  std::istringstream sa(a), sb(b);
  std::string la, lb;
  while (true) {
    const bool ga = bool(std::getline(sa, la)), gb = bool(std::getline(sb, lb));
    if (!ga && !gb) return "";
    if (la != lb) {
      auto strip = [](std::string s) {
        const auto h = s.find("  #");
        return h == std::string::npos ? s : s.substr(0, h);
      };
      return "'" + strip(gb ? lb : "(end)") + "' on disk vs '" + strip(ga ? la : "(end)") + "' now";
    }
  }
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

std::string duration(double s) {
  char buf[32];
  if (s < 90) std::snprintf(buf, sizeof buf, "%.0f s", s);
  else if (s < 5400) std::snprintf(buf, sizeof buf, "%.1f min", s / 60);
  else std::snprintf(buf, sizeof buf, "%.1f h", s / 3600);
  return buf;
}

// Step checkpoints of a finished arm are only needed for their weights (the
// routing analyses); their optimizer state doubles the disk use for nothing.
void drop_optimizer_state(const std::string& out_dir) {
  const fs::path dir = fs::path(out_dir) / "checkpoints";
  if (!fs::exists(dir)) return;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.is_directory() && e.path().filename().string().rfind("step-", 0) == 0) {
      std::error_code ec;
      fs::remove(e.path() / "optimizer.pt", ec);
    }
}

void prepare_data(const StudyPlan& plan) {
  const auto cfg = load_data_prep_config(plan.data_config);
  std::set<std::string> needed(plan.validation.begin(), plan.validation.end());
  needed.insert(plan.old_data);
  needed.insert(plan.new_data);
  for (const auto& n : needed)
    if (std::find(cfg.corpora.names.begin(), cfg.corpora.names.end(), n) == cfg.corpora.names.end())
      throw Error(plan.data_config + ": the study needs dataset '" + n + "' but [corpora] names does not list it");
  if (!fs::exists(cfg.tokenizer.model)) {
    log::info("study: training the tokenizer (" + cfg.tokenizer.model + ")");
    std::vector<std::vector<Document>> corpora;
    for (const auto& in : cfg.corpora.inputs) corpora.push_back(read_documents(in));
    train_tokenizer(cfg.tokenizer, corpora);
  }
  bool missing = false;
  for (const auto& n : needed)
    for (const char* split : {"train", "val"})
      missing |= !fs::exists(fs::path(cfg.corpora.shard_dir) / n / (std::string(split) + ".bin"));
  if (missing) {
    log::info("study: preparing the shards (" + cfg.corpora.shard_dir + ")");
    prepare_corpora(cfg);
  }
}

// Each invocation of `moecpt study` on a directory appends its wall time and
// phase times to <out>/timings.json; the study's time is their sum (a resumed
// study's report counts every session, not only the last one). Returns the sum:
// {"wall": s, "data": s, "train": s, "saturation": s, "tasks": s, "routing": s, "sessions": n}.
json record_session(const fs::path& out, double wall, const json& phases) {
  const std::string path = (out / "timings.json").string();
  json all = json::array();
  if (fs::exists(path)) {
    all = json::parse(read_file(path), nullptr, false);
    if (!all.is_array()) all = json::array();
  }
  json session = phases;
  session["wall"] = wall;
  all.push_back(session);
  write_file_atomic(path, all.dump(1) + "\n");
  json sum = {{"sessions", all.size()}};
  for (const auto& s : all)
    for (const char* k : {"wall", "data", "train", "saturation", "tasks", "routing"})
      if (s.contains(k) && s[k].is_number()) sum[k] = sum.value(k, 0.0) + s[k].get<double>();
  return sum;
}

}  // namespace

void request_study_stop() {
  g_stop = true;
  request_stop();
}

StudyPlan plan_study(const std::string& recipe_path, const std::string& out_dir, bool quick) {
  if (!fs::exists(recipe_path)) throw Error(recipe_path + ": study recipe not found");
  StudyPlan plan;
  plan.recipe_path = recipe_path;
  plan.out_dir = out_dir;
  plan.quick = quick;
  plan.recipe_text = read_file(recipe_path);
  RecipeReader r{recipe_path, {}};
  try {
    r.root = toml::parse(plan.recipe_text, recipe_path);
  } catch (const toml::parse_error& e) {
    throw Error(recipe_path + ":" + std::to_string(e.source().begin.line) + ": invalid TOML: " +
                std::string(e.description()));
  }
  r.only(r.root, "", {"study", "models", "all", "quick", "pt", "cpt", "full"});
  const fs::path here = fs::path(recipe_path).parent_path();
  auto rel = [&](const std::string& p) { return (here / p).lexically_normal().string(); };

  const toml::table& st = *r.table("study", true);
  r.only(st, "study", {"name", "data", "old", "new", "validation", "replay_fraction", "tie_nats", "tie_mri",
                       "saturation_batches", "tasks", "task_items"});
  plan.name = r.str(st, "study", "name");
  plan.data_config = rel(r.str(st, "study", "data"));
  plan.old_data = r.str(st, "study", "old");
  plan.new_data = r.str(st, "study", "new");
  if (plan.old_data == plan.new_data) r.fail("study.new", "must differ from study.old");
  plan.validation = r.strings(st, "study", "validation");
  for (const auto& d : {plan.old_data, plan.new_data})
    if (std::find(plan.validation.begin(), plan.validation.end(), d) == plan.validation.end())
      plan.validation.insert(plan.validation.begin(), d);
  plan.replay_fraction = r.number(st, "study", "replay_fraction", 0.0, 0, 1);
  plan.tie_nats = r.number(st, "study", "tie_nats", 0.02, 0, 10);
  plan.tie_mri = r.number(st, "study", "tie_mri", 0.02, 0, 1);
  plan.saturation_batches = r.integer(st, "study", "saturation_batches", 4, 1);
  for (const auto& t : r.strings(st, "study", "tasks")) {
    plan.tasks.push_back(rel(t));
    if (!fs::exists(plan.tasks.back())) r.fail("study.tasks", "task file " + plan.tasks.back() + " not found");
  }
  plan.task_items = r.integer(st, "study", "task_items", 0, 0);

  // --quick: the same arms, smaller (a smoke test of the whole pipeline, not of the findings).
  std::vector<std::string> quick_sets;
  if (const auto* q = r.table("quick", false)) {
    r.only(*q, "quick", {"set", "task_items", "saturation_batches", "tasks"});
    if (quick) {
      quick_sets = r.strings(*q, "quick", "set");
      if (q->get("tasks")) {
        plan.tasks.clear();
        for (const auto& t : r.strings(*q, "quick", "tasks")) {
          plan.tasks.push_back(rel(t));
          if (!fs::exists(plan.tasks.back())) r.fail("quick.tasks", "task file " + plan.tasks.back() + " not found");
        }
      }
      plan.task_items = r.integer(*q, "quick", "task_items", plan.task_items, 0);
      plan.saturation_batches = r.integer(*q, "quick", "saturation_batches", plan.saturation_batches, 1);
    }
  }

  // Models, in recipe order.
  std::vector<std::pair<std::string, std::string>> models;
  const toml::table& mt = *r.table("models", true);
  for (const auto& [k, v] : mt) {
    if (!v.is_string()) r.fail("models." + std::string(k.str()), "expected a string (path of a train recipe)");
    models.emplace_back(std::string(k.str()), rel(v.as_string()->get()));
  }
  if (models.empty()) r.fail("models", "lists no model");
  auto model_path = [&](const std::string& key, const std::string& name) -> std::string {
    for (const auto& [n, p] : models)
      if (n == name) return p;
    r.fail(key, "'" + name + "' is not a key of [models]");
  };

  std::vector<std::string> all_sets;
  if (const auto* all = r.table("all", false)) {
    r.only(*all, "all", {"set"});
    all_sets = r.strings(*all, "all", "set");
  }
  struct Phase {
    int64_t steps = 0, evals = 0, checkpoints = 0;
    std::vector<std::string> sets;
  };
  auto phase = [&](const toml::table& t, const std::string& key, bool need_steps) {
    Phase p;
    if (need_steps) {
      const int64_t full = r.integer(t, key, "steps", -1, 1);
      const int64_t q = r.integer(t, key, "quick_steps", full, 1);
      p.steps = quick ? q : full;
    }
    p.evals = r.integer(t, key, "evals", 0, 0);
    p.checkpoints = r.integer(t, key, "checkpoints", 0, 0);
    if (quick) {  // a smoke test: few validation passes and checkpoints (each costs a fixed time)
      p.evals = std::min<int64_t>(p.evals, 2);
      p.checkpoints = std::min<int64_t>(p.checkpoints, 2);
    }
    p.sets = r.strings(t, key, "set");
    return p;
  };
  const toml::table& ptt = *r.table("pt", true);
  r.only(ptt, "pt", {"steps", "quick_steps", "evals", "checkpoints", "set"});
  const Phase pt = phase(ptt, "pt", true);
  const toml::table& cptt = *r.table("cpt", true);
  r.only(cptt, "cpt", {"steps", "quick_steps", "evals", "checkpoints", "set", "variant"});
  const Phase cpt = phase(cptt, "cpt", true);

  const std::string arms_dir = (fs::path(out_dir) / "arms").string();
  auto arm_dir = [&](const std::string& name) { return (fs::path(arms_dir) / name).string(); };
  auto common = [&](const std::string& name, int64_t steps) {
    std::vector<std::string> s = all_sets;
    s.push_back("run.name=" + quoted(name));
    s.push_back("run.out_dir=" + quoted(arm_dir(name)));
    s.push_back("train.steps=" + std::to_string(steps));
    s.push_back("data.validation=" + toml_strings(plan.validation));
    return s;
  };
  auto append = [](std::vector<std::string>& a, const std::vector<std::string>& b) { a.insert(a.end(), b.begin(), b.end()); };

  // PT of every model.
  std::map<std::string, std::string> pt_schedule;
  for (const auto& [m, path] : models) {
    StudyArm a;
    a.name = "pt-" + m;
    a.kind = "pt";
    a.model = m;
    a.variant = "pt";
    auto sets = common(a.name, pt.steps);
    append(sets, pt.sets);
    cadence(sets, pt.steps, pt.evals, pt.checkpoints);
    sets.push_back("data.train=" + toml_strings({plan.old_data}));
    sets.push_back("data.train_weights=[]");
    sets.push_back("data.replay=[]");
    sets.push_back("data.replay_fraction=0.0");
    sets.push_back("train.init_from=\"\"");
    append(sets, quick_sets);
    a.config = load_config(path, sets);
    a.schedule = a.config.schedule.type;
    pt_schedule[m] = a.schedule;
    plan.arms.push_back(std::move(a));
  }

  // CPT variants.
  if (const toml::node* vn = cptt.get("variant")) {
    if (!vn->is_array_of_tables()) r.fail("cpt.variant", "expected [[cpt.variant]] tables");
    std::set<std::string> names;
    size_t vi = 0;
    for (const auto& vnode : *vn->as_array()) {
      const auto& v = *vnode.as_table();
      const std::string key = "cpt.variant[" + std::to_string(vi++) + "]";
      r.only(v, key, {"name", "replay_fraction", "schedule", "models", "set"});
      const std::string vname = r.str(v, key, "name");
      if (!names.insert(vname).second) r.fail(key + ".name", "duplicate variant name '" + vname + "'");
      const double replay = r.number(v, key, "replay_fraction", -1, 0, 1);
      if (replay < 0) r.fail(key + ".replay_fraction", "missing (a number in [0, 1])");
      const std::string sched = r.str(v, key, "schedule");
      if (sched != "rewarm" && sched != "infinite")
        r.fail(key + ".schedule", "expected \"rewarm\" (from the decayed checkpoint) or \"infinite\" "
                                  "(from the pre-anneal checkpoint), got \"" + sched + "\"");
      auto vmodels = r.strings(v, key, "models");
      if (vmodels.empty()) r.fail(key + ".models", "lists no model");
      for (const auto& m : vmodels) {
        const std::string path = model_path(key + ".models", m);
        if (sched == "infinite" && pt_schedule[m] != "infinite")
          r.fail(key + ".schedule", "infinite-schedule CPT starts from the pre-anneal checkpoint, which only a PT "
                                    "with schedule.type = \"infinite\" keeps (the PT of '" + m + "' uses '" +
                                    pt_schedule[m] + "')");
        StudyArm a;
        a.name = "cpt-" + vname + "-" + m;
        a.kind = "cpt";
        a.model = m;
        a.variant = vname;
        a.replay = replay;
        a.schedule = sched;
        a.parent = "pt-" + m;
        a.parent_checkpoint = sched == "infinite" ? "pre_anneal" : "final";
        auto sets = common(a.name, cpt.steps);
        append(sets, cpt.sets);
        append(sets, r.strings(v, key, "set"));
        cadence(sets, cpt.steps, cpt.evals, cpt.checkpoints);
        sets.push_back("data.train=" + toml_strings({plan.new_data}));
        sets.push_back("data.train_weights=[]");
        sets.push_back("data.replay=" + toml_strings({plan.old_data}));
        sets.push_back("data.replay_fraction=" + toml_number(replay));
        sets.push_back("train.init_from=" +
                       quoted((fs::path(arm_dir(a.parent)) / "checkpoints" / a.parent_checkpoint).string()));
        append(sets, quick_sets);
        a.config = load_config(path, sets);
        plan.arms.push_back(std::move(a));
      }
    }
  }

  // Full re-training on D0 ∪ D1 with the PT + CPT tokens.
  if (const auto* ft = r.table("full", false)) {
    r.only(*ft, "full", {"models", "evals", "checkpoints", "set"});
    Phase full = phase(*ft, "full", false);
    full.steps = pt.steps + cpt.steps;
    for (const auto& m : r.strings(*ft, "full", "models")) {
      const std::string path = model_path("full.models", m);
      StudyArm a;
      a.name = "full-" + m;
      a.kind = "full";
      a.model = m;
      a.variant = "full";
      a.replay = plan.replay_fraction;
      auto sets = common(a.name, full.steps);
      append(sets, full.sets);
      cadence(sets, full.steps, full.evals, full.checkpoints);
      sets.push_back("data.train=" + toml_strings({plan.old_data, plan.new_data}));
      const double w_old = double(pt.steps) + plan.replay_fraction * double(cpt.steps);
      const double w_new = (1 - plan.replay_fraction) * double(cpt.steps);
      sets.push_back("data.train_weights=[" + toml_number(w_old) + ", " + toml_number(w_new) + "]");
      sets.push_back("data.replay=[]");
      sets.push_back("data.replay_fraction=0.0");
      sets.push_back("train.init_from=\"\"");
      append(sets, quick_sets);
      a.config = load_config(path, sets);
      a.schedule = a.config.schedule.type;
      plan.arms.push_back(std::move(a));
    }
  }
  return plan;
}

bool run_study(const StudyPlan& plan, const StudyOptions& opts) {
  g_stop = false;
  const auto t0 = std::chrono::steady_clock::now();
  const fs::path out(plan.out_dir);
  fs::create_directories(out / "arms");
  // what a killed earlier session left half-written (the arms' run directories
  // are cleaned by their trainers)
  int stale = remove_stale_temp_files(out.string());
  if (fs::exists(out / "results")) stale += remove_stale_temp_files((out / "results").string());
  if (stale > 0) log::info(out.string() + ": removed " + std::to_string(stale) + " temporary file(s) of a killed earlier session");

  // One directory holds one kind of study: a --quick study and a default one
  // have different step counts, so their arms must not mix.
  const std::string marker = (out / "study.json").string();
  if (fs::exists(marker)) {
    json m = json::parse(read_file(marker), nullptr, false);
    if (!m.is_discarded() && m.value("quick", plan.quick) != plan.quick)
      throw Error(marker + ": this directory holds a " + std::string(plan.quick ? "default" : "--quick") +
                  " study; run the " + (plan.quick ? "--quick" : "default") +
                  " study with another --out, or delete the directory");
  }
  write_file_atomic(marker, json{{"name", plan.name}, {"recipe", plan.recipe_path}, {"quick", plan.quick}}.dump(2) + "\n");

  // Wall time of each phase of this invocation (results/study.json "phases").
  json phases = json::object();
  auto timed = [&](const std::string& phase, auto&& fn) {
    const auto p0 = std::chrono::steady_clock::now();
    fn();
    const double secs = seconds_since(p0);
    phases[phase] = phases.value(phase, 0.0) + secs;
    return secs;
  };
  if (opts.prepare_data) {
    const double secs = timed("data", [&] { prepare_data(plan); });
    if (secs >= 1) log::info("study: data ready (" + duration(secs) + ")");
  }

  // Arms already on disk must have been started with the config the recipe gives now.
  for (const auto& a : plan.arms) {
    const std::string saved = a.config.run.out_dir + "/config.toml";
    if (!fs::exists(saved)) continue;
    const std::string diff = first_difference(to_toml(a.config), read_file(saved));
    if (!diff.empty())
      throw Error(saved + ": arm '" + a.name + "' was started with another config than " + plan.recipe_path +
                  " gives now (" + diff + "); delete " + a.config.run.out_dir + " to re-run it, or use another --out");
  }

  // Seconds per step of each model, from the arms that finished (ETA).
  std::map<std::string, double> sec_per_step;
  auto finished = [](const StudyArm& a) { return fs::exists(a.config.run.out_dir + "/summary.json"); };
  auto note_speed = [&](const StudyArm& a) {
    json s = json::parse(read_file(a.config.run.out_dir + "/summary.json"), nullptr, false);
    if (s.is_discarded() || s.value("steps", 0) <= 0) return;
    const double sps = s.value("seconds", 0.0) / double(s.value("steps", 1));
    if (sps > 0 && !sec_per_step.count(a.model)) sec_per_step[a.model] = sps;
  };
  for (const auto& a : plan.arms)
    if (finished(a)) note_speed(a);
  auto eta = [&](size_t from) {
    double total = 0, mean = 0;
    for (const auto& [m, s] : sec_per_step) mean += s / double(sec_per_step.size());
    for (size_t i = from; i < plan.arms.size(); ++i) {
      const auto& a = plan.arms[i];
      if (finished(a)) continue;
      auto it = sec_per_step.find(a.model);
      if (it == sec_per_step.end() && mean == 0) return -1.0;
      total += double(a.config.train.steps) * (it != sec_per_step.end() ? it->second : mean);
    }
    return total;
  };

  const size_t n = plan.arms.size();
  size_t done = 0, skipped = 0;
  json arm_seconds = json::object();  // wall time of each arm trained in this invocation (setup included)
  for (size_t i = 0; i < n; ++i) {
    const auto& a = plan.arms[i];
    char head[64];
    std::snprintf(head, sizeof head, "study: arm %zu/%zu ", i + 1, n);
    if (finished(a)) {
      ++done, ++skipped;
      log::info(head + a.name + ": finished earlier (" + a.config.run.out_dir + "), skipped");
      continue;
    }
    if (!a.parent.empty()) {
      const std::string from = a.config.train.init_from;
      if (!fs::exists(from + "/model.safetensors"))
        throw Error(from + ": arm '" + a.name + "' starts from this checkpoint of '" + a.parent +
                    "', which is missing (did '" + a.parent + "' finish?)");
    }
    const bool resume = !latest_checkpoint(a.config.run.out_dir).empty();
    const double e = eta(i);
    log::info(head + a.name + ": " + std::to_string(a.config.train.steps) + " steps" +
              (a.parent.empty() ? "" : " from " + a.parent + "/" + a.parent_checkpoint) +
              (resume ? ", resuming from " + latest_checkpoint(a.config.run.out_dir) : "") + " — elapsed " +
              duration(seconds_since(t0)) + (e >= 0 ? ", study ETA " + duration(e) : ""));
    TrainOptions topts;
    topts.resume = resume;
    PhaseSummary s;
    const double secs = timed("train", [&] { s = train(a.config, topts); });
    arm_seconds[a.name] = secs;
    if (s.steps < a.config.train.steps || g_stop) {
      log::info("study: interrupted in arm '" + a.name + "' at step " + std::to_string(s.steps) +
                "; run the same command again to resume");
      record_session(out, seconds_since(t0), phases);
      return false;
    }
    drop_optimizer_state(a.config.run.out_dir);
    note_speed(a);
    ++done;
    char msg[96];  // the arm's whole time: setup, steps, validation passes, checkpoints
    std::snprintf(msg, sizeof msg, ": %lld steps in %.1f s", (long long)s.steps, secs);
    log::info(head + a.name + msg);
  }
  log::info("study: all " + std::to_string(n) + " arms trained (" + duration(seconds_since(t0)) + ")");

  const std::string results_dir = (out / "results").string();
  fs::create_directories(results_dir);
  if (opts.analyses) run_analyses(plan, results_dir, phases, [] { return g_stop.load(); });
  phases["arms"] = arm_seconds;
  phases["arms_trained"] = done - skipped;
  if (g_stop) {
    log::info("study: interrupted during the analyses; run the same command again to finish them");
    record_session(out, seconds_since(t0), phases);
    return false;
  }
  if (opts.analyses) {
    const double secs = timed("routing", [&] { save_routing_diagnostics(plan, results_dir); });  // analysis.json "routing" (report_routing.h)
    log::info("study: routing diagnostics (" + duration_text(secs) + ")");
  }
  // The report's own time is negligible (milliseconds); the wall time saved
  // covers everything before it: data, training and analyses, summed over
  // every session of this study directory.
  const double wall = seconds_since(t0);
  const json total = record_session(out, wall, phases);
  json saved = total;
  saved["this_session"] = phases;
  saved["this_session"]["wall"] = wall;
  collect_results(plan, results_dir, total.value("wall", wall), saved);
  const auto res = load_results(results_dir);
  write_file_atomic((out / "report.html").string(), render_report(res));
  log::info("study: report written to " + (out / "report.html").string() + " — this session " + duration_text(wall) +
            " (" + phase_summary(phases) + "); whole study " + duration_text(total.value("wall", wall)) + " in " +
            std::to_string(total.value("sessions", 1)) + " session(s)");
  print_findings(res);
  return true;
}

}  // namespace moecpt::report
