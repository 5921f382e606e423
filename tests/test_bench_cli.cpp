// `moecpt bench train` end to end on a tiny override of a mini recipe: the JSON
// is complete and consistent with the library's FLOP count.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/config.h"
#include "model/flops.h"
#include "test_util.h"

using namespace moecpt;

namespace {
const std::string kRecipes = std::string(MOECPT_SOURCE_DIR) + "/recipes/";
const std::string kTiny = " --set model.vocab_size=256 --set model.d_model=32 --set model.seq_len=16";
}  // namespace

TEST(BenchCli, TrainJsonOnCpuWithFewerLayers) {
  const std::string path = kRecipes + "mini/granular-sinkhorn.toml";
  auto r = moecpt::testing::run_moecpt("bench train --config " + path + kTiny +
                                       " --layers 2 --steps 2 --warmup 1 --batch 2 --threads 1 --peak-tflops 0.5 --json");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto j = nlohmann::json::parse(r.output);
  auto mc = load_config(path, {"model.vocab_size=256", "model.d_model=32", "model.seq_len=16"}).model;
  EXPECT_EQ(j["model"]["config_n_layers"].get<int64_t>(), mc.n_layers);
  mc.n_layers = 2;
  EXPECT_EQ(j["model"]["n_layers"].get<int64_t>(), 2);
  EXPECT_EQ(j["device"], "cpu");
  EXPECT_EQ(j["tokens_per_step"].get<int64_t>(), 2 * 16);
  EXPECT_EQ(j["steps"].get<int64_t>(), 2);
  EXPECT_EQ(j["train_flops_per_token"].get<int64_t>(), model::train_flops_per_token(mc));
  const double tps = j["tokens_per_s"].get<double>(), tflops = j["tflops"].get<double>();
  EXPECT_GT(tps, 0);
  EXPECT_NEAR(tflops, tps * double(model::train_flops_per_token(mc)) / 1e12, 1e-9 * tflops);
  EXPECT_NEAR(j["mfu"].get<double>(), tflops / 0.5, 1e-12);
  EXPECT_NEAR(2.0 * 16 / (j["step_ms"]["median"].get<double>() / 1e3), tps, 1e-6 * tps);
  EXPECT_TRUE(std::isfinite(j["final_loss"].get<double>()));
  EXPECT_NEAR(j["final_loss"].get<double>(), std::log(256.0), 1.0);  // near-uniform at init
  EXPECT_GT(j["peak_rss_mib"].get<double>(), 0);
  // The optimizer's share, from two extra device-synced steps: positive, below
  // the step, and the FLOPs without it over the rest of the step.
  const double opt_ms = j["optimizer_ms"]["median"].get<double>(), step_ms = j["step_ms"]["median"].get<double>();
  EXPECT_EQ(j["optimizer_ms"]["steps"].get<int64_t>(), 2);
  EXPECT_GT(opt_ms, 0.0);
  const double rest_s = (step_ms - std::min(opt_ms, 0.95 * step_ms)) / 1e3;
  EXPECT_NEAR(j["tflops_without_optimizer"].get<double>(),
              2.0 * 16 * double(model::train_flops_per_token(mc)) / rest_s / 1e12,
              1e-6 * j["tflops_without_optimizer"].get<double>());
  EXPECT_GE(j["mfu_without_optimizer"].get<double>(), j["mfu"].get<double>());
  EXPECT_NEAR(j["mfu_without_optimizer"].get<double>(), j["tflops_without_optimizer"].get<double>() / 0.5, 1e-12);
}

TEST(BenchCli, TextOutputSaysLayersWereReducedAndMeasuresCpuPeak) {
  auto r = moecpt::testing::run_moecpt("bench train --config " + kRecipes + "mini/dense.toml" + kTiny +
                                       " --layers 1 --steps 1 --warmup 0 --batch 1 --threads 1 --unfused-head");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("layers: 1 of the config's 4 (reduced with --layers)"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("MFU: "), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("optimizer (clip + AdamW; 2 extra steps, device-synced): "), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("measured 1024^3 float32 matmul"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("unfused head"), std::string::npos) << r.output;
}

TEST(BenchCli, CudaWithoutGpuIsAClearError) {
  auto r = moecpt::testing::run_moecpt("bench train --config " + kRecipes + "mini/dense.toml" + kTiny +
                                       " --steps 1 --device cuda");
  if (r.exit_code == 0) GTEST_SKIP() << "this build has CUDA and a device";
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.output.find("no CUDA device"), std::string::npos) << r.output;
}

// --cuda-graph: refused off CUDA by name; on a GPU the JSON says the graphs
// ran (one graph per micro-batch kind, every timed micro-batch a replay) and
// which expert path they hold.
TEST(BenchCli, CudaGraphIsRefusedOffCudaAndReportedOnAGpu) {
  const std::string base = "bench train --config " + kRecipes + "mini/granular-aux.toml" + kTiny +
                           " --layers 2 --steps 2 --warmup 1 --batch 2 --threads 1 --peak-tflops 1 --json";
  auto cpu = moecpt::testing::run_moecpt(base + " --device cpu --cuda-graph");
  EXPECT_EQ(cpu.exit_code, 1);
  EXPECT_NE(cpu.output.find("--cuda-graph needs --device cuda"), std::string::npos) << cpu.output;
  auto plain = moecpt::testing::run_moecpt(base + " --device cpu");
  ASSERT_EQ(plain.exit_code, 0) << plain.output;
  const auto jp = nlohmann::json::parse(plain.output);
  EXPECT_EQ(jp["cuda_graph"]["enabled"], false);
  EXPECT_EQ(jp["expert_gemm"]["calls_counted_in"], "timed steps");
  auto gpu = moecpt::testing::run_moecpt(base + " --device cuda --dtype bfloat16 --accum 2 --cuda-graph");
  if (gpu.exit_code != 0 && gpu.output.find("no CUDA device") != std::string::npos)
    GTEST_SKIP() << "no CUDA device";
  if (gpu.exit_code != 0 && gpu.output.find("needs a CUDA build") != std::string::npos)
    GTEST_SKIP() << "LibTorch without CUDA";
  ASSERT_EQ(gpu.exit_code, 0) << gpu.output;
  const auto j = nlohmann::json::parse(gpu.output);
  EXPECT_EQ(j["cuda_graph"]["enabled"], true);
  EXPECT_EQ(j["cuda_graph"]["graphs"].get<int64_t>(), 2);
  EXPECT_GE(j["cuda_graph"]["replays"].get<int64_t>(), 2 * 2);  // at least every timed micro-batch
  EXPECT_EQ(j["expert_gemm"]["path"], "grouped");
  EXPECT_TRUE(std::isfinite(j["final_loss"].get<double>()));
  EXPECT_NEAR(j["final_loss"].get<double>(), std::log(256.0), 1.0);
}

// One MoE layer, both expert-GEMM paths where the build has them: the JSON
// names the path that ran and compares the bf16 paths with the fp32 reference.
TEST(BenchCli, MoeLayerComparesExpertGemmPaths) {
  auto r = moecpt::testing::run_moecpt("bench moe-layer --config " + kRecipes + "mini/granular-aux.toml" + kTiny +
                                       " --tokens 64 --reps 1 --warmup 0 --device cpu --json");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto j = nlohmann::json::parse(r.output);
  EXPECT_EQ(j["tokens"].get<int64_t>(), 64);
  EXPECT_EQ(j["loop"]["path"], "loop");
  for (const char* k : {"y", "grad_x", "grad_w1", "grad_w3", "grad_w2"}) {
    const double e = j["compare"][k]["loop_bf16_rel_err_vs_fp32"].get<double>();
    EXPECT_GT(e, 0) << k;     // bf16 is not fp32 …
    EXPECT_LT(e, 3e-2) << k;  // … but close to it
  }
  int major = 0, minor = 0;
  ASSERT_EQ(std::sscanf(j["torch_version"].get<std::string>().c_str(), "%d.%d", &major, &minor), 2);
  EXPECT_EQ(j.contains("grouped"), major > 2 || (major == 2 && minor >= 8));  // at::_grouped_mm since 2.8
}

TEST(BenchCli, ExpertGemmOptionIsCheckedAndReported) {
  auto bad = moecpt::testing::run_moecpt("bench train --config " + kRecipes + "mini/switch-aux.toml" + kTiny +
                                         " --steps 1 --warmup 0 --batch 1 --expert-gemm fast");
  EXPECT_NE(bad.exit_code, 0);
  auto r = moecpt::testing::run_moecpt("bench train --config " + kRecipes + "mini/switch-aux.toml" + kTiny +
                                       " --layers 1 --steps 1 --warmup 0 --batch 1 --threads 1 --peak-tflops 1"
                                       " --expert-gemm loop --accum 2 --json");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto j = nlohmann::json::parse(r.output);
  EXPECT_EQ(j["accum_micro_batches"].get<int64_t>(), 2);
  EXPECT_EQ(j["tokens_per_step"].get<int64_t>(), 2 * 1 * 16);  // accum × batch × seq_len
  EXPECT_EQ(j["expert_gemm"]["mode"], "loop");
  EXPECT_EQ(j["expert_gemm"]["path"], "loop");
  EXPECT_EQ(j["expert_gemm"]["timed_loop_calls"].get<int64_t>(), 2);  // 1 layer × 2 micro-batches × 1 step
  EXPECT_EQ(j["expert_gemm"]["timed_grouped_calls"].get<int64_t>(), 0);
}

// --accum > 1 under bf16: the weights' bf16 copies are made once per step and
// reused by its other micro-batches (model/weight_casts.h), reported in the
// JSON; one micro-batch or MOECPT_CAST_CACHE=0 keeps nothing.
TEST(BenchCli, WeightCastsAreKeptAcrossTheMicroBatchesOfAStep) {
  const std::string cmd = "bench train --config " + kRecipes + "mini/switch-aux.toml" + kTiny +
                          " --layers 1 --steps 2 --warmup 0 --batch 1 --threads 1 --peak-tflops 1 --dtype bfloat16"
                          " --json";
  auto cast_cache = [&](const std::string& extra) {
    auto r = moecpt::testing::run_moecpt(cmd + extra);
    EXPECT_EQ(r.exit_code, 0) << r.output;
    return r.exit_code == 0 ? nlohmann::json::parse(r.output)["cast_cache"] : nlohmann::json::object();
  };
  // 1 layer: attention qkv and out, the experts' w1, w3, w2; and the head: 6 casts a step
  const auto kept = cast_cache(" --accum 3");
  EXPECT_TRUE(kept["on"].get<bool>());
  EXPECT_EQ(kept["misses"].get<int64_t>(), 2 * 6);      // made once in each of the 2 timed steps
  EXPECT_EQ(kept["hits"].get<int64_t>(), 2 * 2 * 6);    // reused by the other 2 micro-batches
  const auto single = cast_cache(" --accum 1");
  EXPECT_FALSE(single["on"].get<bool>());
  EXPECT_EQ(single["hits"].get<int64_t>(), 0);
  setenv("MOECPT_CAST_CACHE", "0", 1);
  const auto off = cast_cache(" --accum 3");
  unsetenv("MOECPT_CAST_CACHE");
  EXPECT_FALSE(off["on"].get<bool>());
  EXPECT_EQ(off["hits"].get<int64_t>(), 0);
}

// The A/B switches of the kernels (MOECPT_FUSED_ROPE, MOECPT_MOE_COMBINE,
// MOECPT_CUDA_KERNELS, MOECPT_QKV_LAYOUT, MOECPT_RMSNORM_KERNEL, MOECPT_ADD_RMSNORM_KERNEL,
// MOECPT_SLOT_SORT_KERNEL) are reported in the JSON with the host's enqueue time,
// and a bad value is refused by name. setenv reaches the child through popen.
TEST(BenchCli, KernelSwitchesAreReportedAndCheckedByName) {
  const std::string cmd = "bench train --config " + kRecipes + "mini/granular-sinkhorn.toml" + kTiny +
                          " --layers 1 --steps 2 --warmup 0 --batch 1 --threads 1 --peak-tflops 1 --json";
  auto parse = [&] {
    auto r = moecpt::testing::run_moecpt(cmd);
    EXPECT_EQ(r.exit_code, 0) << r.output;
    return r.exit_code == 0 ? nlohmann::json::parse(r.output) : nlohmann::json::object();
  };
  auto j = parse();
  EXPECT_EQ(j["rope"], "fused");
  EXPECT_EQ(j["moe_combine"], "gather");
  EXPECT_EQ(j["cuda_kernels"], false);  // a CPU run
  EXPECT_EQ(j["sinkhorn_kernel"], false);
  EXPECT_EQ(j["rms_norm"], "aten");  // the kernel is CUDA only
  EXPECT_EQ(j["add_rms_norm"], "aten");
  EXPECT_EQ(j["slot_sort"], "aten");
  EXPECT_EQ(j["head_fp32_dw"], false);  // CUDA only
  EXPECT_EQ(j["head_ce_kernel"], false);
  EXPECT_GT(j["host_ms_per_step"]["median"].get<double>(), 0.0);
  EXPECT_LE(j["host_ms_per_step"]["median"].get<double>(), j["step_ms"]["max"].get<double>());
  ::setenv("MOECPT_FUSED_ROPE", "0", 1);
  ::setenv("MOECPT_MOE_COMBINE", "index_add", 1);
  j = parse();
  EXPECT_EQ(j["rope"], "composite");
  EXPECT_EQ(j["moe_combine"], "index_add");
  ::setenv("MOECPT_MOE_COMBINE", "kernel", 1);
  j = parse();
  EXPECT_EQ(j["moe_combine"], "gather");  // the kernels are CUDA only: a CPU run keeps the gathers
  ::setenv("MOECPT_MOE_COMBINE", "atomic", 1);
  auto bad = moecpt::testing::run_moecpt(cmd);
  EXPECT_EQ(bad.exit_code, 1) << bad.output;
  EXPECT_NE(bad.output.find("MOECPT_MOE_COMBINE must be 'gather', 'index_add' or 'kernel', got 'atomic'"), std::string::npos)
      << bad.output;
  ::unsetenv("MOECPT_MOE_COMBINE");
  // the 0/1 kernel switches: on, a CPU run keeps ATen's path; a bad value is refused by name
  for (const auto& [var, key] : std::vector<std::pair<std::string, std::string>>{
           {"MOECPT_RMSNORM_KERNEL", "rms_norm"},
           {"MOECPT_ADD_RMSNORM_KERNEL", "add_rms_norm"},
           {"MOECPT_SLOT_SORT_KERNEL", "slot_sort"}}) {
    ::setenv(var.c_str(), "1", 1);
    EXPECT_EQ(parse()[key], "aten") << var;
    ::setenv(var.c_str(), "on", 1);
    bad = moecpt::testing::run_moecpt(cmd);
    EXPECT_EQ(bad.exit_code, 1) << bad.output;
    EXPECT_NE(bad.output.find(var + " must be 0 or 1, got 'on'"), std::string::npos) << bad.output;
    ::unsetenv(var.c_str());
  }
  ::setenv("MOECPT_CUDA_KERNELS", "yes", 1);
  bad = moecpt::testing::run_moecpt(cmd);
  EXPECT_EQ(bad.exit_code, 1) << bad.output;
  EXPECT_NE(bad.output.find("MOECPT_CUDA_KERNELS must be 0 or 1, got 'yes'"), std::string::npos) << bad.output;
  ::unsetenv("MOECPT_FUSED_ROPE");
  ::unsetenv("MOECPT_CUDA_KERNELS");
  // MOECPT_QKV_LAYOUT: seq-major q/k is CUDA only (a CPU run stays head-major);
  // a bad value stops the run when the model is built
  EXPECT_EQ(parse()["qkv_layout"], "head_major");
  ::setenv("MOECPT_QKV_LAYOUT", "seq_major", 1);
  EXPECT_EQ(parse()["qkv_layout"], "head_major");
  ::setenv("MOECPT_QKV_LAYOUT", "bshd", 1);
  bad = moecpt::testing::run_moecpt(cmd);
  EXPECT_EQ(bad.exit_code, 1) << bad.output;
  EXPECT_NE(bad.output.find("MOECPT_QKV_LAYOUT='bshd': expected head_major (the default) or seq_major"),
            std::string::npos)
      << bad.output;
  ::unsetenv("MOECPT_QKV_LAYOUT");
}
