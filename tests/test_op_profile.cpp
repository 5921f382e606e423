// train/op_profile.h: per-op aggregation of LibTorch's profiler, checked on a
// computation whose ops we know, and through `moecpt bench train --profile`.
#include <gtest/gtest.h>

#include <map>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/pch.h"
#include "test_util.h"
#include "train/op_profile.h"

using namespace moecpt;

namespace {
const train::OpStat* find(const std::vector<train::OpStat>& ops, const std::string& name) {
  for (const auto& o : ops)
    if (o.name == name) return &o;
  return nullptr;
}
}  // namespace

TEST(OpProfile, CountsCallsAndSeparatesSelfFromChildTime) {
  auto a = torch::randn({256, 256}), b = torch::randn({256, 256}), s = torch::full({}, 1.0 / 16);
  auto ops = train::profile_ops([&] {
    RECORD_USER_SCOPE("outer");
    for (int i = 0; i < 3; ++i) a = torch::mm(a, b) * s;
  });
  const auto* mm = find(ops, "aten::mm");
  const auto* mul = find(ops, "aten::mul");
  const auto* outer = find(ops, "outer");
  ASSERT_TRUE(mm && mul && outer);
  EXPECT_EQ(mm->calls, 3);
  EXPECT_EQ(mul->calls, 3);
  EXPECT_EQ(outer->calls, 1);
  EXPECT_LE(mm->self_us, mm->total_us + 1e-9);
  // the scope's total covers its children; its self time excludes them
  EXPECT_GE(outer->total_us + 1e-9, mm->total_us + mul->total_us);
  EXPECT_NEAR(outer->self_us, outer->total_us - mm->total_us - mul->total_us, 0.05 * outer->total_us + 50);
  // sorted by self time, largest first
  for (size_t i = 1; i < ops.size(); ++i) EXPECT_GE(ops[i - 1].self_us, ops[i].self_us);
  // a profiler that throws inside is switched off again
  EXPECT_THROW(train::profile_ops([] { throw Error("inside"); }), Error);
  EXPECT_NO_THROW(train::profile_ops([] {}));
  const auto text = train::format_op_table(ops, outer->total_us, 2);
  EXPECT_NE(text.find("op (by self CPU time)"), std::string::npos);
}

TEST(OpProfile, ByShapesSplitsAnOpByItsInputSizes) {
  auto a = torch::randn({64, 32}), b = torch::randn({32, 16}), c = torch::randn({16, 8});
  auto work = [&] {
    for (int i = 0; i < 2; ++i) torch::mm(a, b);  // [64, 32] × [32, 16], twice
    torch::mm(b, c);                               // [32, 16] × [16, 8], once
  };
  // by name: one row, three calls, no shapes
  const auto* mm = find(train::profile_ops(work), "aten::mm");
  ASSERT_TRUE(mm);
  EXPECT_EQ(mm->calls, 3);
  EXPECT_TRUE(mm->shapes.empty());
  // by shapes: one row per shape pair
  const auto ops = train::profile_ops(work, /*device_times=*/false, /*by_shapes=*/true);
  std::map<std::string, int64_t> calls;
  for (const auto& o : ops)
    if (o.name == "aten::mm") calls[o.shapes] = o.calls;
  EXPECT_EQ(calls.size(), 2u);
  EXPECT_EQ(calls["[64, 32] [32, 16]"], 2);
  EXPECT_EQ(calls["[32, 16] [16, 8]"], 1);
  // the table shows the shapes after the name
  EXPECT_NE(train::format_op_table(ops, 1.0, ops.size()).find("aten::mm [64, 32] [32, 16]"), std::string::npos);
}

TEST(OpProfile, DeviceTimesOnAGpu) {
  // CPU-only profiles carry no device time…
  auto a = torch::randn({64, 64});
  for (const auto& o : train::profile_ops([&] { a = torch::mm(a, a); })) EXPECT_EQ(o.device_self_us, 0.0) << o.name;
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device: the device-time part runs on a GPU machine";
  // …on a GPU, a large matmul's kernel time shows up under aten::mm, and the
  // table switches to device time.
  // The warm-up runs the same ops first: CUDA loads a kernel's module at its
  // first launch (lazy loading), and the events around that op would time the
  // GPU idling meanwhile (seen on an H100: the first mul ranked above the mm).
  auto g = torch::randn({2048, 2048}, torch::kCUDA);
  auto work = [&] { g = torch::mm(g, g) * 1e-3; };
  work();
  torch::cuda::synchronize();
  auto ops = train::profile_ops(work, /*device_times=*/true);
  const auto* mm = find(ops, "aten::mm");
  ASSERT_TRUE(mm);
  EXPECT_GT(mm->device_self_us, 10.0);  // 17 GFLOP: well over 10 µs on any GPU
  EXPECT_GE(mm->device_total_us + 1e-9, mm->device_self_us);
  EXPECT_EQ(ops.front().name, "aten::mm");  // sorted by device self time
  EXPECT_NE(train::format_op_table(ops, 1.0, 3, mm->device_total_us).find("self device time"), std::string::npos);
}

TEST(OpProfile, OpKindsByName) {
  using train::OpKind;
  for (const char* m : {"aten::mm", "aten::addmm", "aten::addmm_", "aten::addmm.dtype_out", "aten::bmm", "aten::baddbmm_",
                        "aten::addbmm", "aten::_grouped_mm", "aten::_scaled_mm", "aten::matmul", "aten::linear"})
    EXPECT_EQ(train::op_kind(m), OpKind::kMatmul) << m;
  for (const char* a : {"aten::_cudnn_attention_backward", "aten::_flash_attention_forward",
                        "aten::_efficient_attention_backward", "aten::_scaled_dot_product_cudnn_attention",
                        "torch::autograd::CppNode<moecpt::model::(anonymous namespace)::CausalAttention>"})
    EXPECT_EQ(train::op_kind(a), OpKind::kAttention) << a;
  // matrix-vector products (Sinkhorn), autograd nodes, casts, user scopes,
  // and names that only start like a matmul are the rest
  for (const char* r : {"aten::mv", "aten::addmv_", "aten::dot", "MmBackward0", "aten::copy_", "moe.router",
                        "aten::mmx", "mm", "aten::", ""})
    EXPECT_EQ(train::op_kind(r), OpKind::kOther) << r;
}

TEST(OpProfile, TimeSplitAndTheMfuCeiling) {
  auto op = [](const char* name, double self_us, double device_self_us) {
    train::OpStat o;
    o.name = name;
    o.self_us = self_us;
    o.device_self_us = device_self_us;
    o.calls = 1;
    return o;
  };
  // a GPU profile: device self times count, CPU self times do not
  std::vector<train::OpStat> ops = {op("aten::mm", 9, 300),       op("aten::addmm_", 9, 100),
                                    op("aten::_grouped_mm", 9, 200), op("aten::_cudnn_attention_backward", 9, 150),
                                    op("aten::addmv_", 9, 50),      op("aten::mul", 9, 200),
                                    op("moe.router", 9000, 0)};
  auto t = train::split_time(ops);
  EXPECT_TRUE(t.device);
  EXPECT_DOUBLE_EQ(t.matmul_us, 600);
  EXPECT_DOUBLE_EQ(t.attention_us, 150);
  EXPECT_DOUBLE_EQ(t.other_us, 250);
  EXPECT_DOUBLE_EQ(t.total_us(), 1000);
  // 3e11 FLOPs in the 750 µs of matmuls and attention = 400 TFLOP/s: 40 % of a
  // 1000 TFLOP/s peak
  EXPECT_NEAR(t.mfu_ceiling(3e11, 1000), 0.4, 1e-12);
  EXPECT_EQ(t.mfu_ceiling(3e11, 0), 0.0);  // unknown peak
  // a CPU profile (no device time anywhere): CPU self times
  for (auto& o : ops) o.device_self_us = 0;
  t = train::split_time(ops);
  EXPECT_FALSE(t.device);
  EXPECT_DOUBLE_EQ(t.matmul_us, 27);
  EXPECT_DOUBLE_EQ(t.attention_us, 9);
  EXPECT_DOUBLE_EQ(t.other_us, 9018);  // addmv_, mul, moe.router
  EXPECT_EQ(train::split_time({}).mfu_ceiling(1e9, 1), 0.0);  // nothing timed: no ceiling
}

TEST(OpProfile, BenchTrainProfileListsTheMoEPhases) {
  const std::string path = std::string(MOECPT_SOURCE_DIR) + "/recipes/mini/granular-aux.toml";
  auto r = moecpt::testing::run_moecpt("bench train --config " + path +
                                       " --set model.vocab_size=256 --set model.d_model=32 --set model.seq_len=16"
                                       " --layers 1 --steps 1 --warmup 1 --batch 2 --threads 1 --profile 500 --json");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto j = nlohmann::json::parse(r.output);
  std::map<std::string, int64_t> calls;
  for (const auto& row : j["profile"]["ops"]) calls[row["op"].get<std::string>()] = row["calls"].get<int64_t>();
  for (const char* phase : {"moe.router", "moe.dispatch", "moe.experts", "moe.combine", "moe.shared"})
    EXPECT_EQ(calls[phase], 1) << phase;  // one MoE layer, one forward
  EXPECT_GT(calls["aten::mm"], 0);
  EXPECT_GT(j["profile"]["profiled_step_ms"].get<double>(), 0);
  // the split by kind covers every op's self time (all rows are listed here)
  ASSERT_LT(j["profile"]["ops"].size(), 500u);
  double self_ms = 0, mm_ms = 0;
  for (const auto& row : j["profile"]["ops"]) {
    self_ms += row["self_ms"].get<double>();
    if (row["op"] == "aten::mm") mm_ms = row["self_ms"].get<double>();
  }
  const auto& split = j["profile"]["time_split"];
  EXPECT_EQ(split["source"], "CPU self times");
  EXPECT_NEAR(split["matmul_ms"].get<double>() + split["attention_ms"].get<double>() + split["other_ms"].get<double>(),
              self_ms, 1e-6 * self_ms + 1e-9);
  EXPECT_GE(split["matmul_ms"].get<double>(), mm_ms);
  const double matmul_attention_s = 1e-3 * (split["matmul_ms"].get<double>() + split["attention_ms"].get<double>());
  EXPECT_NEAR(split["mfu_ceiling_matmul_attention"].get<double>(),
              double(j["train_flops_per_token"].get<int64_t>()) * j["tokens_per_step"].get<double>() /
                  matmul_attention_s / (1e12 * j["peak_tflops"].get<double>()),
              1e-9);

  // --profile-shapes: rows carry the input shapes; without --profile it is refused
  auto s = moecpt::testing::run_moecpt("bench train --config " + path +
                                       " --set model.vocab_size=256 --set model.d_model=32 --set model.seq_len=16"
                                       " --layers 1 --steps 1 --warmup 1 --batch 2 --threads 1 --profile 5000"
                                       " --profile-shapes --json");  // every row: ~800 (op, shapes) pairs
  ASSERT_EQ(s.exit_code, 0) << s.output;
  // the router's torch::matmul of [T, d] x [d, E]: 2·16 tokens, d 32, E 15
  bool router_matmul = false;
  const auto js = nlohmann::json::parse(s.output);  // named: the loop below must not outlive it
  for (const auto& row : js["profile"]["ops"])
    router_matmul = router_matmul || (row["op"].get<std::string>() == "aten::matmul" &&
                                      row["shapes"].get<std::string>() == "[32, 32] [32, 15]");
  EXPECT_TRUE(router_matmul) << s.output.substr(0, 4000);
  EXPECT_NE(moecpt::testing::run_moecpt("bench train --config " + path + " --profile-shapes").exit_code, 0);
}
