#include "train/trainer.h"

#include <atomic>
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
#include "model/transformer.h"
#include "train/checkpoint.h"
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
  auto out = m->forward(inputs);
  auto lm = torch::nn::functional::cross_entropy(out.logits_BTV.reshape({-1, out.logits_BTV.size(-1)}).to(torch::kFloat32),
                                                 targets.reshape({-1}));
  return {lm, out.aux_loss, out.z_loss, std::move(out.routing)};
}

// MRI of one layer (SPEC §5): max_i share of the batch's tokens that chose i.
double mri_of(const model::RoutingInfo& r) {
  auto counts = r.tokens_per_expert_E.to(torch::kCPU).to(torch::kFloat64);
  const double tokens = double(r.topk_ids_TK.size(0));
  return counts.max().item<double>() / tokens;
}

EvalResult evaluate(model::Transformer& m, const std::vector<Batch>& batches, const torch::Device& dev) {
  torch::NoGradGuard no_grad;
  const bool was_training = m->is_training();
  m->eval();  // inference-mode routing (plain top-k for Sinkhorn)
  EvalResult r;
  double loss_sum = 0;
  std::vector<torch::Tensor> counts;
  int64_t routed_tokens = 0;
  for (const auto& b : batches) {
    auto l = forward_losses(m, to_tensor(b, dev));
    const int64_t n = b.batch_size * b.seq_len;
    loss_sum += l.lm.item<double>() * double(n);
    r.tokens += n;
    if (counts.empty()) counts.resize(l.routing.size());
    for (size_t i = 0; i < l.routing.size(); ++i) {
      auto c = l.routing[i].tokens_per_expert_E.to(torch::kCPU);
      counts[i] = counts[i].defined() ? counts[i] + c : c;
    }
    routed_tokens += n;
  }
  r.loss = loss_sum / double(std::max<int64_t>(1, r.tokens));
  for (auto& c : counts) r.mri.push_back(c.max().item<double>() / double(routed_tokens));
  if (was_training) m->train();
  return r;
}

json eval_json(const std::map<std::string, EvalResult>& evals) {
  json j = json::object();
  for (const auto& [name, e] : evals) j[name] = {{"loss", e.loss}, {"tokens", e.tokens}, {"mri", e.mri}};
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

// AdamW with two groups: matrices decay; norms, biases and embeddings do not.
std::unique_ptr<torch::optim::AdamW> make_optimizer(model::Transformer& m, const OptimConfig& o) {
  std::vector<torch::Tensor> decay, no_decay;
  for (const auto& p : m->named_parameters()) {
    if (!p.value().requires_grad()) continue;
    const std::string& n = p.key();
    const bool is_embedding = n.find("tok_emb") != std::string::npos;
    (p.value().dim() >= 2 && !is_embedding ? decay : no_decay).push_back(p.value());
  }
  auto opts = [&](double wd) {
    return std::make_unique<torch::optim::AdamWOptions>(
        torch::optim::AdamWOptions(o.lr).betas({o.beta1, o.beta2}).eps(o.eps).weight_decay(wd));
  };
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(decay, opts(o.weight_decay));
  groups.emplace_back(no_decay, opts(0.0));
  return std::make_unique<torch::optim::AdamW>(groups, torch::optim::AdamWOptions(o.lr));
}

void set_lr(torch::optim::Optimizer& opt, double lr) {
  for (auto& g : opt.param_groups()) static_cast<torch::optim::AdamWOptions&>(g.options()).lr(lr);
}

}  // namespace

void request_stop() { g_stop = true; }

PhaseSummary train(const Config& cfg, const TrainOptions& opts) {
  g_stop = false;
  const auto t_start = std::chrono::steady_clock::now();
  const int threads = cfg.run.threads > 0 ? int(cfg.run.threads) : int(std::max(1u, std::thread::hardware_concurrency()));
  torch::set_num_threads(threads);
  if (cfg.run.device == "cuda" && !torch::cuda::is_available())
    throw Error("run.device = \"cuda\" but this build/machine has no CUDA device");
  const torch::Device dev(cfg.run.device == "cuda" ? torch::kCUDA : torch::kCPU);
  torch::manual_seed(uint64_t(cfg.run.seed));

  const fs::path out(cfg.run.out_dir);
  fs::create_directories(out / "checkpoints");
  write_effective_config(cfg, (out / "config.toml").string());

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
  auto optimizer = make_optimizer(m, cfg.optim);
  int64_t start_step = 0;
  json resumed_state = json::object();
  const std::string last_dir = (out / "checkpoints" / "last").string();
  if (opts.resume && fs::exists(last_dir + "/trainer.json")) {
    load_model_weights(last_dir, *m);
    load_optimizer_state(last_dir, *optimizer);
    resumed_state = load_trainer_state(last_dir);
    start_step = resumed_state.at("step").get<int64_t>();
    sampler.restore(sampler_state_from_json(resumed_state.at("sampler")));
    log::info("resumed " + last_dir + " at step " + std::to_string(start_step));
  } else if (!cfg.train.init_from.empty()) {
    load_model_weights(cfg.train.init_from, *m);
    log::info("initialised weights from " + cfg.train.init_from);
  }

  const auto params = model::count_params(cfg.model);
  const int64_t flops_per_token = model::train_flops_per_token(cfg.model);
  const int64_t tokens_per_step = cfg.train.batch_size * cfg.model.seq_len;
  log::info(cfg.run.name + ": " + std::to_string(params.total) + " params (" + std::to_string(params.active) +
            " active), " + std::to_string(cfg.train.steps) + " steps × " + std::to_string(tokens_per_step) +
            " tokens, " + std::to_string(threads) + " threads");

  // Metrics: one JSON object per line. On resume, drop lines past the checkpoint.
  const std::string metrics_path = (out / "metrics.jsonl").string();
  if (start_step > 0 && fs::exists(metrics_path)) {
    std::ifstream in(metrics_path);
    std::string kept, line;
    while (std::getline(in, line))
      if (json::parse(line).value("step", int64_t(0)) <= start_step) kept += line + "\n";
    write_file_atomic(metrics_path, kept);
  } else {
    write_file_atomic(metrics_path, "");
  }
  std::ofstream metrics(metrics_path, std::ios::app);

  PhaseSummary summary;
  auto run_eval = [&](int64_t step) {
    std::map<std::string, EvalResult> res;
    for (const auto& [name, batches] : val_sets) res[name] = evaluate(m, batches, dev);
    json line = {{"step", step}, {"kind", "eval"}, {"eval", eval_json(res)}};
    metrics << line.dump() << "\n" << std::flush;
    std::string msg = "eval @" + std::to_string(step) + ":";
    for (const auto& [name, e] : res) msg += " " + name + "=" + fmt(e.loss);
    log::info(msg);
    return res;
  };
  json initial_eval = resumed_state.value("initial_eval", json::object());
  auto trainer_state = [&](int64_t step) {
    return json{{"step", step}, {"sampler", to_json(sampler.state())}, {"run", cfg.run.name},
                {"initial_eval", initial_eval}};
  };

  if (start_step == 0) {
    summary.initial_eval = run_eval(0);
    initial_eval = eval_json(summary.initial_eval);
  } else {
    for (const auto& [name, e] : initial_eval.items())
      summary.initial_eval[name] = EvalResult{e.at("loss").get<double>(), e.at("tokens").get<int64_t>(),
                                              e.at("mri").get<std::vector<double>>()};
  }
  m->train();
  auto t_loop = std::chrono::steady_clock::now();
  double loss_ema = 0;
  int64_t step = start_step;
  while (step < cfg.train.steps && !g_stop) {
    const double lr = learning_rate(cfg.schedule, cfg.optim, step, cfg.train.steps);
    set_lr(*optimizer, lr);
    Batch batch = sampler.next();
    optimizer->zero_grad();
    auto l = forward_losses(m, to_tensor(batch, dev));
    auto loss = l.lm + l.aux + l.z;
    loss.backward();
    double grad_norm = 0;
    if (cfg.optim.grad_clip > 0)
      grad_norm = torch::nn::utils::clip_grad_norm_(m->parameters(), cfg.optim.grad_clip);
    optimizer->step();
    std::vector<torch::Tensor> loads;
    for (const auto& r : l.routing) loads.push_back(r.tokens_per_expert_E);
    m->update_router_biases(loads);
    ++step;

    const double lm = l.lm.item<double>();
    loss_ema = step == start_step + 1 ? lm : 0.9 * loss_ema + 0.1 * lm;
    summary.final_train_loss = lm;
    json line = {{"step", step},          {"kind", "train"},
                 {"lr", lr},              {"loss", lm},
                 {"aux_loss", l.aux.item<double>()}, {"z_loss", l.z.item<double>()},
                 {"grad_norm", grad_norm}, {"tokens", step * tokens_per_step}};
    if (!l.routing.empty()) {
      std::vector<double> mri;
      for (const auto& r : l.routing) mri.push_back(mri_of(r));
      line["mri"] = mri;
    }
    metrics << line.dump() << "\n";
    if (step % cfg.train.log_every == 0 || step == cfg.train.steps) {
      const double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_loop).count();
      const double tps = double((step - start_step) * tokens_per_step) / el;
      const double eta = el / double(step - start_step) * double(cfg.train.steps - step);
      const double tflops = tps * double(flops_per_token) / 1e12;
      log::info("step " + std::to_string(step) + "/" + std::to_string(cfg.train.steps) + " loss " + fmt(loss_ema) +
                " lr " + fmt(lr * 1e4, 3) + "e-4 " + fmt(tps, 0) + " tok/s " + fmt(tflops * 1e3, 1) +
                " GFLOP/s ETA " + duration(eta));
    }
    if (cfg.train.eval_every > 0 && step % cfg.train.eval_every == 0 && step < cfg.train.steps) run_eval(step);
    if (cfg.train.checkpoint_every > 0 && step % cfg.train.checkpoint_every == 0 && step < cfg.train.steps)
      save_checkpoint(last_dir, *m, optimizer.get(), trainer_state(step), cfg);
  }
  metrics.flush();
  save_checkpoint(last_dir, *m, optimizer.get(), trainer_state(step), cfg);
  if (g_stop) {
    log::info("stopped at step " + std::to_string(step) + "; checkpoint saved to " + last_dir +
              " (continue with --resume)");
    summary.steps = step;
    return summary;
  }
  summary.final_eval = run_eval(step);
  save_checkpoint((out / "checkpoints" / "final").string(), *m, nullptr, trainer_state(step), cfg);
  summary.steps = step;
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
  write_file_atomic((out / "summary.json").string(), sj.dump(2) + "\n");
  return summary;
}

}  // namespace moecpt
