// One training step of the mini models — forward, LM + aux + z loss, backward,
// grad-norm clip, AdamW — on random tokens, as tokens/s and peak RSS.
// The same step as `moecpt bench train` (which bench/run.sh uses for the
// side-by-side comparison with bench/pytorch_eager.py), as a Google Benchmark.
//
//   moecpt_bench_train --benchmark_filter=granular-aux [--benchmark_format=json]
// Environment: MOECPT_BENCH_THREADS (default: all cores), MOECPT_BENCH_STEPS
// (timed steps, default 10), MOECPT_BENCH_BATCH (sequences, default the recipe's).
#include <benchmark/benchmark.h>
#include <sys/resource.h>

#include <cstdlib>
#include <thread>

#include "core/config.h"
#include "core/malloc_policy.h"
#include "model/fused_ce.h"
#include "model/torch_compat.h"
#include "model/transformer.h"
#include "train/optimizer.h"

using namespace moecpt;

namespace {

int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  return v ? std::atoll(v) : fallback;
}

double peak_rss_mib() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return double(ru.ru_maxrss) / 1024.0;  // ru_maxrss is in KiB on Linux
}

void BM_TrainStep(benchmark::State& state, const std::string& recipe) {
  const int64_t threads = env_int("MOECPT_BENCH_THREADS", std::max(1u, std::thread::hardware_concurrency()));
  torch::set_num_threads(int(threads));
  compat::set_blas_threads(1);  // see model/torch_compat.h
  const auto cfg = load_config(std::string(MOECPT_SOURCE_DIR) + "/recipes/mini/" + recipe + ".toml");
  const auto& mc = cfg.model;
  const int64_t batch = env_int("MOECPT_BENCH_BATCH", 0);  // 0 = the recipe's
  const int64_t B = batch > 0 ? batch : cfg.train.batch_size, T = mc.seq_len;

  torch::manual_seed(0);
  model::Transformer model(mc, cfg.router);
  model->train();
  auto opt = make_adamw(*model, cfg.optim);
  auto tokens = torch::randint(mc.vocab_size, {B, T + 1}, torch::kInt64);
  auto inputs_BT = tokens.narrow(1, 0, T).contiguous(), targets_BT = tokens.narrow(1, 1, T).contiguous();

  double loss = 0;
  auto step = [&] {
    auto out = model::forward_loss(*model, inputs_BT, targets_BT);  // fused head + cross-entropy
    auto lm = out.lm_loss;
    opt->zero_grad();
    (lm + out.aux_loss + out.z_loss).backward();
    torch::nn::utils::clip_grad_norm_(model->parameters(), cfg.optim.grad_clip);
    opt->step();
    loss = lm.item<double>();  // the trainer logs it too: one sync per step
  };
  for (int i = 0; i < 2; ++i) step();  // warm-up: allocator, AdamW state
  for (auto _ : state) step();

  state.counters["tokens_per_s"] = benchmark::Counter(double(B * T), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["peak_rss_mib"] = peak_rss_mib();
  state.counters["threads"] = double(threads);
  state.counters["batch_tokens"] = double(B * T);
  state.counters["loss"] = loss;
}

}  // namespace

int main(int argc, char** argv) {
  keep_freed_memory();  // as the moecpt binary does (core/malloc_policy.h)
  const int64_t steps = env_int("MOECPT_BENCH_STEPS", 10);
  for (const std::string recipe : {"dense", "switch-aux", "granular-aux", "granular-sinkhorn"}) {
    benchmark::RegisterBenchmark(("train_step/" + recipe).c_str(), BM_TrainStep, recipe)
        ->Iterations(steps)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
