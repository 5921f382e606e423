// End to end: PT then CPT with replay on small shards; loss falls, outputs exist,
// bad configs and inputs stop the CLI with a clear message.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <thread>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/config.h"
#include "core/error.h"
#include "data/shard.h"
#include "model/weight_casts.h"
#include "train/trainer.h"
#include "test_shards.h"
#include "test_util.h"

namespace moecpt {
namespace {

// Two "domains" with different learnable structure: d0 counts up by 1, d1 by 3 (mod 60).
void write_domain(const std::string& dir, uint32_t step) { testing::write_domain(dir, step, 40); }

std::string tiny_recipe(const testing::TempDir& dir) {
  return testing::tiny_model_toml() + R"(ffn = "moe"
n_experts = 4
n_shared_experts = 1
top_k = 2
expert_hidden = 16
[optim]
lr = 1e-2
min_lr = 1e-3
[train]
steps = 60
batch_size = 8
log_every = 20
eval_every = 30
eval_batches = 2
[data]
shard_dir = ")" + dir.path().string() + R"("
train = ["d0"]
validation = ["d0", "d1"]
)";
}

// The two domains' shards and the tiny recipe as dir/pt.toml.
void write_tiny_run(const testing::TempDir& dir) {
  write_domain(dir / "d0", 1);
  write_domain(dir / "d1", 3);
  testing::write_text(dir / "pt.toml", tiny_recipe(dir));
}

// Trains the tiny recipe for 12 steps into dir/name with extra --set values;
// returns the per-step training losses from its metrics.jsonl.
std::vector<double> train_tiny_losses(const testing::TempDir& dir, const std::string& name,
                                      std::vector<std::string> sets) {
  sets.push_back("run.out_dir=\"" + (dir / name) + "\"");
  sets.push_back("train.steps=12");
  train(load_config(dir / "pt.toml", sets));
  std::vector<double> losses;
  std::ifstream in(dir / (name + "/metrics.jsonl"));
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line);
    if (j["kind"] == "train") losses.push_back(j["loss"].get<double>());
  }
  return losses;
}

TEST(TrainE2E, PretrainThenContinueWithReplay) {
  testing::TempDir dir;
  write_tiny_run(dir);

  Config pt = load_config(dir / "pt.toml", {"run.out_dir=\"" + (dir / "pt") + "\""});
  PhaseSummary s = train(pt);
  EXPECT_EQ(s.steps, 60);
  const double d0_before = s.initial_eval.at("d0").loss, d0_after = s.final_eval.at("d0").loss;
  EXPECT_NEAR(d0_before, std::log(64.0), 0.5);  // untrained: about uniform
  EXPECT_LT(d0_after, d0_before - 1.5) << "pre-training must learn the d0 pattern";
  ASSERT_EQ(s.final_eval.at("d0").mri.size(), 2u);  // one MRI per MoE layer
  for (double m : s.final_eval.at("d0").mri) {
    EXPECT_GE(m, 2.0 / 4.0 - 1e-9);  // MRI >= k/E
    EXPECT_LE(m, 1.0);
  }
  for (const char* f : {"config.toml", "metrics.jsonl", "summary.json", "checkpoints/final/model.safetensors",
                        "checkpoints/step-00000060/optimizer.pt"})
    EXPECT_TRUE(std::filesystem::exists(dir / ("pt/" + std::string(f)))) << f;
  // The effective config written next to the outputs loads back to the same config.
  EXPECT_EQ(to_toml(load_config(dir / "pt/config.toml")), to_toml(pt));

  Config cpt = load_config(dir / "pt.toml", {"run.out_dir=\"" + (dir / "cpt") + "\"", "data.train=d1",
                                             "data.replay=d0", "data.replay_fraction=0.25",
                                             "schedule.warmup_from=min_lr", "train.steps=40",
                                             "train.init_from=\"" + (dir / "pt/checkpoints/final") + "\""});
  PhaseSummary c = train(cpt);
  // CPT starts where PT ended (same weights) and learns d1.
  EXPECT_NEAR(c.initial_eval.at("d0").loss, d0_after, 1e-4);
  EXPECT_LT(c.final_eval.at("d1").loss, c.initial_eval.at("d1").loss - 1.0);

  // metrics.jsonl: one train line per step with the routing imbalance of every MoE layer.
  std::ifstream in(dir / "cpt/metrics.jsonl");
  std::string line;
  int train_lines = 0;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line);
    if (j["kind"] == "train") {
      ++train_lines;
      EXPECT_EQ(j["mri"].size(), 2u);
    }
  }
  EXPECT_EQ(train_lines, 40);
}

std::vector<std::string> train_losses(const std::string& metrics_path) {
  std::ifstream in(metrics_path);
  std::vector<std::string> out;
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line);
    if (j["kind"] == "train") out.push_back(j["loss"].dump() + " " + j["grad_norm"].dump() + " " + j["mri"].dump());
  }
  return out;
}

TEST(TrainE2E, InterruptedAndResumedRunIsBitIdentical) {
  testing::TempDir dir;
  write_tiny_run(dir);
  const std::vector<std::string> common = {"train.steps=24", "train.checkpoint_every=0", "data.train=[\"d0\",\"d1\"]",
                                           "router.type=sinkhorn"};
  auto with = [&](std::vector<std::string> v, const std::string& out) {
    v.insert(v.end(), common.begin(), common.end());
    v.push_back("run.out_dir=\"" + out + "\"");
    return v;
  };
  train(load_config(dir / "pt.toml", with({}, dir / "straight")));

  TrainOptions first;
  first.stop_after = 10;
  PhaseSummary partial = train(load_config(dir / "pt.toml", with({}, dir / "split")), first);
  EXPECT_EQ(partial.steps, 10);
  EXPECT_TRUE(partial.final_eval.empty());
  TrainOptions again;
  again.resume = true;
  PhaseSummary rest = train(load_config(dir / "pt.toml", with({}, dir / "split")), again);
  EXPECT_EQ(rest.steps, 24);

  const auto a = train_losses(dir / "straight/metrics.jsonl"), b = train_losses(dir / "split/metrics.jsonl");
  ASSERT_EQ(a.size(), 24u);
  EXPECT_EQ(a, b);  // loss, grad norm and MRI of every step, to the last printed digit
  const std::string wa = testing::read_text(dir / "straight/checkpoints/final/model.safetensors");
  const std::string wb = testing::read_text(dir / "split/checkpoints/final/model.safetensors");
  EXPECT_TRUE(wa == wb) << "final weights differ after resume";
  // The summary of the resumed run still knows the loss before training.
  EXPECT_EQ(rest.initial_eval.size(), 2u);

  // Resuming with a different model (or mixture) is refused, naming the checkpoint's config.
  try {
    train(load_config(dir / "pt.toml", with({"train.steps=30", "model.n_layers=3"}, dir / "split")), again);
    FAIL() << "resume with another model must fail";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("step-00000024/config.toml"), std::string::npos) << e.what();
  }
}

TEST(TrainE2E, MicroBatchesMatchTheFullBatchAndBf16Trains) {
  testing::TempDir dir;
  write_tiny_run(dir);
  // Gradient accumulation over 4 micro-batches of 2 = one batch of 8 (up to fp32 rounding;
  // dense so that the per-micro-batch aux loss does not enter).
  auto full = train_tiny_losses(dir, "full", {"model.ffn=dense"});
  auto accum = train_tiny_losses(dir, "accum", {"model.ffn=dense", "train.micro_batch_size=2"});
  ASSERT_EQ(full.size(), 12u);
  for (size_t i = 0; i < full.size(); ++i) EXPECT_NEAR(full[i], accum[i], 2e-4 * std::abs(full[i])) << "step " << i;
  // bf16 autocast (routers in fp32): trains, close to the fp32 run at the start.
  auto bf16 = train_tiny_losses(dir, "bf16", {"run.dtype=bfloat16"});
  auto fp32 = train_tiny_losses(dir, "fp32", {});
  EXPECT_NEAR(bf16.front(), fp32.front(), 0.05);
  EXPECT_LT(bf16.back(), bf16.front() - 0.5);
}

TEST(TrainE2E, WeightCastsKeptAcrossMicroBatchesTrainBitIdentically) {
  // bf16 with 4 micro-batches per step: the weights' bf16 copies made once per
  // step (model/weight_casts.h, on by default) or in every micro-batch
  // (MOECPT_CAST_CACHE=0) give the same losses to the last bit.
  testing::TempDir dir;
  write_tiny_run(dir);
  const std::vector<std::string> sets = {"run.dtype=\"bfloat16\"", "train.micro_batch_size=2"};
  const auto before = model::cast_cache_counts();
  auto kept = train_tiny_losses(dir, "kept", sets);
  const auto after = model::cast_cache_counts();
  ::setenv("MOECPT_CAST_CACHE", "0", 1);
  auto plain = train_tiny_losses(dir, "plain", sets);
  ::unsetenv("MOECPT_CAST_CACHE");
  EXPECT_EQ(model::cast_cache_counts().hits, after.hits);  // switched off: nothing reused
  // 12 steps × 3 reusing micro-batches × 17 casts (2 MoE layers × 8 + the head)
  EXPECT_EQ(after.hits - before.hits, 12 * 3 * 17);
  ASSERT_EQ(kept.size(), 12u);
  EXPECT_EQ(kept, plain);
  // On a GPU the experts' grouped GEMMs reuse the w1 | w3 copy (a custom
  // autograd node) and autocast runs on CUDA: the same check there (a weight
  // copy kept past an optimizer step would move the losses far more).
  if (!torch::cuda::is_available()) return;
  std::vector<std::string> gpu = sets;
  gpu.push_back("run.device=\"cuda\"");
  auto kept_gpu = train_tiny_losses(dir, "kept-gpu", gpu);
  ::setenv("MOECPT_CAST_CACHE", "0", 1);
  auto plain_gpu = train_tiny_losses(dir, "plain-gpu", gpu);
  ::unsetenv("MOECPT_CAST_CACHE");
  ASSERT_EQ(kept_gpu.size(), 12u);
  ASSERT_EQ(plain_gpu.size(), 12u);
  for (size_t i = 0; i < kept_gpu.size(); ++i)  // room for a kernel with atomics, as the graph test below
    EXPECT_NEAR(kept_gpu[i], plain_gpu[i], 1e-3 * std::abs(plain_gpu[i])) << "step " << i + 1;
}

TEST(TrainE2E, ActivationCheckpointingTrainsBitIdentically) {
  // Recomputing the blocks in the backward changes memory, not maths: the
  // same 12 MoE steps (Z+Aux router) give the same losses to the last bit.
  testing::TempDir dir;
  write_tiny_run(dir);
  auto plain = train_tiny_losses(dir, "plain", {});
  auto recompute = train_tiny_losses(dir, "recompute", {"train.activation_checkpointing=\"full\""});
  ASSERT_EQ(plain.size(), 12u);
  EXPECT_EQ(plain, recompute);
  EXPECT_LT(plain.back(), plain.front() - 0.5);
}

TEST(TrainE2E, CudaGraphIsRefusedOffCudaAndTrainsLikeEagerOnAGpu) {
  testing::TempDir dir;
  write_tiny_run(dir);
  try {
    train_tiny_losses(dir, "cpu-graph", {"train.cuda_graph=true"});
    FAIL() << "train.cuda_graph on the CPU must be refused";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("train.cuda_graph = true needs run.device = \"cuda\""), std::string::npos)
        << e.what();
  }
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  // The tiny MoE (top-k router, grouped experts in bf16) with two micro-batches
  // per step: eagerly, and with the graphs (steps 1 eager, 2 captures both
  // graphs, 3-12 replay them). The same kernels run, so the losses agree; the
  // bound leaves room for a kernel with atomics.
  const std::vector<std::string> gpu = {"run.device=\"cuda\"", "run.dtype=\"bfloat16\"", "train.micro_batch_size=4"};
  auto eager = train_tiny_losses(dir, "eager", gpu);
  auto with_graph = gpu;
  with_graph.push_back("train.cuda_graph=true");
  auto graphed = train_tiny_losses(dir, "graphed", with_graph);
  ASSERT_EQ(eager.size(), 12u);
  ASSERT_EQ(graphed.size(), 12u);
  for (size_t i = 0; i < eager.size(); ++i)
    EXPECT_NEAR(graphed[i], eager[i], 1e-3 * std::abs(eager[i])) << "step " << i + 1;
  EXPECT_LT(graphed.back(), graphed.front() - 0.5);
}

TEST(TrainE2E, MetricsWriteFailureStopsNamingTheFile) {
  // A full disk, simulated with a file-size limit (ulimit -f; SIGXFSZ ignored
  // so the write fails with EFBIG instead of killing the process): the run
  // must stop with the metrics file named, not go on losing lines.
  testing::TempDir dir;
  write_tiny_run(dir);
  const std::string cmd = "bash -c 'ulimit -f 16; trap \"\" XFSZ; exec " + std::string(MOECPT_BINARY) +
                          " train -c " + (dir / "pt.toml") + " --set run.out_dir=\"" + (dir / "run") +
                          "\" --set train.steps=5000 --set train.eval_every=0' 2>&1";
  FILE* p = ::popen(cmd.c_str(), "r");
  ASSERT_NE(p, nullptr);
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  const int status = ::pclose(p);
  ASSERT_TRUE(WIFEXITED(status)) << out;
  EXPECT_EQ(WEXITSTATUS(status), 1) << out;
  EXPECT_NE(out.find("metrics.jsonl: cannot write metrics"), std::string::npos) << out.substr(out.size() > 3000 ? out.size() - 3000 : 0);
}

TEST(TrainE2E, NonFiniteLossStopsNamingTheLastCheckpoint) {
  testing::TempDir dir;
  write_tiny_run(dir);
  try {
    // An absurd learning rate drives the weights, then the loss, to inf/NaN.
    train(load_config(dir / "pt.toml", {"run.out_dir=\"" + (dir / "x") + "\"", "optim.lr=1e30",
                                        "optim.min_lr=1e29", "optim.grad_clip=0", "schedule.warmup_fraction=0"}));
    FAIL() << "expected the run to stop";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("non-finite loss at step"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("last good checkpoint"), std::string::npos) << e.what();
  }
}

TEST(TrainE2E, InitFromWrongModelNamesTheTensor) {
  testing::TempDir dir;
  write_tiny_run(dir);
  train(load_config(dir / "pt.toml", {"run.out_dir=\"" + (dir / "pt") + "\"", "train.steps=2"}));
  try {
    train(load_config(dir / "pt.toml", {"run.out_dir=\"" + (dir / "x") + "\"", "model.d_model=48",
                                        "train.init_from=\"" + (dir / "pt/checkpoints/final") + "\""}));
    FAIL();
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("model.safetensors"), std::string::npos) << m;
    EXPECT_NE(m.find("has shape"), std::string::npos) << m;
  }
}

TEST(TrainE2E, CorruptOrMissingCheckpointIsNamed) {
  testing::TempDir dir;
  write_tiny_run(dir);
  train(load_config(dir / "pt.toml", {"run.out_dir=\"" + (dir / "pt") + "\"", "train.steps=2"}));
  const std::string weights = dir / "pt/checkpoints/final/model.safetensors";
  std::filesystem::resize_file(weights, std::filesystem::file_size(weights) / 2);
  auto init = [&](const std::string& from) {
    try {
      train(load_config(dir / "pt.toml", {"run.out_dir=\"" + (dir / "x") + "\"", "train.steps=1",
                                          "train.init_from=\"" + from + "\""}));
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  std::string e = init(dir / "pt/checkpoints/final");
  EXPECT_NE(e.find(weights), std::string::npos) << e;
  e = init(dir / "pt/checkpoints/absent");
  EXPECT_NE(e.find("absent/model.safetensors: checkpoint weights not found"), std::string::npos) << e;
}

// SIGINT finishes the step, writes a checkpoint, exits 0; --resume completes the run.
TEST(TrainE2E, SigintCheckpointsAndResumeFinishes) {
  testing::TempDir dir;
  write_tiny_run(dir);
  const std::string out = dir / "run";
  const pid_t pid = ::fork();
  if (pid == 0) {
    const std::string cfg = dir / "pt.toml", set_out = "run.out_dir=\"" + out + "\"";
    ::execl(MOECPT_BINARY, MOECPT_BINARY, "train", "-c", cfg.c_str(), "--set", set_out.c_str(), "--set",
            "train.steps=300", "--set", "train.eval_every=0", static_cast<char*>(nullptr));
    ::_exit(127);
  }
  // Wait until training is under way (a few train lines), then interrupt.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (std::chrono::steady_clock::now() < deadline) {
    const std::string m = testing::read_text(out + "/metrics.jsonl");
    if (std::count(m.begin(), m.end(), '\n') >= 5) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ::kill(pid, SIGINT);
  int status = 0;
  ::waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFEXITED(status)) << "killed by a signal instead of stopping cleanly";
  EXPECT_EQ(WEXITSTATUS(status), 0);
  const std::string ckpt = latest_checkpoint(out);
  ASSERT_FALSE(ckpt.empty());
  const int64_t stopped = nlohmann::json::parse(testing::read_text(ckpt + "/trainer.json"))["step"];
  EXPECT_GT(stopped, 0);
  EXPECT_LT(stopped, 300);
  EXPECT_FALSE(std::filesystem::exists(out + "/summary.json"));
  auto r = testing::run_moecpt("train -c " + (dir / "pt.toml") + " --set run.out_dir=\"" + out +
                               "\" --set train.steps=300 --set train.eval_every=0 --resume --set train.log_every=1000");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("resumed"), std::string::npos) << r.output;
  EXPECT_TRUE(std::filesystem::exists(out + "/summary.json"));
}

TEST(TrainE2E, CliRejectsBadConfigsBeforeStarting) {
  testing::TempDir dir;
  testing::write_text(dir / "r.toml", "[model]\nffn = \"moe\"\nn_experts = 4\ntop_k = 2\nexpert_hidden = 8\n");
  auto r = testing::run_moecpt("train -c " + (dir / "r.toml") + " --set model.top_k=9 --set run.out_dir=" +
                               (dir / "out"));
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.output.find("error: " + (dir / "r.toml") + ": key 'model.top_k'"), std::string::npos) << r.output;
  EXPECT_FALSE(std::filesystem::exists(dir / "out")) << "no run may start on a bad config";
  r = testing::run_moecpt("train -c " + (dir / "nope.toml"));
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.output.find("nope.toml: config file not found"), std::string::npos) << r.output;
  r = testing::run_moecpt("train -c " + (dir / "r.toml") + " --set data.replay_fraction=2");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.output.find("data.replay_fraction"), std::string::npos) << r.output;
  // Missing shards: the message names the shard file.
  r = testing::run_moecpt("train -c " + (dir / "r.toml") + " --set data.shard_dir=" + (dir / "none") +
                          " --set run.out_dir=" + (dir / "out2"));
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.output.find((dir / "none") + "/en/train.bin"), std::string::npos) << r.output;
}

TEST(TrainE2E, ConfigCommandPrintsEffectiveConfig) {
  auto r = testing::run_moecpt(std::string("config -c ") + MOECPT_SOURCE_DIR +
                               "/recipes/quickstart/cpt.toml --set model.n_layers=3");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("n_layers = 3"), std::string::npos);
  EXPECT_NE(r.output.find("replay_fraction = 0.4"), std::string::npos);
  EXPECT_NE(r.output.find("n_experts = 15"), std::string::npos);  // inherited from the base recipe
}

}  // namespace
}  // namespace moecpt
