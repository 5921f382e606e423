// `moecpt bench train`: time training steps of a recipe's model on random
// tokens and report tokens/s, TFLOP/s (model/flops.h train_flops_per_token) and
// MFU against the device's peak. CPU now; CUDA when the binary is built against
// a CUDA LibTorch (docs/performance.md says how).
//
// The step is the trainer's: forward (bf16 autocast when asked, router fp32),
// LM + aux + z loss, backward (over --accum micro-batches), global grad-norm
// clip, AdamW — with the output head and its cross-entropy fused
// (model::forward_loss) unless --unfused-head. The clip is done on the device
// (no .item()), and the loss is read once after the timed steps. Host syncs
// left inside a step: with the per-expert loop the MoE dispatch copies the
// group sizes once per MoE layer (model/moe.cpp; none with the grouped GEMM,
// model/grouped_gemm.h), and Sinkhorn reads its error every 8th iteration on a
// GPU (model/router_sinkhorn.cpp). Each step is timed between device
// synchronisations (a no-op on CPU). --cuda-graph replays each micro-batch as
// a CUDA graph (train/cuda_graph.h); it needs a step without those syncs.
//
// `moecpt bench moe-layer` times one MoE layer with each expert-GEMM path and
// compares their outputs and gradients.
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <ctime>
#include <cstdio>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <thread>

#include "cli/commands.h"
#include "core/config.h"
#include "core/error.h"
#include "core/malloc_policy.h"
#include "model/rms_norm.h"
#include "model/weight_casts.h"
#include "model/flops.h"
#include "model/cuda_kernels.h"
#include "model/fused_ce.h"
#include "model/torch_compat.h"
#include "model/grouped_gemm.h"
#include "model/moe.h"
#include "model/moe_slots.h"
#include "model/rotary_qkv.h"
#include "model/transformer.h"
#include "train/cuda_graph.h"
#include "train/op_profile.h"
#include "train/optimizer.h"

namespace moecpt::cli {

namespace {

struct BenchOptions {
  std::string config;
  std::vector<std::string> overrides;
  int64_t layers = 0;  // 0 = the config's
  int64_t steps = 10;
  int64_t warmup = 2;
  int64_t batch = 0;  // sequences; 0 = the config's train.batch_size
  int64_t accum = 1;  // micro-batches of `batch` sequences per optimizer step
  int64_t threads = 0;
  std::string device;  // "" = the config's run.device
  std::string dtype;   // "" = the config's run.dtype
  double peak_tflops = 0;
  bool json = false;
  int64_t profile = 0;
  bool profile_shapes = false;  // --profile rows per (op, input shapes)
  int64_t blas_threads = 1;  // > 0: profile one extra step and show this many ops
  bool unfused_head = false;  // logits + cross_entropy instead of the fused op
  std::string expert_gemm;    // "" = MOECPT_EXPERT_GEMM or auto (model/grouped_gemm.h)
  bool cuda_graph = false;    // replay each micro-batch's forward + backward as a CUDA graph
};

struct MoeLayerOptions {
  std::string config;
  std::vector<std::string> overrides;
  int64_t tokens = 16384;
  int64_t reps = 10;
  int64_t warmup = 2;
  std::string device;  // "" = the config's run.device
  bool json = false;
};

double peak_rss_mib() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return double(ru.ru_maxrss) / 1024.0;  // KiB on Linux
}

// Minor page faults of this process so far (memory the OS maps in on first touch).
int64_t minor_page_faults() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return int64_t(ru.ru_minflt);
}

void sync(const torch::Device& dev) {
  if (dev.is_cuda()) torch::cuda::synchronize();
}

// Dense bf16 tensor-core peaks in TFLOP/s (vendor data sheets, no sparsity),
// matched against the GPU name nvidia-smi prints.
struct KnownPeak {
  const char* name_part;
  double bf16_tflops;
};
constexpr KnownPeak kKnownPeaks[] = {
    {"H200", 989.0}, {"H100 SXM", 989.0}, {"H100 80GB HBM3", 989.0}, {"H100 NVL", 835.0},
    {"H100 PCIe", 756.0}, {"H100", 756.0},  // an unspecified H100 counts as the PCIe part
    {"A100", 312.0}, {"L40S", 362.0}, {"L4", 121.0}, {"A10", 125.0},
};

std::string gpu_name() {
  std::string name;
  if (FILE* p = ::popen("nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null", "r")) {
    char buf[256];
    if (std::fgets(buf, sizeof buf, p)) name = buf;
    ::pclose(p);
  }
  while (!name.empty() && (name.back() == '\n' || name.back() == ' ')) name.pop_back();
  return name;
}

// GPU memory in use on the device as nvidia-smi reports it (MiB), or -1. Read
// right after the timed steps, it is what PyTorch's caching allocator holds,
// i.e. about the peak the steps needed plus the allocator's slack.
double gpu_memory_used_mib() {
  double mib = -1;
  if (FILE* p = ::popen("nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null", "r")) {
    char buf[64];
    if (std::fgets(buf, sizeof buf, p)) mib = std::atof(buf);
    ::pclose(p);
  }
  return mib;
}

// Best of a few n×n matmuls in `dtype` on the CPU: the throughput that MFU on a
// CPU is measured against when --peak-tflops is not given.
double measured_cpu_matmul_tflops(torch::ScalarType dtype) {
  const int64_t n = 1024;
  torch::NoGradGuard no_grad;
  auto a = torch::randn({n, n}).to(dtype), b = torch::randn({n, n}).to(dtype);
  double best = 0;
  for (int i = 0; i < 6; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    auto c = torch::mm(a, b);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, 2.0 * double(n * n * n) / s / 1e12);
  }
  return best;
}

// Global-norm gradient clipping without a host sync (LibTorch's
// clip_grad_norm_ returns the norm as a double, i.e. calls .item()).
double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

void run_bench_train(const BenchOptions& o) {
  Config cfg = load_config(o.config, o.overrides);
  ModelConfig mc = cfg.model;
  const int64_t config_layers = mc.n_layers;
  if (o.layers > 0) mc.n_layers = o.layers;
  if (o.steps < 1 || o.warmup < 0 || o.accum < 1)
    throw Error("bench train: --steps and --accum must be >= 1 and --warmup >= 0");
  const std::string device_name = o.device.empty() ? cfg.run.device : o.device;
  const std::string dtype = o.dtype.empty() ? cfg.run.dtype : o.dtype;
  if (device_name != "cpu" && device_name != "cuda")
    throw Error("bench train: --device must be cpu or cuda, got '" + device_name + "'");
  if (dtype != "float32" && dtype != "bfloat16")
    throw Error("bench train: --dtype must be float32 or bfloat16, got '" + dtype + "'");
  if (device_name == "cuda" && !torch::cuda::is_available())
    throw Error("bench train: --device cuda, but this build/machine has no CUDA device "
                "(build against a CUDA LibTorch: docs/performance.md)");
  const torch::Device dev(device_name == "cuda" ? torch::kCUDA : torch::kCPU);
  if (o.cuda_graph) check_cuda_graph_support("bench train: --cuda-graph", "--device cuda", dev, mc, cfg.router);
  const int threads = o.threads > 0 ? int(o.threads)
                      : cfg.run.threads > 0 ? int(cfg.run.threads)
                                            : int(std::max(1u, std::thread::hardware_concurrency()));
  torch::set_num_threads(threads);
  compat::set_blas_threads(int(o.blas_threads));
  if (!o.expert_gemm.empty()) model::set_expert_gemm_mode(model::parse_expert_gemm(o.expert_gemm));

  const int64_t B = o.batch > 0 ? o.batch : cfg.train.batch_size, T = mc.seq_len;
  torch::manual_seed(uint64_t(cfg.run.seed));
  model::Transformer model(mc, cfg.router);
  model->to(dev);
  model->set_activation_checkpointing(cfg.train.recompute_every());
  model->set_bf16_residual(cfg.run.residual_dtype == "bfloat16");
  model->train();
  auto opt = make_adamw(*model, cfg.optim);
  const auto params = model->parameters();
  auto tokens = torch::randint(mc.vocab_size, {B, T + 1}, torch::kInt64).to(dev);
  auto inputs_BT = tokens.narrow(1, 0, T).contiguous(), targets_BT = tokens.narrow(1, 1, T).contiguous();

  torch::Tensor loss;
  // One optimizer step over `accum` micro-batches of B sequences (gradient
  // accumulation, as the trainer does for large batches): the optimizer and the
  // clip run once per accum forward/backward passes.
  const int64_t accum = o.accum;
  // One micro-batch's forward + backward; returns its LM loss (detached).
  auto micro_batch = [&]() -> torch::Tensor {
    torch::Tensor total, lm;
    {
      std::optional<compat::Autocast> autocast;
      if (dtype == "bfloat16") autocast.emplace(dev);
      torch::Tensor aux, z;
      if (o.unfused_head) {
        auto out = model(inputs_BT);
        lm = torch::cross_entropy_loss(out.logits_BTV.reshape({-1, mc.vocab_size}).to(torch::kFloat32),
                                       targets_BT.reshape({-1}));
        aux = out.aux_loss, z = out.z_loss;
      } else {
        auto out = model::forward_loss(*model, inputs_BT, targets_BT);
        lm = out.lm_loss, aux = out.aux_loss, z = out.z_loss;
      }
      total = lm + aux + z;
      if (accum > 1) total = total / double(accum);
    }
    total.backward();
    return lm.detach();
  };
  // --cuda-graph: the micro-batches replay CUDA graphs of micro_batch (the
  // inputs are the same tensors every step; the first runs are eager warm-up).
  // Either way the first micro-batch of a step overwrites the gradients.
  MicroStepGraphs micro_steps(micro_batch, params,
                              o.cuda_graph ? MicroStepGraphs::Mode::kGraph : MicroStepGraphs::Mode::kEager);
  // opt_s: when given, the device is synced before the clip and after AdamW and
  // the time between is written there (the optimizer's share, below).
  // With --accum > 1 the weights' bf16 copies are made once per step (model/weight_casts.h).
  const bool keep_casts = model::step_casts_wanted(accum, o.cuda_graph, model->activation_checkpointing() > 0);
  auto step = [&](double* opt_s = nullptr) {
    {
      model::StepCasts step_casts(keep_casts);
      for (int64_t a = 0; a < accum; ++a) loss = micro_steps.run(a == 0);
    }
    std::chrono::steady_clock::time_point t_opt;
    if (opt_s) {
      sync(dev);
      t_opt = std::chrono::steady_clock::now();
    }
    if (cfg.optim.grad_clip > 0)
      clip_grad_norm_on_device(params, cfg.optim.grad_clip, dynamic_cast<FusedAdamW*>(opt.get()));
    opt->step();
    if (opt_s) {
      sync(dev);
      *opt_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_opt).count();
    }
  };

  // With graphs the forward runs in the warm-up and captures only: count the
  // expert GEMM calls from the start to tell which path the graphs hold.
  const auto calls_before = model::expert_gemm_calls();
  for (int64_t i = 0; i < o.warmup; ++i) step();
  if (o.cuda_graph) {  // warm-up until the graphs exist, then one step of replays only
    while (micro_steps.graphs_captured() < (accum > 1 ? 2 : 1)) step();
    step();
  }
  sync(dev);
  const auto calls_timed = model::expert_gemm_calls();
  const auto casts_timed = model::cast_cache_counts();
  // wall clock; CPU time of this process (all threads); wall clock until step()
  // returns, before the device sync: on a GPU, the host's time to enqueue the
  // step (close to step_s: the host is the limit, or something syncs inside).
  // Minor page faults per step: memory given back to the OS and faulted in again
  // (core/malloc_policy.h keeps it in the process; ~0 once warm).
  std::vector<double> step_s, cpu_s, host_s, faults;
  const auto t_all = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < o.steps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    const std::clock_t c0 = std::clock();
    const int64_t f0 = minor_page_faults();
    step();
    host_s.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    sync(dev);
    step_s.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    cpu_s.push_back(double(std::clock() - c0) / CLOCKS_PER_SEC);
    faults.push_back(double(minor_page_faults() - f0));
  }
  const double total_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_all).count();
  // --profile N: one more step, untimed, under the op profiler (its own
  // overhead makes the step slower; read the shares, not the absolute sum).
  std::vector<train::OpStat> ops;
  double profiled_us = 0, profiled_device_us = 0;
  if (o.profile > 0) {
    const auto t0 = std::chrono::steady_clock::now();
    ops = train::profile_ops(
        [&] {
          step();
          sync(dev);
        },
        /*device_times=*/dev.is_cuda(), /*by_shapes=*/o.profile_shapes);
    profiled_us = 1e6 * std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    for (const auto& op : ops) profiled_device_us += op.device_self_us;  // telescopes to the ops' GPU span
  }
  const train::TimeSplit split = train::split_time(ops);
  const double final_loss = loss.item<double>();
  const auto calls_after = model::expert_gemm_calls();  // before the extra steps below
  const auto casts_after = model::cast_cache_counts();
  // The optimizer's share (clip + AdamW), from two more steps with a device sync
  // around it (not in the timed steps above). A run with many micro-batches per
  // optimizer step (the paper's 1024 sequences are 128 micro-batches of 8) pays
  // it once per step, so step time − optimizer time is what its per-micro-batch
  // time approaches.
  std::vector<double> opt_s;
  for (int64_t i = 0; i < 2; ++i) {
    double s = 0;
    step(&s);
    opt_s.push_back(s);
  }
  const auto& calls_from = o.cuda_graph ? calls_before : calls_timed;  // graphs: warm-up + capture
  const int64_t grouped_calls = calls_after.grouped - calls_from.grouped;
  const int64_t loop_calls = calls_after.loop - calls_from.loop;
  const auto* fused_opt = dynamic_cast<const FusedAdamW*>(opt.get());
  const std::string optimizer_path = fused_opt ? fused_opt->last_path() : "loop";
  const bool fast_bf16 = compat::cpu_has_fast_bf16_matmul();  // reads /proc/cpuinfo
  const bool bf16_stream = model->bf16_residual() && dtype == "bfloat16";  // the cast happens only under autocast
  // The kernel paths behind the A/B switches, for the JSON and the text alike.
  const bool head_fp32_logits = !o.unfused_head && model::fused_head_fp32_logits();  // MOECPT_HEAD_FP32_MM
  const std::string rope_path = model::fused_rotary_enabled() ? "fused" : "composite";
  const std::string qkv_layout = model::fused_rotary_enabled() ? model::qkv_layout_name(model::qkv_layout_for(dev))
                                                               : "head_major";  // MOECPT_QKV_LAYOUT
  // moecpt's own CUDA kernels (gated activation, RoPE, head; MOECPT_CUDA_KERNELS=0: ATen ops)
  const bool cuda_kernels = model::cuda_kernels_enabled() && dev.is_cuda();
  model::sinkhorn_kernel_requested();  // read here too: a bad MOECPT_SINKHORN_KERNEL is an error on any machine
  const bool sinkhorn_kernel = mc.ffn == "moe" && cfg.router.type == "sinkhorn" &&
                               model::use_sinkhorn_kernel(dev, mc.n_experts);  // MOECPT_SINKHORN_KERNEL=1
  // The norms' path, by the rule the norms use, asked with a row of the residual stream;
  // the blocks' residual add + norm also with a row of the attention's output (bf16 under autocast).
  const auto stream_row = torch::empty({1, mc.d_model}, torch::TensorOptions().device(dev).dtype(
                                                           bf16_stream ? torch::kBFloat16 : torch::kFloat32));
  const auto attn_row = dtype == "bfloat16" ? stream_row.to(torch::kBFloat16) : stream_row;
  const auto& norm_w = model->final_norm->weight_D;
  const bool rms_norm_kernel = mc.norm == "rmsnorm" && model::use_rms_norm_kernel(stream_row, norm_w);
  model::add_rms_norm_kernel_requested();  // read here too: a bad MOECPT_ADD_RMSNORM_KERNEL is an error anywhere
  model::slot_sort_kernel_requested();  // likewise MOECPT_SLOT_SORT_KERNEL
  const bool slot_sort_kernel =
      mc.ffn == "moe" && model::use_slot_sort_kernel(torch::empty({1}, torch::TensorOptions().device(dev).dtype(
                                                                             torch::kInt64)),
                                                     mc.n_experts);
  const bool add_rms_norm_kernel =
      mc.norm == "rmsnorm" && model::use_add_rms_norm_kernel(stream_row, attn_row, norm_w);
  // MOECPT_MOE_COMBINE, as it applies to this device and dtype ("kernel" only on CUDA)
  const std::string moe_combine =
      mc.ffn != "moe" ? "none"
                      : model::slot_ops_name(model::slot_ops_for(
                            model::slot_ops_from_env(),
                            torch::empty({0}, torch::TensorOptions().device(dev).dtype(
                                                  dtype == "bfloat16" ? torch::kBFloat16 : torch::kFloat32))));
  const std::string expert_path = mc.ffn != "moe"          ? "none"
                                  : grouped_calls && loop_calls ? "mixed"
                                  : grouped_calls              ? "grouped"
                                                               : "loop";
  const double gpu_mib = dev.is_cuda() ? gpu_memory_used_mib() : -1.0;
  const bool kept_freed_memory = keeping_freed_memory();

  const double tokens_per_step = double(accum * B * T);
  const double med_s = median(step_s);
  const double tokens_per_s = tokens_per_step / med_s;
  const int64_t flops_per_token = model::train_flops_per_token(mc);
  const double tflops = double(flops_per_token) * tokens_per_s / 1e12;

  double peak = o.peak_tflops;
  std::string peak_source = "--peak-tflops";
  std::string gpu;
  if (peak <= 0 && dev.is_cuda()) {
    gpu = gpu_name();
    for (const auto& k : kKnownPeaks) {
      if (gpu.find(k.name_part) != std::string::npos) {
        peak = k.bf16_tflops;
        peak_source = std::string("bf16 dense peak of ") + k.name_part + " (data sheet)";
        break;
      }
    }
    if (peak <= 0) peak_source = "unknown GPU '" + gpu + "': pass --peak-tflops";
  } else if (peak <= 0) {
    const auto mm_dtype = dtype == "bfloat16" ? torch::kBFloat16 : torch::kFloat32;
    peak = measured_cpu_matmul_tflops(mm_dtype);
    peak_source = "measured 1024^3 " + dtype + " matmul on this CPU (" + std::to_string(threads) + " threads)";
  }
  const double mfu = peak > 0 ? tflops / peak : 0.0;
  // Without the optimizer's share (measured on the two extra steps; clamped so
  // that noise cannot make it exceed the step).
  const double opt_med_s = std::min(median(opt_s), 0.95 * med_s);
  const double tflops_wo_opt = double(flops_per_token) * tokens_per_step / (med_s - opt_med_s) / 1e12;
  const double mfu_wo_opt = peak > 0 ? tflops_wo_opt / peak : 0.0;
  // --profile: the MFU if the step were only its matmuls and attention (0: n/a)
  const double mfu_ceiling = split.mfu_ceiling(double(flops_per_token) * tokens_per_step, peak);

  nlohmann::json j = {
      {"config", o.config},
      {"model", {{"ffn", mc.ffn}, {"n_layers", mc.n_layers}, {"config_n_layers", config_layers},
                 {"d_model", mc.d_model}, {"vocab_size", mc.vocab_size}, {"seq_len", T},
                 {"router", mc.ffn == "moe" ? cfg.router.type : "none"}}},
      {"device", device_name},
      {"gpu", gpu},
      {"dtype", dtype},
      {"head", o.unfused_head ? "unfused (logits + cross_entropy)" : "fused linear + cross-entropy"},
      {"head_fp32_logits", head_fp32_logits},
      {"head_fp32_dw", !o.unfused_head && model::fused_head_fp32_dw()},      // addmm.dtype_out
      {"head_ce_kernel", !o.unfused_head && model::fused_head_ce_kernel()},  // moecpt's CUDA kernel
      {"threads", threads},
      {"batch_sequences", B},
      {"accum_micro_batches", accum},
      // weight casts kept across a step's micro-batches: hits and copies made in the timed steps
      {"cast_cache",
       {{"on", keep_casts},
        {"hits", casts_after.hits - casts_timed.hits},
        {"misses", casts_after.misses - casts_timed.misses}}},
      {"activation_checkpointing_every", model->activation_checkpointing()},
      {"residual_dtype", bf16_stream ? "bfloat16" : "float32"},
      {"optimizer", std::string("AdamW, ") + optimizer_path},
      {"rope", rope_path},
      {"qkv_layout", qkv_layout},
      {"moe_combine", moe_combine},
      {"cuda_kernels", cuda_kernels},
      {"sinkhorn_kernel", sinkhorn_kernel},
      {"rms_norm", mc.norm != "rmsnorm" ? "none (layernorm)" : rms_norm_kernel ? "kernel" : "aten"},
      {"add_rms_norm", mc.norm != "rmsnorm" ? "none (layernorm)" : add_rms_norm_kernel ? "kernel" : "aten"},
      {"slot_sort", mc.ffn != "moe" ? "none" : slot_sort_kernel ? "kernel" : "aten"},
      {"cpu_fast_bf16_matmul", fast_bf16},
      {"tokens_per_step", int64_t(tokens_per_step)},
      {"warmup_steps", o.warmup},
      {"steps", o.steps},
      {"step_ms", {{"median", 1e3 * med_s},
                   {"min", 1e3 * *std::min_element(step_s.begin(), step_s.end())},
                   {"max", 1e3 * *std::max_element(step_s.begin(), step_s.end())},
                   {"mean", 1e3 * total_s / double(o.steps)}}},
      {"cpu_ms_per_step", {{"median", 1e3 * median(cpu_s)}}},  // robust to other load on a shared machine
      {"host_ms_per_step", {{"median", 1e3 * median(host_s)}}},
      {"tokens_per_s", tokens_per_s},
      {"train_flops_per_token", flops_per_token},
      {"tflops", tflops},
      {"peak_tflops", peak},
      {"peak_source", peak_source},
      {"mfu", peak > 0 ? nlohmann::json(mfu) : nlohmann::json(nullptr)},
      {"optimizer_ms", {{"median", 1e3 * median(opt_s)}, {"steps", int64_t(opt_s.size())}}},
      {"tflops_without_optimizer", tflops_wo_opt},
      {"mfu_without_optimizer", peak > 0 ? nlohmann::json(mfu_wo_opt) : nlohmann::json(nullptr)},
      {"peak_rss_mib", peak_rss_mib()},
      {"page_faults_per_step", {{"median", median(faults)}, {"keep_freed_memory", kept_freed_memory}}},
      {"gpu_memory_used_mib", gpu_mib >= 0 ? nlohmann::json(gpu_mib) : nlohmann::json(nullptr)},
      {"expert_gemm", {{"mode", model::expert_gemm_name(model::expert_gemm_mode())},
                       {"path", expert_path},
                       {"grouped_mm_compiled", model::grouped_mm_compiled()},
                       {"timed_grouped_calls", grouped_calls},
                       {"timed_loop_calls", loop_calls},
                       {"calls_counted_in", o.cuda_graph ? "warm-up and capture (the graphs replay them)" : "timed steps"}}},
      {"cuda_graph", {{"enabled", o.cuda_graph},
                      {"graphs", micro_steps.graphs_captured()},
                      {"replays", micro_steps.replays()}}},
      {"torch_version", TORCH_VERSION},
      {"final_loss", final_loss},
  };
  if (o.profile > 0) {
    nlohmann::json rows = nlohmann::json::array();
    for (size_t i = 0; i < ops.size() && i < size_t(o.profile); ++i) {
      rows.push_back({{"op", ops[i].name}, {"calls", ops[i].calls}, {"self_ms", ops[i].self_us / 1e3},
                      {"total_ms", ops[i].total_us / 1e3}, {"device_self_ms", ops[i].device_self_us / 1e3},
                      {"device_total_ms", ops[i].device_total_us / 1e3}});
      if (o.profile_shapes) rows.back()["shapes"] = ops[i].shapes;
    }
    j["profile"] = {{"profiled_step_ms", profiled_us / 1e3}, {"device_ms", profiled_device_us / 1e3}, {"ops", rows}};
    j["profile"]["time_split"] = {
        {"source", split.device ? "device self times" : "CPU self times"},
        {"matmul_ms", split.matmul_us / 1e3},
        {"attention_ms", split.attention_us / 1e3},
        {"other_ms", split.other_us / 1e3},
        {"mfu_ceiling_matmul_attention", mfu_ceiling > 0 ? nlohmann::json(mfu_ceiling) : nlohmann::json(nullptr)}};
  }
  if (o.json) {
    std::cout << j.dump(2) << "\n";
    return;
  }
  std::printf("bench train: %s\n", o.config.c_str());
  if (mc.n_layers != config_layers)
    std::printf("  layers: %lld of the config's %lld (reduced with --layers)\n", (long long)mc.n_layers,
                (long long)config_layers);
  else
    std::printf("  layers: %lld\n", (long long)mc.n_layers);
  std::printf("  device: %s%s, dtype %s, %d threads, %s head\n", device_name.c_str(),
              gpu.empty() ? "" : (" (" + gpu + ")").c_str(), dtype.c_str(), threads,
              o.unfused_head     ? "unfused"
              : head_fp32_logits ? "fused (fp32 logits from the matmul; MOECPT_HEAD_FP32_MM=0: cast)"
                                 : "fused");
  std::printf("  optimizer: AdamW, %s (MOECPT_FUSED_ADAMW=0: loop)\n", optimizer_path.c_str());
  std::printf("  rope: %s (MOECPT_FUSED_ROPE=0: composite), q/k %s (MOECPT_QKV_LAYOUT)%s\n", rope_path.c_str(),
              qkv_layout.c_str(),
              moe_combine == "none"     ? ""
              : moe_combine == "gather" ? "; MoE combine: gather (MOECPT_MOE_COMBINE=index_add: atomic, =kernel: CUDA)"
                                        : ("; MoE combine: " + moe_combine).c_str());
  if (dev.is_cpu() && dtype == "bfloat16" && !fast_bf16)
    std::printf("  note: no AVX-512 on this CPU: LibTorch's bf16 matmuls run a slow fallback (docs/performance.md)\n");
  if (dev.is_cuda())
    std::printf("  moecpt CUDA kernels (gated activation, RoPE, head): %s\n",
                cuda_kernels               ? "on (MOECPT_CUDA_KERNELS=0: ATen ops)"
                : model::cuda_kernels_compiled() ? "off (MOECPT_CUDA_KERNELS=0)"
                                           : "not built (-DMOECPT_CUDA_KERNELS=ON)");
  if (sinkhorn_kernel) std::printf("  Sinkhorn: one CUDA kernel, stopping test on the device (MOECPT_SINKHORN_KERNEL=1)\n");
  if (rms_norm_kernel) std::printf("  RMSNorm: moecpt's CUDA kernels (MOECPT_RMSNORM_KERNEL=1)\n");
  if (slot_sort_kernel) std::printf("  MoE slot order: moecpt's counting sort (MOECPT_SLOT_SORT_KERNEL=1)\n");
  if (add_rms_norm_kernel)
    std::printf("  residual add + RMSNorm in the blocks: one fused kernel each way (MOECPT_ADD_RMSNORM_KERNEL=1)\n");
  if (bf16_stream) std::printf("  residual stream: bfloat16\n");
  if (o.cuda_graph)
    std::printf("  CUDA graphs: each micro-batch's forward + backward replayed (%lld graph(s), %lld replays)\n",
                (long long)micro_steps.graphs_captured(), (long long)micro_steps.replays());
  if (keep_casts)
    std::printf("  weight casts: made once per step, kept across its %lld micro-batches (%lld reused, %lld made in the "
                "timed steps; MOECPT_CAST_CACHE=0: per micro-batch)\n",
                (long long)accum, (long long)(casts_after.hits - casts_timed.hits),
                (long long)(casts_after.misses - casts_timed.misses));
  if (model->activation_checkpointing() > 0)
    std::printf("  activation checkpointing: every %lld-th block recomputed in the backward (not counted in MFU)\n",
                (long long)model->activation_checkpointing());
  std::printf("  batch: %lld x %lld x %lld micro-batch(es) = %.0f tokens/step; %lld warm-up + %lld timed steps\n",
              (long long)B, (long long)T, (long long)accum, tokens_per_step, (long long)o.warmup, (long long)o.steps);
  std::printf("  step: %.1f ms median (min %.1f, max %.1f)\n", 1e3 * med_s,
              1e3 * *std::min_element(step_s.begin(), step_s.end()),
              1e3 * *std::max_element(step_s.begin(), step_s.end()));
  if (dev.is_cuda())
    std::printf("  host: %.1f ms median to enqueue a step (near the step time: host-bound or a sync inside)\n",
                1e3 * median(host_s));
  std::printf("  tokens/s: %.0f (process CPU time %.1f ms/step)\n", tokens_per_s, 1e3 * median(cpu_s));
  std::printf("  training FLOPs/token: %lld -> %.4f TFLOP/s\n", (long long)flops_per_token, tflops);
  if (peak > 0)
    std::printf("  MFU: %.1f %% of %.4g TFLOP/s (%s)\n", 100.0 * mfu, peak, peak_source.c_str());
  else
    std::printf("  MFU: n/a (%s)\n", peak_source.c_str());
  std::printf("  optimizer (clip + AdamW; 2 extra steps, device-synced): %.1f ms of the step; without it %.4g TFLOP/s",
              1e3 * median(opt_s), tflops_wo_opt);
  if (peak > 0) std::printf(", MFU %.1f %% (what many micro-batches per optimizer step approach)", 100.0 * mfu_wo_opt);
  std::printf("\n");
  if (mc.ffn == "moe")
    std::printf("  expert GEMM: %s (mode %s; LibTorch %s)\n", expert_path.c_str(),
                model::expert_gemm_name(model::expert_gemm_mode()), TORCH_VERSION);
  if (gpu_mib >= 0) std::printf("  GPU memory in use after the steps: %.0f MiB\n", gpu_mib);
  std::printf("  peak RSS: %.0f MiB; %.0f minor page faults per step (freed memory %s); final loss %.4f\n",
              peak_rss_mib(), median(faults), kept_freed_memory ? "kept" : "glibc's default",
              final_loss);
  if (o.profile > 0) {
    if (profiled_device_us > 0)
      std::printf("  profile of one extra step (%.1f ms with the profiler on, %.1f ms of it on the GPU; self%% of "
                  "the GPU time):\n",
                  profiled_us / 1e3, profiled_device_us / 1e3);
    else
      std::printf("  profile of one extra step (%.1f ms with the profiler on; self%% of that):\n", profiled_us / 1e3);
    std::fputs(train::format_op_table(ops, profiled_us, size_t(o.profile), profiled_device_us).c_str(), stdout);
    // How far fusing or removing everything else could go, at the speed the
    // matmuls and attention ran here (docs/performance.md, "ceiling").
    const double total = split.total_us();
    std::printf("  by kind (%s): matmuls %.1f ms (%.0f %%), attention %.1f ms (%.0f %%), the rest %.1f ms (%.0f %%)\n",
                split.device ? "device self times" : "CPU self times", split.matmul_us / 1e3,
                total > 0 ? 100.0 * split.matmul_us / total : 0.0, split.attention_us / 1e3,
                total > 0 ? 100.0 * split.attention_us / total : 0.0, split.other_us / 1e3,
                total > 0 ? 100.0 * split.other_us / total : 0.0);
    if (mfu_ceiling > 0)
      std::printf("  MFU ceiling: %.1f %% if the step were only its matmuls and attention at these speeds\n",
                  100.0 * mfu_ceiling);
  }
}

// `moecpt bench moe-layer`: one MoE layer of a config (router + dispatch +
// experts + combine + shared experts) on random inputs, forward + backward with
// each expert-GEMM path, timed, and compared: the bf16 paths against each other
// and against an fp32 reference (the loop path without autocast).
struct LayerRun {
  std::vector<torch::Tensor> outs;  // y, dL/dx, dL/dw1, dL/dw3, dL/dw2 (fp32, detached)
  std::vector<double> ms;           // forward + backward per repetition
  std::string path;
};

void run_bench_moe_layer(const MoeLayerOptions& o) {
  Config cfg = load_config(o.config, o.overrides);
  const ModelConfig& mc = cfg.model;
  if (mc.ffn != "moe") throw Error("bench moe-layer: " + o.config + " is not an MoE model (model.ffn = \"" + mc.ffn + "\")");
  if (o.tokens < 1 || o.reps < 1 || o.warmup < 0)
    throw Error("bench moe-layer: --tokens and --reps must be >= 1, --warmup >= 0");
  const std::string device_name = o.device.empty() ? cfg.run.device : o.device;
  if (device_name != "cpu" && device_name != "cuda")
    throw Error("bench moe-layer: --device must be cpu or cuda, got '" + device_name + "'");
  if (device_name == "cuda" && !torch::cuda::is_available())
    throw Error("bench moe-layer: --device cuda, but this build/machine has no CUDA device");
  const torch::Device dev(device_name == "cuda" ? torch::kCUDA : torch::kCPU);
  compat::set_blas_threads(1);
  torch::manual_seed(uint64_t(cfg.run.seed));
  model::MoE moe(mc, cfg.router, mc.init_std / std::sqrt(2.0 * double(mc.n_layers)));
  moe->to(dev);
  moe->train();
  auto x = torch::randn({1, o.tokens, mc.d_model}, torch::TensorOptions().device(dev)).requires_grad_(true);
  auto gy = torch::randn({1, o.tokens, mc.d_model}, torch::TensorOptions().device(dev));
  const std::vector<torch::Tensor> wrt{x, moe->experts->w1_EDH, moe->experts->w3_EDH, moe->experts->w2_EHD};
  const char* names[] = {"y", "grad_x", "grad_w1", "grad_w3", "grad_w2"};

  auto once = [&](bool bf16) {
    std::optional<compat::Autocast> autocast;
    if (bf16) autocast.emplace(dev);
    auto y = moe->forward(x).y_BTD;
    autocast.reset();
    auto g = torch::autograd::grad({(y.to(torch::kFloat32) * gy).sum()}, wrt);
    std::vector<torch::Tensor> outs{y.detach().to(torch::kFloat32)};
    for (auto& t : g) outs.push_back(t.to(torch::kFloat32));
    return outs;
  };
  auto run = [&](model::ExpertGemm mode, bool bf16, int64_t reps) {
    model::set_expert_gemm_mode(mode);
    LayerRun r;
    for (int64_t i = 0; i < o.warmup; ++i) once(bf16);
    sync(dev);
    const auto before = model::expert_gemm_calls();
    for (int64_t i = 0; i < reps; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      r.outs = once(bf16);
      sync(dev);
      r.ms.push_back(1e3 * std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    const auto after = model::expert_gemm_calls();
    r.path = after.grouped > before.grouped ? (after.loop > before.loop ? "mixed" : "grouped") : "loop";
    return r;
  };
  const auto ref = run(model::ExpertGemm::kLoop, /*bf16=*/false, 1);
  const auto loop = run(model::ExpertGemm::kLoop, true, o.reps);
  const bool have_grouped = model::grouped_mm_compiled();
  LayerRun grouped;
  if (have_grouped) grouped = run(model::ExpertGemm::kGrouped, true, o.reps);
  model::set_expert_gemm_mode(model::ExpertGemm::kAuto);

  auto rel = [](const torch::Tensor& a, const torch::Tensor& b) {
    return (a - b).norm().item<double>() / std::max(1e-30, b.norm().item<double>());
  };
  nlohmann::json cmp = nlohmann::json::object();
  for (size_t i = 0; i < ref.outs.size(); ++i) {
    nlohmann::json c = {{"loop_bf16_rel_err_vs_fp32", rel(loop.outs[i], ref.outs[i])},
                        {"max_abs_ref", ref.outs[i].abs().max().item<double>()}};
    if (have_grouped) {
      c["grouped_rel_err_vs_fp32"] = rel(grouped.outs[i], ref.outs[i]);
      c["max_abs_diff_grouped_vs_loop"] = (grouped.outs[i] - loop.outs[i]).abs().max().item<double>();
      c["finite"] = bool(torch::isfinite(grouped.outs[i]).all().item<bool>());
    }
    cmp[names[i]] = c;
  }
  nlohmann::json j = {
      {"config", o.config},
      {"device", device_name},
      {"gpu", dev.is_cuda() ? gpu_name() : ""},
      {"torch_version", TORCH_VERSION},
      {"tokens", o.tokens},
      {"d_model", mc.d_model},
      {"n_experts", mc.n_experts},
      {"top_k", mc.top_k},
      {"expert_hidden", mc.expert_hidden},
      {"n_shared_experts", mc.n_shared_experts},
      {"router", cfg.router.type},
      {"dtype", "bfloat16 autocast (reference: fp32 loop)"},
      {"reps", o.reps},
      {"loop", {{"path", loop.path}, {"fwd_bwd_ms_median", median(loop.ms)}}},
      {"compare", cmp},
  };
  if (have_grouped) j["grouped"] = {{"path", grouped.path}, {"fwd_bwd_ms_median", median(grouped.ms)}};
  if (o.json) {
    std::cout << j.dump(2) << "\n";
    return;
  }
  std::printf("bench moe-layer: %s, %lld tokens, E %lld k %lld h_e %lld, %s\n", o.config.c_str(),
              (long long)o.tokens, (long long)mc.n_experts, (long long)mc.top_k, (long long)mc.expert_hidden,
              device_name.c_str());
  std::printf("  loop    (%s): %.3f ms fwd+bwd (median of %lld)\n", loop.path.c_str(), median(loop.ms),
              (long long)o.reps);
  if (have_grouped)
    std::printf("  grouped (%s): %.3f ms fwd+bwd\n", grouped.path.c_str(), median(grouped.ms));
  else
    std::printf("  grouped: not compiled (LibTorch %s < 2.8)\n", TORCH_VERSION);
  for (size_t i = 0; i < ref.outs.size(); ++i) {
    const auto& c = cmp[names[i]];
    std::printf("  %-8s rel err vs fp32: loop %.2e", names[i], c["loop_bf16_rel_err_vs_fp32"].get<double>());
    if (have_grouped)
      std::printf(", grouped %.2e; max |grouped - loop| %.3e (max |ref| %.3e)",
                  c["grouped_rel_err_vs_fp32"].get<double>(), c["max_abs_diff_grouped_vs_loop"].get<double>(),
                  c["max_abs_ref"].get<double>());
    std::printf("\n");
  }
}

}  // namespace

void register_bench_commands(CLI::App& app) {
  auto* bench = app.add_subcommand("bench", "performance measurements");
  bench->require_subcommand(1);
  auto o = std::make_shared<BenchOptions>();
  auto* train = bench->add_subcommand(
      "train", "time training steps of a config's model on random tokens: tokens/s, TFLOP/s, MFU");
  train->add_option("--config", o->config, "recipe TOML")->required()->check(CLI::ExistingFile);
  train->add_option("--set", o->overrides, "override a config value, e.g. --set model.d_model=256");
  train->add_option("--layers", o->layers, "build only N layers (e.g. to fit memory); said in the output")
      ->check(CLI::PositiveNumber);
  train->add_option("--steps", o->steps, "timed steps (default 10)");
  train->add_option("--warmup", o->warmup, "untimed warm-up steps (default 2)");
  train->add_option("--batch", o->batch, "sequences per step (default: train.batch_size)");
  train->add_option("--accum", o->accum,
                    "micro-batches of --batch sequences per optimizer step (gradient accumulation; default 1)");
  train->add_option("--threads", o->threads, "CPU intra-op threads (default: run.threads, 0 = all cores)");
  train->add_option("--device", o->device, "cpu | cuda (default: run.device)");
  train->add_option("--dtype", o->dtype, "float32 | bfloat16 autocast (default: run.dtype)");
  train->add_option("--peak-tflops", o->peak_tflops,
                    "device peak for MFU (default: data-sheet bf16 peak of a known GPU; on CPU a "
                    "measured matmul peak)");
  train->add_flag("--unfused-head", o->unfused_head,
                  "materialise the logits and call cross_entropy (the trainer's path) instead of the fused op");
  train->add_option("--expert-gemm", o->expert_gemm,
                    "MoE expert GEMMs: auto | grouped (at::_grouped_mm, LibTorch >= 2.8) | loop (per-expert mm); "
                    "default MOECPT_EXPERT_GEMM or auto")
      ->check(CLI::IsMember({"auto", "grouped", "loop"}));
  train->add_flag("--cuda-graph", o->cuda_graph,
                  "replay each micro-batch's forward + backward as a CUDA graph (after eager warm-up steps; "
                  "needs the grouped expert GEMM and, for Sinkhorn, MOECPT_SINKHORN_KERNEL=1)");
  train->add_flag("--json", o->json, "print one JSON object");
  train->add_option("--blas-threads", o->blas_threads, "OpenBLAS threads under the matmuls (default 1)");
  auto* profile = train->add_option(
      "--profile", o->profile,
      "after the timed steps, profile one more step and list the N ops with most self CPU time "
      "(MoE phases appear as moe.router, moe.dispatch, moe.experts, moe.combine, moe.shared)");
  train->add_flag("--profile-shapes", o->profile_shapes,
                  "with --profile: one row per op and input shapes (tells apart e.g. weight and activation casts)")
      ->needs(profile);
  train->callback([o] { run_bench_train(*o); });

  auto lo = std::make_shared<MoeLayerOptions>();
  auto* layer = bench->add_subcommand(
      "moe-layer",
      "one MoE layer forward + backward with each expert-GEMM path: time, and difference to each other and to fp32");
  layer->add_option("--config", lo->config, "recipe TOML of an MoE model")->required()->check(CLI::ExistingFile);
  layer->add_option("--set", lo->overrides, "override a config value");
  layer->add_option("--tokens", lo->tokens, "tokens in the batch (default 16384)");
  layer->add_option("--reps", lo->reps, "timed repetitions per path (default 10)");
  layer->add_option("--warmup", lo->warmup, "untimed repetitions per path (default 2)");
  layer->add_option("--device", lo->device, "cpu | cuda (default: run.device)");
  layer->add_flag("--json", lo->json, "print one JSON object");
  layer->callback([lo] { run_bench_moe_layer(*lo); });
}

}  // namespace moecpt::cli
