#include "train/trainer.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <optional>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "core/atomic_file.h"
#include "core/error.h"
#include "core/log.h"
#include "data/mixture.h"
#include "data/shard.h"
#include "model/flops.h"
#include "model/fused_ce.h"
#include "model/moe_expert_parallel.h"
#include "model/torch_compat.h"
#include "model/transformer.h"
#include "model/weight_casts.h"
#include "train/checkpoint.h"
#include "train/cuda_graph.h"
#include "train/distributed.h"
#include "train/optimizer.h"
#include "train/schedule.h"

namespace moecpt {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

std::atomic<bool> g_stop{false};

std::string shard_path(const DataConfig& d, const std::string& name, const std::string& split) {
  return (fs::path(d.shard_dir) / name / (split + ".bin")).string();
}

torch::Tensor to_tensor(const Batch& b, const torch::Device& dev) {
  auto t = torch::from_blob(const_cast<int64_t*>(b.tokens.data()), {b.batch_size, b.seq_len + 1}, torch::kInt64);
  return t.to(dev, /*non_blocking=*/false, /*copy=*/true);
}

// Next-token loss of a batch of windows [B, T+1].
struct StepLosses {
  torch::Tensor lm, aux, z;
  std::vector<model::RoutingInfo> routing;
};
StepLosses forward_losses(model::Transformer& m, const torch::Tensor& windows_BT1) {
  const int64_t T = windows_BT1.size(1) - 1;
  auto inputs = windows_BT1.narrow(1, 0, T);
  auto targets = windows_BT1.narrow(1, 1, T);
  // Output head and cross-entropy fused (model/fused_ce.h): same loss and
  // gradients as cross_entropy(logits), without the [B·T, V] logits in memory.
  auto out = model::forward_loss(*m, inputs, targets);
  return {out.lm_loss, out.aux_loss, out.z_loss, std::move(out.routing)};
}


// Routing statistics of one layer from its per-expert slot counts (SPEC §5):
// MRI = max_i share of the tokens that chose i (k/E balanced … 1);
// loads = f_i = share of the k·T routed slots that went to i (sums to 1).
struct LayerRouting {
  double mri = 0;
  std::vector<double> loads;
};
LayerRouting routing_stats(const torch::Tensor& counts_E, int64_t tokens) {
  auto c = counts_E.to(torch::kCPU).to(torch::kFloat64);
  LayerRouting r;
  r.mri = c.max().item<double>() / double(tokens);
  auto f = c / c.sum().clamp_min(1);
  r.loads.assign(f.data_ptr<double>(), f.data_ptr<double>() + f.numel());
  return r;
}

// Data parallel: rank r scores batches r, r+W, …; loss sums, token counts and
// routed-slot counts are summed over ranks, so every rank gets the result one
// process would compute (up to the order of the floating-point sums).
// Expert parallel (lockstep): every forward is a collective, so every rank runs
// the same number of them; a rank short of a batch runs batch 0 and drops it.
EvalResult evaluate(model::Transformer& m, const std::vector<Batch>& batches, const torch::Device& dev,
                    dist::Group* group = nullptr, bool lockstep = false) {
  torch::NoGradGuard no_grad;
  const bool was_training = m->is_training();
  m->eval();  // inference-mode routing (plain top-k for Sinkhorn)
  EvalResult r;
  double loss_sum = 0;
  std::vector<torch::Tensor> counts;
  const size_t W = group ? size_t(group->size()) : 1, rank = group ? size_t(group->rank()) : 0;
  const size_t n_runs = lockstep ? (batches.size() + W - 1) / W * W : batches.size();
  for (size_t i = rank; i < n_runs; i += W) {
    const auto& b = batches[i < batches.size() ? i : 0];
    auto l = forward_losses(m, to_tensor(b, dev));
    if (i >= batches.size()) continue;
    const int64_t n = b.batch_size * b.seq_len;
    loss_sum += l.lm.item<double>() * double(n);
    r.tokens += n;
    if (counts.empty()) counts.resize(l.routing.size());
    for (size_t i = 0; i < l.routing.size(); ++i)
      counts[i] = counts[i].defined() ? counts[i] + l.routing[i].tokens_per_expert_E : l.routing[i].tokens_per_expert_E;
  }
  if (group) {
    const auto n_moe = m->moe_layer_indices().size();
    const int64_t E = m->config().n_experts;
    if (counts.empty()) counts.assign(n_moe, torch::zeros({E}, torch::TensorOptions().dtype(torch::kInt64).device(dev)));
    std::vector<torch::Tensor> parts{torch::tensor({loss_sum, double(r.tokens)}, torch::kFloat64).to(dev)};
    for (auto& c : counts) parts.push_back(c.to(torch::kFloat64));
    auto all = group->sum(torch::cat(parts), "evaluation all-reduce").cpu();
    loss_sum = all[0].item<double>();
    r.tokens = int64_t(std::llround(all[1].item<double>()));
    for (size_t i = 0; i < counts.size(); ++i) counts[i] = all.narrow(0, 2 + int64_t(i) * E, E).to(torch::kInt64);
  }
  r.loss = loss_sum / double(std::max<int64_t>(1, r.tokens));
  for (auto& c : counts) {
    auto st = routing_stats(c, r.tokens);
    r.mri.push_back(st.mri);
    r.loads.push_back(std::move(st.loads));
  }
  if (was_training) m->train();
  return r;
}

json eval_json(const std::map<std::string, EvalResult>& evals) {
  json j = json::object();
  for (const auto& [name, e] : evals)
    j[name] = {{"loss", e.loss}, {"tokens", e.tokens}, {"mri", e.mri}, {"loads", e.loads}};
  return j;
}

std::string fmt(double x, int prec = 4) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", prec, x);
  return buf;
}

std::string duration(double s) {
  char buf[32];
  if (s < 90) std::snprintf(buf, sizeof buf, "%.0fs", s);
  else if (s < 5400) std::snprintf(buf, sizeof buf, "%.1fm", s / 60);
  else std::snprintf(buf, sizeof buf, "%.1fh", s / 3600);
  return buf;
}

// Step checkpoints are checkpoints/step-00000123; the newest is the resume point.
std::string step_dir(const fs::path& out, int64_t step) {
  char name[32];
  std::snprintf(name, sizeof name, "step-%08lld", (long long)step);
  return (out / "checkpoints" / name).string();
}
std::vector<std::pair<int64_t, std::string>> step_checkpoints(const fs::path& out) {
  std::vector<std::pair<int64_t, std::string>> found;
  const fs::path dir = out / "checkpoints";
  if (!fs::exists(dir)) return found;
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    if (e.is_directory() && name.size() == 13 && name.rfind("step-", 0) == 0 &&
        name.find_first_not_of("0123456789", 5) == std::string::npos && fs::exists(e.path() / "trainer.json"))
      found.emplace_back(std::stoll(name.substr(5)), e.path().string());
  }
  std::sort(found.begin(), found.end());
  return found;
}

}  // namespace

void request_stop() { g_stop = true; }

std::string latest_checkpoint(const std::string& out_dir) {
  auto all = step_checkpoints(out_dir);
  return all.empty() ? "" : all.back().second;
}

PhaseSummary train(const Config& cfg, const TrainOptions& opts) {
  g_stop = false;
  const auto t_start = std::chrono::steady_clock::now();
  // Data parallel (docs/distributed.md): WORLD_SIZE > 1 in the environment. The
  // sampler, checkpoints and metrics are those of the global batch, so a run
  // does not depend on the number of ranks; rank 0 writes every file.
  const dist::Env denv = dist::env_from_environment();
  const int64_t W = denv.world_size;
  const bool root = denv.rank == 0;
  // Ranks on one machine share its cores.
  const int threads = cfg.run.threads > 0 ? int(cfg.run.threads)
                                          : int(std::max(1u, std::thread::hardware_concurrency() /
                                                                 unsigned(std::max(1, denv.local_world_size))));
  torch::set_num_threads(threads);
  if (cfg.run.device == "cuda" && !torch::cuda::is_available())
    throw Error("run.device = \"cuda\" but this build/machine has no CUDA device");
  const torch::Device dev(cfg.run.device == "cuda" ? torch::kCUDA : torch::kCPU, cfg.run.device == "cuda" && W > 1 ? int8_t(denv.local_rank) : int8_t(-1));
  torch::manual_seed(uint64_t(cfg.run.seed));
  const int64_t micro = cfg.train.micro_batch_size > 0 ? cfg.train.micro_batch_size : cfg.train.batch_size;
  std::shared_ptr<dist::Group> group;
  if (W > 1) {
    // batch_size and micro_batch_size are global: every rank runs 1/W of each micro-batch.
    if (micro % W != 0)
      throw Error("train.micro_batch_size (or batch_size) = " + std::to_string(micro) +
                  " is not divisible by WORLD_SIZE = " + std::to_string(W) +
                  "; batch sizes are global, each rank takes an equal share of every micro-batch");
    if (!root) log::set_quiet(true);
    group = dist::Group::create(denv, dev);
    log::info("data parallel: " + std::to_string(W) + " ranks on " + group->backend() + " via " + denv.master_addr +
              ":" + std::to_string(denv.master_port));
  }

  const fs::path out(cfg.run.out_dir);
  if (root) {
    create_directories_or_throw((out / "checkpoints").string());
    if (const int n = remove_stale_temp_files(out.string()))
      log::info(out.string() + ": removed " + std::to_string(n) + " temporary file(s) of a killed earlier run");
    write_effective_config(cfg, (out / "config.toml").string());
  }

  // --- data -----------------------------------------------------------------
  const auto& d = cfg.data;
  std::vector<MixtureSource> sources;
  for (size_t i = 0; i < d.train.size(); ++i)
    if (d.replay_fraction < 1)
      sources.push_back({d.train[i], Shard::open(shard_path(d, d.train[i], "train")),
                         d.train_weights.empty() ? 1.0 : d.train_weights[i], false});
  if (d.replay_fraction > 0)
    for (const auto& name : d.replay) sources.push_back({name, Shard::open(shard_path(d, name, "train")), 1.0, true});
  for (const auto& s : sources)
    if (int64_t(s.shard->info().vocab_size) > cfg.model.vocab_size)
      throw Error(s.shard->path() + ": shard vocabulary (" + std::to_string(s.shard->info().vocab_size) +
                  ") is larger than model.vocab_size (" + std::to_string(cfg.model.vocab_size) + ")");
  MixtureSampler sampler(sources, d.replay_fraction, cfg.model.seq_len, cfg.train.batch_size, uint64_t(cfg.run.seed));
  std::map<std::string, std::vector<Batch>> val_sets;
  for (const auto& name : d.validation)
    val_sets[name] = fixed_eval_batches(Shard::open(shard_path(d, name, "val")), cfg.model.seq_len,
                                        cfg.train.batch_size, cfg.train.eval_batches);

  // --- model and optimizer ----------------------------------------------------
  model::Transformer m(cfg.model, cfg.router);
  m->to(dev);
  m->set_activation_checkpointing(cfg.train.recompute_every());
  m->set_bf16_residual(cfg.run.residual_dtype == "bfloat16");
  if (dev.is_cpu() && cfg.run.dtype == "bfloat16" && !compat::cpu_has_fast_bf16_matmul())
    log::warn("run.dtype = bfloat16 on a CPU without AVX-512: LibTorch's bf16 matmuls run a slow fallback here "
              "(a bf16 step measured 11x slower than float32 on an AVX2 machine; docs/performance.md)");
  auto optimizer = make_adamw(*m, cfg.optim);
  int64_t start_step = 0;
  json resumed_state = json::object();
  const std::string resume_dir = opts.resume ? latest_checkpoint(out.string()) : "";
  if (!resume_dir.empty()) {
    // Resuming with another model, router or data mixture would silently train
    // something else: refuse, naming the checkpoint's config.
    auto what_matters = [](const Config& c) {
      Config x;
      x.model = c.model;
      x.router = c.router;
      x.data = c.data;
      x.train.batch_size = c.train.batch_size;
      return to_toml(x);
    };
    const std::string saved_path = resume_dir + "/config.toml";
    if (what_matters(load_config(saved_path)) != what_matters(cfg))
      throw Error(saved_path + ": the checkpoint was written with a different model, router, data or batch size "
                               "than this run's config; resume with the recipe that started the run");
    load_model_weights(resume_dir, *m);
    load_optimizer_state(resume_dir, *optimizer);
    resumed_state = load_trainer_state(resume_dir);
    start_step = resumed_state.at("step").get<int64_t>();
    sampler.restore(sampler_state_from_json(resumed_state.at("sampler")));
    log::info("resumed " + resume_dir + " at step " + std::to_string(start_step));
  } else if (!cfg.train.init_from.empty()) {
    load_model_weights(cfg.train.init_from, *m);
    if (cfg.train.init_optimizer) load_optimizer_state(cfg.train.init_from, *optimizer);
    log::info("initialised weights" + std::string(cfg.train.init_optimizer ? " and optimizer" : "") + " from " +
              cfg.train.init_from);
  }

  // Every rank starts from rank 0's weights (they are equal already when
  // seeded alike or loaded from one checkpoint; this makes it a fact).
  std::unique_ptr<dist::GradReducer> reducer;
  std::unique_ptr<model::ExpertSharding> ep;  // expert parallel (docs/distributed.md)
  if (cfg.parallel.expert_parallel > 1 && !group)
    throw Error("parallel.expert_parallel = " + std::to_string(cfg.parallel.expert_parallel) +
                " needs that many processes (moecpt launch --nproc N, or torchrun); this is one process — "
                "set parallel.expert_parallel = 1 (checkpoints do not depend on it)");
  if (group) {
    dist::broadcast_module(*group, *m);
    if (cfg.parallel.expert_parallel > 1) {
      ep = std::make_unique<model::ExpertSharding>(*m, group, cfg.parallel.expert_parallel);
      ep->shard(optimizer.get());
      log::info(ep->describe());
    }
    const char* mb = std::getenv("MOECPT_DDP_BUCKET_MB");
    const char* ov = std::getenv("MOECPT_DDP_OVERLAP");
    const int64_t bucket_bytes = int64_t((mb && *mb ? std::atof(mb) : 25.0) * 1024 * 1024);
    const bool overlap = !(ov && std::string(ov) == "0");
    std::vector<torch::Tensor> replicated;  // expert weights of EP are reduced by ep->reduce_expert_grads()
    for (auto& p : ep ? ep->replicated_params() : m->parameters())
      if (p.requires_grad()) replicated.push_back(p);
    reducer = std::make_unique<dist::GradReducer>(group, replicated, std::max<int64_t>(bucket_bytes, 1), overlap);
    log::info("gradient all-reduce: " + std::to_string(reducer->n_buckets()) + " bucket(s), " +
              (overlap ? "overlapped with backward" : "after backward"));
  }
  // Global top-k aux loss: routers sum their f_i counts over ranks (training
  // forward only). MOECPT_DP_AUX=local keeps each rank's own f_i instead (the
  // per-rank definition of other frameworks; for comparisons, docs/distributed.md).
  const char* aux_mode = std::getenv("MOECPT_DP_AUX");
  const bool local_aux = aux_mode && std::string(aux_mode) == "local";
  if (group && local_aux) log::info("MOECPT_DP_AUX=local: aux loss from each rank's own f_i (not the global batch's)");
  auto set_dp_sum = [&](bool on) {
    if (!group || local_aux) return;
    for (auto& r : m->routers())
      r->dp_sum = on ? std::function<torch::Tensor(const torch::Tensor&)>(
                           [g = group.get()](const torch::Tensor& t) { return g->sum(t, "aux-loss statistics all-reduce"); })
                     : nullptr;
  };

  const auto params = model::count_params(cfg.model);
  const int64_t flops_per_token = model::train_flops_per_token(cfg.model);
  const int64_t tokens_per_step = cfg.train.batch_size * cfg.model.seq_len;
  const int64_t n_micro = cfg.train.batch_size / micro;
  // The weights' bf16 copies made once per step, not once per micro-batch (model/weight_casts.h).
  const bool keep_casts = model::step_casts_wanted(n_micro, cfg.train.cuda_graph, cfg.train.recompute_every() > 0);
  const int64_t anneal_at = anneal_start_step(cfg.schedule, cfg.train.steps);
  log::info(cfg.run.name + ": " + std::to_string(params.total) + " params (" + std::to_string(params.active) +
            " active), " + std::to_string(cfg.train.steps) + " steps × " + std::to_string(tokens_per_step) +
            " tokens" + (n_micro > 1 ? " in " + std::to_string(n_micro) + " micro-batches" : "") + ", " +
            std::to_string(threads) + " threads, " + cfg.run.dtype +
            (cfg.train.cuda_graph ? ", CUDA graphs" : "") +
            (keep_casts && cfg.run.dtype == "bfloat16" ? ", weight casts kept across a step's micro-batches" : ""));

  // One micro-batch (train/cuda_graph.h): forward on mb_rows, backward of its
  // share of the batch loss; returns [lm, aux, z (each / n_micro), the slot
  // counts of every MoE layer, Sinkhorn's [iterations, error] of every Sinkhorn
  // layer] as one fp64 device vector, whose layout the body notes each time it
  // runs (eagerly, or when captured). With train.cuda_graph it is replayed as
  // a CUDA graph that reads mb_rows, which then is a fixed tensor the step
  // copies each micro-batch into.
  if (cfg.train.cuda_graph) {
    check_cuda_graph_support("train.cuda_graph = true", "run.device = \"cuda\"", dev, cfg.model, cfg.router);
    if (group)
      throw Error("train.cuda_graph = true runs in one process only (data and expert parallelism talk to the "
                  "other ranks inside the step); set it to false");
  }
  torch::Tensor mb_rows;
  if (cfg.train.cuda_graph)
    mb_rows = torch::zeros({micro, cfg.model.seq_len + 1}, torch::TensorOptions().dtype(torch::kInt64).device(dev));
  bool arm_reducer = false;  // data parallel: the last micro-batch's backward starts the all-reduce
  struct {
    std::vector<int64_t> counts;  // experts per MoE layer
    int64_t sinkhorn_layers = 0;
  } layout;
  MicroStepGraphs micro_steps(
      [&]() -> torch::Tensor {
        std::optional<compat::Autocast> autocast;
        if (cfg.run.dtype == "bfloat16") autocast.emplace(dev);
        auto l = forward_losses(m, mb_rows);
        autocast.reset();
        if (arm_reducer) reducer->arm();
        // Equal-sized micro-batches: the mean of their losses is the batch loss
        // (and with W ranks, the mean over ranks after the gradient all-reduce).
        ((l.lm + l.aux + l.z) / double(n_micro)).backward();
        std::vector<torch::Tensor> parts{
            torch::stack({l.lm.detach(), l.aux.detach(), l.z.detach()}).to(torch::kFloat64) / double(n_micro)};
        layout.counts.clear();
        layout.sinkhorn_layers = 0;
        for (const auto& r : l.routing) {
          parts.push_back(r.tokens_per_expert_E.to(torch::kFloat64));
          layout.counts.push_back(r.tokens_per_expert_E.numel());
        }
        for (const auto& r : l.routing)
          if (r.sinkhorn_stats.defined()) {
            parts.push_back(r.sinkhorn_stats.to(torch::kFloat64).reshape({2}));
            ++layout.sinkhorn_layers;
          }
        return torch::cat(parts);
      },
      m->parameters(), cfg.train.cuda_graph ? MicroStepGraphs::Mode::kGraph : MicroStepGraphs::Mode::kEager);

  // Metrics: one JSON object per line. On resume, drop lines past the checkpoint.
  const std::string metrics_path = (out / "metrics.jsonl").string();
  if (!root) {
    // Only rank 0 writes metrics; the other ranks' stream stays closed.
  } else if (start_step > 0 && fs::exists(metrics_path)) {
    std::ifstream in(metrics_path);
    std::string kept, line;
    while (std::getline(in, line)) {  // a run killed mid-write leaves a torn last line: dropped
      const json j = json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (j.is_object() && j.value("step", int64_t(0)) <= start_step) kept += line + "\n";
    }
    write_file_atomic(metrics_path, kept);
  } else {
    write_file_atomic(metrics_path, "");
  }
  std::ofstream metrics;
  if (root) {
    metrics.open(metrics_path, std::ios::app);
    if (!metrics) throw file_error(metrics_path, "cannot open for appending");
  }
  // Every metrics line and flush goes through here (rank 0): a failed write
  // (disk full, quota) stops the run naming the file instead of silently losing lines.
  auto check_metrics = [&] {
    if (!metrics) throw file_error(metrics_path, "cannot write metrics (disk full?)");
  };
  auto flush_metrics = [&] {
    if (!root) return;
    metrics.flush();
    check_metrics();
  };
  auto write_metrics = [&](const json& line, bool flush) {
    if (!root) return;
    metrics << line.dump() << "\n";
    if (flush) metrics.flush();
    check_metrics();
  };

  PhaseSummary summary;
  auto run_eval = [&](int64_t step) {
    std::map<std::string, EvalResult> res;
    for (const auto& [name, batches] : val_sets) res[name] = evaluate(m, batches, dev, group.get(), ep != nullptr);
    write_metrics(json{{"step", step}, {"kind", "eval"}, {"eval", eval_json(res)}}, /*flush=*/true);
    std::string msg = "eval @" + std::to_string(step) + ":";
    for (const auto& [name, e] : res) msg += " " + name + "=" + fmt(e.loss);
    log::info(msg);
    return res;
  };
  json initial_eval = resumed_state.value("initial_eval", json::object());
  // Ranks hold bitwise-equal weights (same averaged gradients, same updates);
  // checked before every checkpoint so a broken invariant cannot go unnoticed.
  auto check_in_sync = [&] {
    if (!group) return;
    const double div = ep ? dist::max_param_divergence(*group, ep->replicated_params())
                          : dist::max_param_divergence(*group, *m);
    if (div > 0)
      throw Error("rank " + std::to_string(denv.rank) + ": weights differ from rank 0's (fingerprint difference " +
                  std::to_string(div) + "); data-parallel ranks must stay identical");
  };
  auto trainer_state = [&](int64_t step) {
    return json{{"step", step}, {"sampler", to_json(sampler.state())}, {"run", cfg.run.name},
                {"initial_eval", initial_eval}};
  };
  // Rank 0 writes; expert parallel: the experts are first gathered to rank 0
  // (only), so a checkpoint holds the full model whatever the layout.
  auto save = [&](const std::string& dir, torch::optim::Optimizer* opt, int64_t step) {
    if (ep) ep->unshard_to_rank0(opt);  // only rank 0 writes, so only it holds all experts
    if (root) save_checkpoint(dir, *m, opt, trainer_state(step), cfg);
    if (ep) ep->shard(opt);
  };
  // A step checkpoint, then prune the oldest beyond keep_last.
  auto checkpoint = [&](int64_t step) {
    const std::string dir = step_dir(out, step);
    check_in_sync();
    flush_metrics();  // every line up to this step is on disk before the checkpoint exists (SIGKILL-safe resume)
    save(dir, optimizer.get(), step);
    if (!root) return dir;
    auto all = step_checkpoints(out);
    for (size_t i = 0; i + size_t(cfg.train.keep_last) < all.size(); ++i) remove_checkpoint(all[i].second);
    return dir;
  };

  if (start_step == 0) {
    summary.initial_eval = run_eval(0);
    initial_eval = eval_json(summary.initial_eval);
  } else {
    for (const auto& [name, e] : initial_eval.items()) {
      EvalResult r;
      r.loss = e.at("loss").get<double>();
      r.tokens = e.at("tokens").get<int64_t>();
      r.mri = e.at("mri").get<std::vector<double>>();
      r.loads = e.value("loads", std::vector<std::vector<double>>{});
      summary.initial_eval[name] = r;
    }
  }
  m->train();
  auto t_loop = std::chrono::steady_clock::now();
  auto t_last = t_loop;
  double loss_ema = 0;
  int64_t step = start_step;
  std::string last_good = resume_dir.empty() ? cfg.train.init_from : resume_dir;
  // Data parallel: a stop request (signal) on any rank is summed with the step's
  // statistics, so all ranks stop after the same step.
  bool stop_agreed = false;
  auto should_stop = [&] {
    return (group ? stop_agreed : g_stop.load()) || (opts.stop_after > 0 && step >= opts.stop_after);
  };
  while (step < cfg.train.steps && !should_stop()) {
    if (step == anneal_at) {  // weights before the final anneal: CPT with the infinite schedule starts here
      save((out / "checkpoints" / "pre_anneal").string(), optimizer.get(), step);
      log::info("kept the pre-anneal checkpoint at step " + std::to_string(step));
    }
    const double lr = learning_rate(cfg.schedule, cfg.optim, step, cfg.train.steps);
    set_learning_rate(*optimizer, lr);
    Batch batch = sampler.next();
    auto windows = to_tensor(batch, dev);
    // (No zero_grad: the step's first micro-batch overwrites the gradients.)
    // Losses and expert counts stay on the device during the step and come to
    // the host in one copy after the backward (with the grad norm): one host
    // sync per step, not three per micro-batch plus one per MoE layer.
    torch::Tensor losses_dev;           // [lm, aux, z] mean over micro-batches, fp64
    std::vector<torch::Tensor> counts;  // per MoE layer, summed over micro-batches (on the device)
    std::vector<torch::Tensor> sk_dev;  // Sinkhorn [iterations, error] per MoE layer (last micro-batch), on the device
    set_dp_sum(true);
    std::optional<model::StepCasts> step_casts;
    step_casts.emplace(keep_casts);
    for (int64_t mb = 0; mb < n_micro; ++mb) {
      auto rows = n_micro == 1 ? windows : windows.narrow(0, mb * micro, micro);
      // Data parallel: this rank's rows of the global micro-batch, strided
      // (rank, rank+W, …) so replay rows (the batch's last) spread over ranks.
      if (group) rows = rows.slice(0, denv.rank, micro, W).contiguous();
      if (cfg.train.cuda_graph)
        mb_rows.copy_(rows);  // the graphs read this tensor
      else
        mb_rows = rows;
      arm_reducer = reducer && mb == n_micro - 1;
      const int64_t captured = micro_steps.graphs_captured();
      auto res = micro_steps.run(mb == 0);
      if (root && micro_steps.graphs_captured() > captured)
        log::info("CUDA graph " + std::to_string(micro_steps.graphs_captured()) + " captured (" +
                  (mb == 0 ? "first micro-batch of a step" : "accumulating micro-batch") + ")");
      auto mb_losses = res.narrow(0, 0, 3);
      losses_dev = losses_dev.defined() ? losses_dev + mb_losses : mb_losses;
      if (counts.empty()) counts.resize(layout.counts.size());
      int64_t at = 3;
      for (size_t i = 0; i < layout.counts.size(); ++i) {
        auto c = res.narrow(0, at, layout.counts[i]);
        counts[i] = counts[i].defined() ? counts[i] + c : c;
        at += layout.counts[i];
      }
      sk_dev.clear();
      for (int64_t i = 0; i < layout.sinkhorn_layers; ++i, at += 2) sk_dev.push_back(res.narrow(0, at, 2));
    }
    step_casts.reset();  // before the optimizer writes the weights
    set_dp_sum(false);
    // [lm, aux, z, (stop), counts of every MoE layer…] as one fp64 device vector.
    std::vector<torch::Tensor> parts{losses_dev};
    if (group) parts.push_back(torch::full({1}, g_stop ? 1.0 : 0.0, losses_dev.options()));
    for (auto& c : counts) parts.push_back(c.to(torch::kFloat64));
    auto stats_dev = torch::cat(parts);
    if (group) {
      reducer->finish();  // gradients = mean over ranks
      if (ep) ep->reduce_expert_grads();
      // Losses (mean over ranks of equal-sized shares), routed-slot counts (sum)
      // and stop requests in one all-reduce: every rank sees the global values.
      stats_dev = group->sum(stats_dev, "step statistics all-reduce");
      stats_dev.narrow(0, 0, 3).div_(double(W));
    }
    const int64_t counts_at = group ? 4 : 3;
    int64_t off = counts_at;
    for (auto& c : counts) {  // the step's counts (global with W ranks), still on the device
      c = stats_dev.narrow(0, off, c.numel()).to(torch::kInt64);
      off += c.numel();
    }
    // Sinkhorn's [iterations, error] per layer (this rank's own, so after the
    // all-reduce), then the grad norm (last): all in the step's one host copy.
    const int64_t sk_at = stats_dev.numel();
    if (!sk_dev.empty()) stats_dev = torch::cat({stats_dev, torch::cat(sk_dev)});
    // Clipping before the finiteness check is harmless: a non-finite step is skipped or aborts.
    torch::Tensor grad_norm_dev;
    double ep_grad_norm = 0;  // expert parallel: the norm spans the experts of every rank (host reads inside)
    if (cfg.optim.grad_clip > 0) {
      if (ep)
        ep_grad_norm = ep->clip_grad_norm(cfg.optim.grad_clip);
      else
        grad_norm_dev = clip_grad_norm_on_device(m->parameters(), cfg.optim.grad_clip,
                                                 dynamic_cast<FusedAdamW*>(optimizer.get()));
    }
    if (grad_norm_dev.defined()) stats_dev = torch::cat({stats_dev, grad_norm_dev.to(torch::kFloat64).reshape({1})});
    const auto stats = stats_dev.cpu();  // the step's one host sync
    const double* sv = stats.data_ptr<double>();
    const double lm = sv[0], aux = sv[1], z = sv[2];
    if (group) stop_agreed = sv[3] > 0;
    std::vector<int64_t> sk_iters;  // Sinkhorn convergence per MoE layer (last micro-batch)
    std::vector<double> sk_error;
    for (size_t i = 0; i < sk_dev.size(); ++i) {
      sk_iters.push_back(int64_t(sv[sk_at + 2 * int64_t(i)]));
      sk_error.push_back(sv[sk_at + 2 * int64_t(i) + 1]);
    }
    std::vector<torch::Tensor> host_counts;
    off = counts_at;
    for (const auto& c : counts) {
      host_counts.push_back(stats.narrow(0, off, c.numel()));
      off += c.numel();
    }
    if (!std::isfinite(lm) || !std::isfinite(aux) || !std::isfinite(z)) {
      if (cfg.train.on_nonfinite == "skip") {
        if (root) log::warn("non-finite loss at step " + std::to_string(step + 1) + ": batch skipped");
        // (The next step's first micro-batch overwrites the gradients.)
        if (auto* fused = dynamic_cast<FusedAdamW*>(optimizer.get())) fused->set_pending_grad_divisor({});
        ++step;
        continue;
      }
      throw Error(cfg.run.out_dir + ": non-finite loss at step " + std::to_string(step + 1) + " (lm " + fmt(lm) +
                  ", aux " + fmt(aux) + ", z " + fmt(z) + "); last good checkpoint: " +
                  (last_good.empty() ? "none (the run started from scratch)" : last_good) +
                  ". Lower optim.lr, or set train.on_nonfinite = \"skip\"");
    }
    const double grad_norm = ep ? ep_grad_norm : grad_norm_dev.defined() ? sv[stats.numel() - 1] : 0.0;
    optimizer->step();
    m->update_router_biases(counts);  // aux-loss-free balancing; no-op for other routers
    ++step;

    const auto now = std::chrono::steady_clock::now();
    const double step_s = std::chrono::duration<double>(now - t_last).count();
    t_last = now;
    loss_ema = step == start_step + 1 ? lm : 0.9 * loss_ema + 0.1 * lm;
    summary.final_train_loss = lm;
    json line = {{"step", step},
                 {"kind", "train"},
                 {"lr", lr},
                 {"loss", lm},
                 {"aux_loss", aux},
                 {"z_loss", z},
                 {"grad_norm", grad_norm},
                 {"tokens", step * tokens_per_step},
                 {"tokens_per_s", double(tokens_per_step) / step_s}};
    if (!counts.empty()) {
      std::vector<double> mri;
      std::vector<std::vector<double>> loads;
      for (const auto& c : host_counts) {
        auto st = routing_stats(c, tokens_per_step);
        mri.push_back(st.mri);
        loads.push_back(std::move(st.loads));
      }
      line["mri"] = mri;
      line["loads"] = loads;
    }
    // Sinkhorn: how well the balancing converged (every log_every steps); "mri" above is
    // then the MRI of the balanced choice, to compare with its ideal k/E.
    if (!sk_iters.empty() && (step % cfg.train.log_every == 0 || step == cfg.train.steps)) {
      line["sinkhorn_iters"] = sk_iters;
      line["sinkhorn_error"] = sk_error;
      line["mri_ideal"] = double(cfg.model.top_k) / double(cfg.model.n_experts);
    }
    write_metrics(line, /*flush=*/false);
    if (step % cfg.train.log_every == 0 || step == cfg.train.steps) {
      const double el = std::chrono::duration<double>(now - t_loop).count();
      const double tps = double((step - start_step) * tokens_per_step) / el;
      const double eta = el / double(step - start_step) * double(cfg.train.steps - step);
      const double gflops = tps * double(flops_per_token) / 1e9;
      std::string mri_txt;
      if (line.contains("mri")) {
        double worst = 0;
        for (double v : line["mri"]) worst = std::max(worst, v);
        mri_txt = " maxMRI " + fmt(worst, 2);
      }
      log::progress("step " + std::to_string(step) + "/" + std::to_string(cfg.train.steps) + " loss " + fmt(loss_ema) +
                " lr " + fmt(lr * 1e4, 3) + "e-4" + mri_txt + " " + fmt(tps, 0) + " tok/s " + fmt(gflops, 1) +
                " GFLOP/s ETA " + duration(eta));
    }
    if (cfg.train.eval_every > 0 && step % cfg.train.eval_every == 0 && step < cfg.train.steps) run_eval(step);
    if (cfg.train.checkpoint_every > 0 && step % cfg.train.checkpoint_every == 0 && step < cfg.train.steps)
      last_good = checkpoint(step);
  }
  flush_metrics();
  summary.steps = step;
  if (step < cfg.train.steps) {
    const std::string dir = checkpoint(step);
    log::info("stopped at step " + std::to_string(step) + "; checkpoint saved to " + dir +
              " (continue with --resume)");
    return summary;
  }
  checkpoint(step);
  summary.final_eval = run_eval(step);
  save((out / "checkpoints" / "final").string(), nullptr, step);
  summary.tokens = step * tokens_per_step;
  summary.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  json sj = {{"run", cfg.run.name},
             {"steps", summary.steps},
             {"tokens", summary.tokens},
             {"seconds", summary.seconds},
             {"params_total", params.total},
             {"params_active", params.active},
             {"train_flops_per_token", flops_per_token},
             {"final_train_loss", summary.final_train_loss},
             {"initial_eval", initial_eval},
             {"final_eval", eval_json(summary.final_eval)}};
  if (root) write_file_atomic((out / "summary.json").string(), sj.dump(2) + "\n");
  return summary;
}

}  // namespace moecpt
