// Crash safety: `moecpt train` is killed with SIGKILL at random moments, then
// resumed (--resume) each time. After every kill, every checkpoint directory
// that exists must be complete and loadable; the run finished after the last
// resume must have exactly the weights (bit for bit) and per-step losses of an
// uninterrupted run. scripts/crash-safety.sh runs this test with more kills.
// Environment (optional): MOECPT_CRASH_KILLS (default 10), MOECPT_CRASH_STEPS
// (default 30), MOECPT_CRASH_SEED (default: random, printed).
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <thread>

#include "core/config.h"
#include "core/error.h"
#include "core/safetensors.h"
#include "data/shard.h"
#include "model/transformer.h"
#include "test_shards.h"
#include "test_util.h"
#include "train/checkpoint.h"
#include "train/optimizer.h"
#include "train/trainer.h"

namespace moecpt {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::stoll(v) : fallback;
}

void write_data(const std::string& dir) {
  fs::create_directories(dir);
  for (const char* split : {"train", "val"}) {
    std::vector<uint32_t> toks;
    std::vector<uint64_t> offs = {0};
    for (int doc = 0; doc < 30; ++doc) {
      for (int i = 0; i < 50; ++i) toks.push_back(2 + uint32_t(doc * 7 + 3 * i) % 60);
      toks.push_back(1);
      offs.push_back(toks.size());
    }
    write_shard(dir + "/" + split + ".bin", toks, offs, 64);
  }
}

// A tiny MoE (so router state is part of what must survive) checkpointing every step.
std::string recipe(const std::string& data_dir, int64_t steps) {
  return testing::tiny_model_toml() + R"(ffn = "moe"
n_experts = 4
top_k = 2
expert_hidden = 16
[router]
type = "bias"
[optim]
lr = 1e-2
min_lr = 1e-3
[train]
steps = )" + std::to_string(steps) + R"(
batch_size = 4
log_every = 1000
eval_every = 0
eval_batches = 1
checkpoint_every = 1
keep_last = 2
[data]
shard_dir = ")" + data_dir + R"("
train = ["d0"]
validation = ["d0"]
)";
}

pid_t spawn_train(const std::string& cfg, const std::string& out, const std::string& log) {
  std::fflush(stdout);  // or the child's freopen flushes our buffered lines a second time
  const pid_t pid = ::fork();
  if (pid == 0) {
    FILE* f = std::freopen(log.c_str(), "a", stdout);
    if (f) ::dup2(::fileno(stdout), 2);
    const std::string set_out = "run.out_dir=\"" + out + "\"";
    ::execl(MOECPT_BINARY, MOECPT_BINARY, "train", "-c", cfg.c_str(), "--set", set_out.c_str(), "--resume",
            static_cast<char*>(nullptr));
    ::_exit(127);
  }
  return pid;
}

int64_t latest_step(const std::string& out) {
  const std::string dir = latest_checkpoint(out);
  return dir.empty() ? 0 : std::stoll(fs::path(dir).filename().string().substr(5));
}

// Every checkpoint directory under its final name holds exactly the four
// files, and each of them loads. Returns a description of the first problem.
std::string check_checkpoints(const std::string& out) {
  const fs::path dir = fs::path(out) / "checkpoints";
  if (!fs::exists(dir)) return "";
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    if (name.ends_with(".tmp") || name.find(".old.") != std::string::npos) continue;  // leftovers: ignored
    const bool is_final = name == "final";
    std::set<std::string> files;
    for (const auto& f : fs::directory_iterator(e.path())) files.insert(f.path().filename().string());
    std::set<std::string> want = {"config.toml", "model.safetensors", "trainer.json"};
    if (!is_final) want.insert("optimizer.pt");
    if (files != want) {
      std::string got;
      for (const auto& f : files) got += " " + f;
      return e.path().string() + ": incomplete checkpoint, holds" + got;
    }
    try {
      Config cfg = load_config((e.path() / "config.toml").string());
      model::Transformer m(cfg.model, cfg.router);
      load_model_weights(e.path().string(), *m);
      if (!is_final) {
        auto opt = make_adamw(*m, cfg.optim);
        load_optimizer_state(e.path().string(), *opt);
      }
      load_trainer_state(e.path().string());
    } catch (const std::exception& x) {
      return e.path().string() + ": does not load: " + x.what();
    }
  }
  return "";
}

std::vector<std::string> train_losses(const std::string& metrics_path) {
  std::ifstream in(metrics_path);
  std::vector<std::string> out;
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line);
    if (j["kind"] == "train") out.push_back(j["step"].dump() + ": " + j["loss"].dump() + " " + j["grad_norm"].dump());
  }
  return out;
}

TEST(CrashSafety, SigkillAtRandomMomentsThenResumeEqualsAnUninterruptedRun) {
  const int64_t kills_wanted = env_int("MOECPT_CRASH_KILLS", 10);
  const int64_t steps = std::max<int64_t>(env_int("MOECPT_CRASH_STEPS", 30), kills_wanted + 2);
  const uint64_t seed = uint64_t(env_int("MOECPT_CRASH_SEED", int64_t(std::random_device{}() & 0x7fffffff)));
  std::printf("crash-safety: %lld kills, %lld steps, seed %llu (MOECPT_CRASH_SEED)\n", (long long)kills_wanted,
              (long long)steps, (unsigned long long)seed);
  std::mt19937_64 rng(seed);
  testing::TempDir dir;
  write_data(dir / "d0");
  testing::write_text(dir / "run.toml", recipe(dir.path().string(), steps));

  // Uninterrupted reference; also times start-up and one step.
  const std::string ref = dir / "ref";
  const auto t0 = Clock::now();
  pid_t pid = spawn_train(dir / "run.toml", ref, dir / "ref.log");
  double t_first = -1;
  int status = 0;
  while (::waitpid(pid, &status, WNOHANG) == 0) {
    if (t_first < 0 && latest_step(ref) >= 1) t_first = std::chrono::duration<double>(Clock::now() - t0).count();
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  const double t_total = std::chrono::duration<double>(Clock::now() - t0).count();
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << testing::read_text(dir / "ref.log");
  ASSERT_GT(t_first, 0);
  const double step_s = std::max(1e-3, (t_total - t_first) / double(steps));
  std::printf("crash-safety: reference run %.2f s, first checkpoint after %.2f s, ~%.1f ms/step\n", t_total,
              t_first, step_s * 1e3);

  // Kill moments: mostly "once checkpoint K exists, plus a random part of a
  // step" (lands anywhere in the step, the checkpoint write and the pruning),
  // some at a random time since start (start-up, data loading, first eval).
  std::vector<int64_t> targets;
  std::uniform_int_distribution<int64_t> pick_step(1, steps - 1);
  for (int64_t i = 0; i < kills_wanted; ++i) targets.push_back(pick_step(rng));
  std::sort(targets.begin(), targets.end());
  std::uniform_real_distribution<double> unit(0.0, 1.0);

  const std::string out = dir / "crashy";
  int64_t kills = 0, lives = 0;
  std::vector<int64_t> killed_at;  // newest checkpoint at each kill
  for (int64_t target : targets) {
    ++lives;
    const bool by_time = unit(rng) < 0.2;
    const auto start = Clock::now();
    pid = spawn_train(dir / "run.toml", out, dir / "crashy.log");
    bool exited = false;
    if (by_time) {
      const auto until = start + std::chrono::duration<double>(unit(rng) * t_first * 1.2);
      while (Clock::now() < until && !(exited = ::waitpid(pid, &status, WNOHANG) != 0))
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
    } else {
      while (latest_step(out) < target && !(exited = ::waitpid(pid, &status, WNOHANG) != 0))
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
      if (!exited) std::this_thread::sleep_for(std::chrono::duration<double>(unit(rng) * 1.5 * step_s));
    }
    if (!exited) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
      ASSERT_TRUE(WIFSIGNALED(status) || (WIFEXITED(status) && WEXITSTATUS(status) == 0))
          << testing::read_text(dir / "crashy.log");
      if (WIFSIGNALED(status)) ++kills;
    } else {
      ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << testing::read_text(dir / "crashy.log");
    }
    killed_at.push_back(latest_step(out));
    const std::string problem = check_checkpoints(out);
    ASSERT_EQ(problem, "") << "after kill " << kills << " (seed " << seed << ")";
  }
  std::string progress;
  for (int64_t s : killed_at) (progress += ' ') += std::to_string(s);
  std::printf("crash-safety: %lld SIGKILLs in %lld lives; newest checkpoint at each kill:%s\n", (long long)kills,
              (long long)lives, progress.c_str());
  EXPECT_GE(kills, kills_wanted * 8 / 10) << "most lives must have been killed, not finished";

  // Resume to the end.
  pid = spawn_train(dir / "run.toml", out, dir / "crashy.log");
  ::waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << testing::read_text(dir / "crashy.log");
  ASSERT_EQ(check_checkpoints(out), "");

  // Bit-identical weights: same bytes on disk, and tensor by tensor.
  const std::string a = ref + "/checkpoints/final/model.safetensors", b = out + "/checkpoints/final/model.safetensors";
  EXPECT_TRUE(testing::read_text(a) == testing::read_text(b)) << "final model.safetensors differ (seed " << seed << ")";
  auto fa = load_safetensors(a), fb = load_safetensors(b);
  ASSERT_EQ(fa.order, fb.order);
  for (const auto& name : fa.order) EXPECT_TRUE(torch::equal(fa.tensors[name], fb.tensors[name])) << name;
  // Every step logged once, with the same loss and gradient norm.
  const auto la = train_losses(ref + "/metrics.jsonl"), lb = train_losses(out + "/metrics.jsonl");
  EXPECT_EQ(la.size(), size_t(steps));
  EXPECT_EQ(la, lb);
  // The same checkpoints remain, and no leftovers.
  auto listing = [](const std::string& o) {
    std::set<std::string> s;
    for (const auto& e : fs::directory_iterator(o + "/checkpoints")) s.insert(e.path().filename().string());
    return s;
  };
  EXPECT_EQ(listing(ref), listing(out));
}

}  // namespace
}  // namespace moecpt
