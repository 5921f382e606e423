// Data parallel on c10d/Gloo (docs/distributed.md): W processes on 127.0.0.1
// with a global batch of 2B (B per rank) train exactly what one process with
// batch 2B trains — per-step losses, aux losses, routed loads and evaluation
// agree to floating-point tolerance — for dense, top-k (Z+Aux, whose aux loss
// must be the global one) and aux-loss-free MoE; a checkpoint written by 2 ranks
// resumes in 1 process; a rank that dies fails the job with a clear message.
// Expert parallel (parallel.expert_parallel = 2): the experts sharded over 2
// ranks with all-to-all dispatch train what 1 process trains, and checkpoints
// move between the layouts; the all-to-all autograd Function and the sharded
// MoE layer are checked against the local layer (outputs and gradients) with
// two "ranks" as threads of one process.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>
#include <mutex>

#include "core/config.h"
#include "core/pch.h"
#include "data/shard.h"
#include "model/moe.h"
#include "model/moe_expert_parallel.h"
#include "model/router_topk.h"
#include "train/distributed.h"
#include "train/optimizer.h"
#include "test_shards.h"
#include "test_util.h"

namespace moecpt {
namespace {

using nlohmann::json;

// Two learnable "domains": d0 counts up by 1, d1 by 3 (mod 60).
void write_domain(const std::string& dir, uint32_t step) { testing::write_domain(dir, step, 40); }

struct Fixture {
  testing::TempDir dir;
  std::string recipe;
  explicit Fixture(const std::string& ffn) {
    write_domain(dir / "d0", 1);
    write_domain(dir / "d1", 3);
    recipe = dir / "r.toml";
    testing::write_text(recipe, testing::tiny_model_toml() + R"(ffn = ")" + ffn + R"("
n_experts = 4
n_shared_experts = 1
top_k = 2
expert_hidden = 16
[router]
aux_alpha = 0.1
[optim]
lr = 1e-2
min_lr = 1e-3
[train]
steps = 20
batch_size = 8
log_every = 100
eval_every = 10
eval_batches = 3
[data]
shard_dir = ")" + dir.path().string() + R"("
train = ["d0"]
replay = ["d1"]
replay_fraction = 0.25
validation = ["d0", "d1"]
)");
  }
  std::string train_args(const std::string& out, const std::string& extra = "") const {
    return "train -c " + recipe + " --set run.out_dir=\"" + (dir / out) + "\" " + extra;
  }
};

std::vector<json> metric_lines(const std::string& path, const std::string& kind) {
  std::ifstream in(path);
  std::vector<json> out;
  std::string line;
  while (std::getline(in, line))
    if (!line.empty()) {
      auto j = json::parse(line);
      if (j["kind"] == kind) out.push_back(j);
    }
  return out;
}

// Per-step train metrics of two runs agree: losses to `tol`, loads/MRI to `tol`.
void expect_same_training(const std::string& ref_metrics, const std::string& dp_metrics, int steps, double tol) {
  auto a = metric_lines(ref_metrics, "train"), b = metric_lines(dp_metrics, "train");
  ASSERT_EQ(a.size(), size_t(steps)) << ref_metrics;
  ASSERT_EQ(b.size(), size_t(steps)) << dp_metrics;
  double worst = 0;
  for (int i = 0; i < steps; ++i)
    for (const char* k : {"loss", "aux_loss", "z_loss", "grad_norm"})
      worst = std::max(worst, std::abs(a[i][k].get<double>() - b[i][k].get<double>()) / (1 + std::abs(a[i][k].get<double>())));
  std::printf("largest relative difference of loss/aux/z/grad_norm over %d steps: %.3g\n", steps, worst);
  for (int i = 0; i < steps; ++i) {
    SCOPED_TRACE("step " + std::to_string(i + 1));
    EXPECT_EQ(a[i]["step"], b[i]["step"]);
    EXPECT_EQ(a[i]["tokens"], b[i]["tokens"]);
    for (const char* k : {"loss", "aux_loss", "z_loss", "grad_norm"})
      EXPECT_NEAR(a[i][k].get<double>(), b[i][k].get<double>(), tol * (1 + std::abs(a[i][k].get<double>()))) << k;
    ASSERT_EQ(a[i].contains("loads"), b[i].contains("loads"));
    if (!a[i].contains("loads")) continue;
    for (size_t l = 0; l < a[i]["loads"].size(); ++l)
      for (size_t e = 0; e < a[i]["loads"][l].size(); ++e)
        EXPECT_NEAR(a[i]["loads"][l][e].get<double>(), b[i]["loads"][l][e].get<double>(), 1e-9)
            << "layer " << l << " expert " << e;
  }
  auto ea = metric_lines(ref_metrics, "eval"), eb = metric_lines(dp_metrics, "eval");
  ASSERT_EQ(ea.size(), eb.size());
  for (size_t i = 0; i < ea.size(); ++i)
    for (const char* set : {"d0", "d1"}) {
      EXPECT_NEAR(ea[i]["eval"][set]["loss"].get<double>(), eb[i]["eval"][set]["loss"].get<double>(), tol * 5);
      EXPECT_EQ(ea[i]["eval"][set]["tokens"], eb[i]["eval"][set]["tokens"]);
    }
}

// The loss must actually move, or agreeing would prove little.
void expect_learning(const std::string& metrics) {
  auto a = metric_lines(metrics, "train");
  ASSERT_FALSE(a.empty());
  EXPECT_LT(a.back()["loss"].get<double>(), a.front()["loss"].get<double>() - 0.5);
}

void data_parallel_equals_one_process(const std::string& ffn, const std::string& extra) {
  Fixture f(ffn);
  auto one = testing::run_moecpt(f.train_args("one", extra));
  ASSERT_EQ(one.exit_code, 0) << one.output;
  auto two = testing::run_moecpt("launch --nproc 2 -- " + f.train_args("two", extra));
  ASSERT_EQ(two.exit_code, 0) << two.output;
  EXPECT_NE(two.output.find("data parallel: 2 ranks on gloo"), std::string::npos) << two.output;
  expect_learning(f.dir / "one/metrics.jsonl");
  expect_same_training(f.dir / "one/metrics.jsonl", f.dir / "two/metrics.jsonl", 20, 1e-5);
  // Rank 0 alone wrote the outputs; the checkpoint holds the global sampler state.
  auto s1 = json::parse(testing::read_text(f.dir / "one/checkpoints/final/trainer.json"));
  auto s2 = json::parse(testing::read_text(f.dir / "two/checkpoints/final/trainer.json"));
  EXPECT_EQ(s1["sampler"], s2["sampler"]);
}

TEST(Distributed, TwoRanksEqualOneProcessDense) { data_parallel_equals_one_process("dense", ""); }

TEST(Distributed, TwoRanksEqualOneProcessTopKMoEWithGlobalAuxLoss) {
  data_parallel_equals_one_process("moe", "");
}

TEST(Distributed, TwoRanksEqualOneProcessAuxFreeMoEWithMicroBatches) {
  // Bias router: the bias update must use the global loads; micro-batches are global too.
  data_parallel_equals_one_process("moe", "--set router.type=bias --set router.bias_gamma=0.01 "
                                          "--set train.micro_batch_size=4");
}

// The router hook alone, in one process: two "ranks" holding halves of a batch,
// each with dp_sum returning its counts plus the other half's. The mean of their
// aux losses is the aux loss of the whole batch, and so is the mean of their
// router-weight gradients (what data parallel's gradient averaging computes).
TEST(Distributed, TopKRouterGlobalAuxLossFromTwoHalvesEqualsTheWholeBatch) {
  torch::manual_seed(7);
  ModelConfig mc;
  mc.d_model = 8;
  mc.n_experts = 4;
  mc.top_k = 2;
  mc.init_std = 0.5;
  RouterConfig rc;
  rc.aux_alpha = 0.3;
  rc.z_beta = 0.01;
  auto router = std::make_shared<model::TopKRouter>(rc, mc);
  auto x = torch::randn({24, 8}, torch::kFloat64) * torch::linspace(0.2, 2.0, 24, torch::kFloat64).unsqueeze(1);
  auto whole = router->route(x);
  whole.aux_loss.backward();
  const auto g_whole = router->weight_ED.grad().clone();
  const double aux_whole = whole.aux_loss.item<double>();
  router->weight_ED.mutable_grad().zero_();

  const torch::Tensor half[2] = {x.narrow(0, 0, 12), x.narrow(0, 12, 12)};
  torch::Tensor counts_T[2];  // [E+1]: counts and T of each half, as the hook sums them
  for (int r = 0; r < 2; ++r) {
    torch::NoGradGuard ng;
    auto info = router->route(half[r]);
    counts_T[r] = torch::cat({info.tokens_per_expert_E.to(torch::kFloat64), torch::full({1}, 12.0, torch::kFloat64)});
  }
  double aux_mean = 0, aux_local_mean = 0;
  for (int r = 0; r < 2; ++r) {
    router->dp_sum = [&, r](const torch::Tensor& t) {
      EXPECT_TRUE(torch::equal(t, counts_T[r]));
      return t + counts_T[1 - r];
    };
    auto info = router->route(half[r]);
    (info.aux_loss / 2.0).backward();
    aux_mean += info.aux_loss.item<double>() / 2;
    router->dp_sum = nullptr;
    torch::NoGradGuard ng;
    aux_local_mean += router->route(half[r]).aux_loss.item<double>() / 2;
  }
  EXPECT_NEAR(aux_mean, aux_whole, 1e-12);
  // The router weight is fp32 (only the matmul runs in double here).
  EXPECT_TRUE(torch::allclose(router->weight_ED.grad(), g_whole, 1e-5, 1e-7))
      << router->weight_ED.grad() << g_whole;
  // The per-rank definition (each half's own f_i) is a different number on this batch.
  EXPECT_GT(std::abs(aux_local_mean - aux_whole), 1e-4);
}

// Negative control: with each rank's own f_i (MOECPT_DP_AUX=local, the per-rank
// definition), the aux loss is off by far more than the 1e-5 tolerance of the
// comparisons above (global: ~1e-7 measured) — so they do test the global aux loss.
TEST(Distributed, PerRankAuxLossDiffersFromTheGlobalOne) {
  Fixture f("moe");
  auto one = testing::run_moecpt(f.train_args("one", "--set train.steps=5"));
  ASSERT_EQ(one.exit_code, 0) << one.output;
  ::setenv("MOECPT_DP_AUX", "local", 1);
  auto two = testing::run_moecpt("launch --nproc 2 -- " + f.train_args("two", "--set train.steps=5"));
  ::unsetenv("MOECPT_DP_AUX");
  ASSERT_EQ(two.exit_code, 0) << two.output;
  auto a = metric_lines(f.dir / "one/metrics.jsonl", "train"), b = metric_lines(f.dir / "two/metrics.jsonl", "train");
  ASSERT_EQ(a.size(), 5u);
  ASSERT_EQ(b.size(), 5u);
  double max_diff = 0;
  for (size_t i = 0; i < a.size(); ++i)
    max_diff = std::max(max_diff, std::abs(a[i]["aux_loss"].get<double>() - b[i]["aux_loss"].get<double>()));
  EXPECT_GT(max_diff, 1e-4) << "per-rank aux equals the global one: the equality tests could not tell them apart";
}

TEST(Distributed, CheckpointOfTwoRanksResumesInOneProcess) {
  Fixture f("moe");
  auto ref = testing::run_moecpt(f.train_args("ref"));
  ASSERT_EQ(ref.exit_code, 0) << ref.output;
  auto two = testing::run_moecpt("launch --nproc 2 -- " + f.train_args("run", "--stop-after 10"));
  ASSERT_EQ(two.exit_code, 0) << two.output;
  ASSERT_TRUE(std::filesystem::exists(f.dir / "run/checkpoints/step-00000010/trainer.json")) << two.output;
  auto one = testing::run_moecpt(f.train_args("run", "--resume"));
  ASSERT_EQ(one.exit_code, 0) << one.output;
  EXPECT_NE(one.output.find("resumed"), std::string::npos) << one.output;
  // Steps 1–10 from 2 ranks, 11–20 from 1 process: together the 1-process run.
  expect_same_training(f.dir / "ref/metrics.jsonl", f.dir / "run/metrics.jsonl", 20, 1e-5);
}

TEST(Distributed, BatchNotDivisibleByRanksIsRefused) {
  Fixture f("dense");
  auto r = testing::run_moecpt("launch --nproc 3 -- " + f.train_args("x"));
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.output.find("not divisible by WORLD_SIZE = 3"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("launch: the job failed: rank"), std::string::npos) << r.output;
}

// Start `moecpt <args>` in the background, stdout+stderr to `log`, with extra environment.
pid_t spawn(const std::vector<std::string>& args, const std::vector<std::pair<std::string, std::string>>& env,
            const std::string& log) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    for (const auto& [k, v] : env) ::setenv(k.c_str(), v.c_str(), 1);
    FILE* f = std::freopen(log.c_str(), "w", stdout);
    if (f == nullptr) ::_exit(126);
    ::dup2(1, 2);
    std::vector<char*> argv{const_cast<char*>(MOECPT_BINARY)};
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    ::execv(MOECPT_BINARY, argv.data());
    ::_exit(127);
  }
  return pid;
}

// Wait for `pid` at most `seconds`; returns the wait status, or -1 on timeout (then kills it).
int wait_for(pid_t pid, int seconds) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(seconds);
  while (std::chrono::steady_clock::now() < deadline) {
    int status = 0;
    if (::waitpid(pid, &status, WNOHANG) == pid) return status;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ::kill(pid, SIGKILL);
  ::waitpid(pid, nullptr, 0);
  return -1;
}

bool wait_for_train_lines(const std::string& metrics, int n, int seconds) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(seconds);
  while (std::chrono::steady_clock::now() < deadline) {
    const std::string m = testing::read_text(metrics);
    if (std::count(m.begin(), m.end(), '\n') >= n) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return false;
}

std::vector<std::string> split_args(const std::string& s) {
  std::vector<std::string> out;
  std::string cur;
  for (char c : s) {
    if (c == ' ') {
      if (!cur.empty()) out.push_back(cur);
      cur.clear();
    } else if (c != '"') {
      cur += c;
    }
  }
  if (!cur.empty()) out.push_back(cur);
  return out;
}

// torchrun-style: two `moecpt train` processes with RANK/WORLD_SIZE/MASTER_*.
// SIGKILL of rank 1 mid-run: rank 0 stops with an error naming the failed
// collective instead of hanging (its socket to rank 1 closes).
TEST(Distributed, KilledRankFailsTheOtherWithAClearMessage) {
  Fixture f("moe");
  const auto args = split_args(f.train_args("run", "--set train.steps=100000 --set train.eval_every=0"));
  const std::string port = std::to_string(20000 + ::getpid() % 20000);
  auto env = [&](int rank) {
    return std::vector<std::pair<std::string, std::string>>{
        {"RANK", std::to_string(rank)}, {"WORLD_SIZE", "2"},     {"LOCAL_RANK", std::to_string(rank)},
        {"MASTER_ADDR", "127.0.0.1"},   {"MASTER_PORT", port}, {"MOECPT_DIST_TIMEOUT_S", "60"}};
  };
  const pid_t r0 = spawn(args, env(0), f.dir / "rank0.log");
  const pid_t r1 = spawn(args, env(1), f.dir / "rank1.log");
  const bool started = wait_for_train_lines(f.dir / "run/metrics.jsonl", 3, 120);
  ::kill(r1, SIGKILL);
  ::waitpid(r1, nullptr, 0);
  ASSERT_TRUE(started) << testing::read_text(f.dir / "rank0.log") << testing::read_text(f.dir / "rank1.log");
  const int status = wait_for(r0, 50);  // well under the 60 s collective timeout: no timeout needed
  const std::string log0 = testing::read_text(f.dir / "rank0.log");
  ASSERT_NE(status, -1) << "rank 0 hung after rank 1 died:\n" << log0;
  ASSERT_TRUE(WIFEXITED(status)) << log0;
  EXPECT_EQ(WEXITSTATUS(status), 1) << log0;
  EXPECT_NE(log0.find("error: rank 0 of 2:"), std::string::npos) << log0;
  EXPECT_NE(log0.find("another rank died or stopped answering"), std::string::npos) << log0;
}

// A rank that hangs (SIGSTOP: its sockets stay open) is caught by the collective
// timeout: rank 0 fails naming it after MOECPT_DIST_TIMEOUT_S, instead of waiting forever.
TEST(Distributed, HungRankFailsTheOtherAfterTheTimeout) {
  Fixture f("dense");
  const auto args = split_args(f.train_args("run", "--set train.steps=100000 --set train.eval_every=0"));
  const std::string port = std::to_string(20000 + (::getpid() + 7919) % 20000);
  auto env = [&](int rank) {
    return std::vector<std::pair<std::string, std::string>>{
        {"RANK", std::to_string(rank)}, {"WORLD_SIZE", "2"},     {"LOCAL_RANK", std::to_string(rank)},
        {"MASTER_ADDR", "127.0.0.1"},   {"MASTER_PORT", port}, {"MOECPT_DIST_TIMEOUT_S", "10"}};
  };
  const pid_t r0 = spawn(args, env(0), f.dir / "rank0.log");
  const pid_t r1 = spawn(args, env(1), f.dir / "rank1.log");
  const bool started = wait_for_train_lines(f.dir / "run/metrics.jsonl", 3, 120);
  ::kill(r1, SIGSTOP);
  const int status = wait_for(r0, 60);  // kills it on timeout
  ::kill(r1, SIGKILL);
  ::waitpid(r1, nullptr, 0);
  const std::string log0 = testing::read_text(f.dir / "rank0.log");
  ASSERT_TRUE(started) << log0 << testing::read_text(f.dir / "rank1.log");
  ASSERT_NE(status, -1) << "rank 0 hung behind a stopped rank 1:\n" << log0;
  ASSERT_TRUE(WIFEXITED(status)) << log0;
  EXPECT_EQ(WEXITSTATUS(status), 1) << log0;
  EXPECT_NE(log0.find("error: rank 0 of 2:"), std::string::npos) << log0;
  EXPECT_NE(log0.find("timeout 10 s"), std::string::npos) << log0;
}

// `moecpt launch`: one rank killed, the launcher stops the rest and fails naming it.
TEST(Distributed, LauncherFailsTheJobWhenARankDies) {
  Fixture f("dense");
  auto args = split_args("launch --nproc 2 -- " + f.train_args("run", "--set train.steps=100000 --set train.eval_every=0"));
  const pid_t launcher = spawn(args, {}, f.dir / "launch.log");
  const bool started = wait_for_train_lines(f.dir / "run/metrics.jsonl", 3, 120);
  std::string log = testing::read_text(f.dir / "launch.log");
  // "launch: 2 ranks on 127.0.0.1:PORT (pids A B)"
  const auto at = log.find("(pids ");
  ASSERT_TRUE(started && at != std::string::npos) << log;
  int pid0 = 0, pid1 = 0;
  ASSERT_EQ(std::sscanf(log.c_str() + at, "(pids %d %d)", &pid0, &pid1), 2) << log;
  ::kill(pid1, SIGKILL);
  const int status = wait_for(launcher, 60);
  log = testing::read_text(f.dir / "launch.log");
  ASSERT_NE(status, -1) << "the launcher hung after a rank died:\n" << log;
  ASSERT_TRUE(WIFEXITED(status)) << log;
  EXPECT_EQ(WEXITSTATUS(status), 1) << log;
  EXPECT_NE(log.find("launch: the job failed: rank 1 (pid " + std::to_string(pid1) + ") was killed by signal 9"),
            std::string::npos)
      << log;
  EXPECT_NE(::kill(pid0, 0), 0) << "rank 0 outlived the failed job";
}

// SIGTERM to the launcher is forwarded: all ranks stop after the same step,
// rank 0 checkpoints, every process exits 0, and --resume on 2 ranks finishes.
TEST(Distributed, SignalToLauncherStopsAllRanksAtOneStep) {
  Fixture f("moe");
  const std::string extra = "--set train.steps=150 --set train.eval_every=0";
  auto args = split_args("launch --nproc 2 -- " + f.train_args("run", extra));
  const pid_t launcher = spawn(args, {}, f.dir / "launch.log");
  ASSERT_TRUE(wait_for_train_lines(f.dir / "run/metrics.jsonl", 4, 120)) << testing::read_text(f.dir / "launch.log");
  ::kill(launcher, SIGTERM);
  const int status = wait_for(launcher, 60);
  const std::string log = testing::read_text(f.dir / "launch.log");
  ASSERT_NE(status, -1) << log;
  ASSERT_TRUE(WIFEXITED(status)) << log;
  EXPECT_EQ(WEXITSTATUS(status), 0) << log;
  EXPECT_NE(log.find("stopped at step"), std::string::npos) << log;
  auto r = testing::run_moecpt("launch --nproc 2 -- " + f.train_args("run", extra + " --resume"));
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(metric_lines(f.dir / "run/metrics.jsonl", "train").size(), 150u);
}

// --- expert parallel -------------------------------------------------------------

// n ranks as n threads of this process, each with its own Gloo group on
// 127.0.0.1 (the same code path as n processes, without the processes).
void run_ranks(int n, int port, const std::function<void(const std::shared_ptr<dist::Group>&)>& body) {
  std::vector<std::string> errors(static_cast<size_t>(n));
  std::vector<std::thread> ts;
  for (int r = 0; r < n; ++r)
    ts.emplace_back([&, r] {
      try {
        dist::Env env;
        env.rank = r;
        env.world_size = n;
        env.master_port = port;
        body(dist::Group::create(env, torch::kCPU));
      } catch (const std::exception& e) {
        errors[size_t(r)] = e.what();
      }
    });
  for (auto& t : ts) t.join();
  for (int r = 0; r < n; ++r) ASSERT_EQ(errors[size_t(r)], "") << "rank " << r;
}
void run_two_ranks(int port, const std::function<void(const std::shared_ptr<dist::Group>&)>& body) {
  run_ranks(2, port, body);
}

int test_port(int salt) { return 20000 + int((::getpid() * 31 + salt * 7919) % 20000); }

// The all-to-all autograd Function alone: rank r sends rows to rank j with
// chosen splits; the output is what the other rank sent, and the gradient of
// sum(out · c) is c's rows routed back to where they came from.
TEST(ExpertParallel, AllToAllFunctionForwardAndBackward) {
  // rank 0 sends 1 row to itself and 3 to rank 1; rank 1 sends 2 to rank 0 and 0 to itself.
  const std::vector<int64_t> send[2] = {{1, 3}, {2, 0}};
  const std::vector<int64_t> recv[2] = {{1, 2}, {3, 0}};
  torch::Tensor x[2], out[2], grad[2], c[2];
  for (int r = 0; r < 2; ++r) {
    x[r] = torch::arange(0, 4 - 2 * r, torch::kFloat64).unsqueeze(1).repeat({1, 3}) + 10.0 * r;
    x[r].set_requires_grad(true);
    c[r] = torch::randn({recv[r][0] + recv[r][1], 3}, torch::kFloat64);
  }
  std::mutex mu;
  run_two_ranks(test_port(1), [&](const std::shared_ptr<dist::Group>& g) {
    const int r = g->rank();
    auto y = model::all_to_all(x[r], send[r], recv[r], *g);
    (y * c[r]).sum().backward();
    std::lock_guard<std::mutex> lock(mu);
    out[r] = y.detach().clone();
    grad[r] = x[r].grad().clone();
  });
  // Rank 0 receives its own row 0, then rank 1's rows 0–1; rank 1 receives rank 0's rows 1–3.
  EXPECT_TRUE(torch::equal(out[0], torch::cat({x[0].detach().narrow(0, 0, 1), x[1].detach()})));
  EXPECT_TRUE(torch::equal(out[1], x[0].detach().narrow(0, 1, 3)));
  // d/dx of Σ y·c: each row of x gets the c row its copy landed on.
  EXPECT_TRUE(torch::equal(grad[0], torch::cat({c[0].narrow(0, 0, 1), c[1]})));
  EXPECT_TRUE(torch::equal(grad[1], c[0].narrow(0, 1, 2)));
}

// One MoE layer with its experts sharded over 2 ranks (ExpertSharding, as the
// trainer uses it) against the same layer in one process on the concatenated
// tokens: outputs, input gradients and every parameter gradient agree.
// starve = all tokens prefer experts 0–1 (rank 0's), so rank 1 gets no rows.
void expert_parallel_layer_matches_local(int64_t n_experts, int64_t top_k, int64_t shared, bool starve, int salt) {
  ModelConfig mc;
  mc.d_model = 8;
  mc.n_experts = n_experts;
  mc.top_k = top_k;
  mc.n_shared_experts = shared;
  mc.expert_hidden = 6;
  mc.init_std = 0.3;
  RouterConfig rc;
  auto make = [&] {
    torch::manual_seed(11);
    auto m = model::MoE(mc, rc, 0.2);
    if (starve) {
      torch::NoGradGuard ng;
      m->router->weight_ED.narrow(1, 0, 1).fill_(-5.0);
      m->router->weight_ED.narrow(0, 0, 2).narrow(1, 0, 1).fill_(5.0);
    }
    return m;
  };
  const int64_t T = 10;
  torch::manual_seed(5);
  auto x_all = torch::randn({2 * T, mc.d_model});
  if (starve) x_all.narrow(1, 0, 1).fill_(10.0);
  auto c_all = torch::randn({2 * T, mc.d_model});

  auto ref = make();
  auto xr = x_all.clone().set_requires_grad(true);
  auto y_ref = ref->forward(xr).y_BTD;
  (y_ref * c_all).sum().backward();

  model::MoE ranks[2] = {make(), make()};
  torch::Tensor x[2], y[2];
  std::map<std::string, torch::Tensor> grads[2];
  int64_t first[2] = {0, 0};
  std::mutex mu;
  run_two_ranks(test_port(salt), [&](const std::shared_ptr<dist::Group>& g) {
    const int r = g->rank();
    torch::nn::Module holder;
    holder.register_module("moe", ranks[r]);
    model::ExpertSharding ep(holder, g, 2);
    ep.shard(nullptr);
    x[r] = x_all.narrow(0, r * T, T).clone().set_requires_grad(true);
    auto out = ranks[r]->forward(x[r]).y_BTD;
    (out * c_all.narrow(0, r * T, T)).sum().backward();
    std::lock_guard<std::mutex> lock(mu);
    y[r] = out.detach().clone();
    first[r] = ranks[r]->expert_parallel->first_expert();
    for (const auto& p : ranks[r]->named_parameters())
      grads[r][p.key()] = p.value().grad().defined() ? p.value().grad().clone() : torch::zeros_like(p.value());
  });
  EXPECT_EQ(first[1], n_experts / 2);
  for (int r = 0; r < 2; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    EXPECT_TRUE(torch::allclose(y[r], y_ref.detach().narrow(0, r * T, T), 1e-5, 1e-6));
    EXPECT_TRUE(torch::allclose(x[r].grad(), xr.grad().narrow(0, r * T, T), 1e-5, 1e-6));
  }
  for (const auto& p : ref->named_parameters()) {
    SCOPED_TRACE(p.key());
    const auto& g_ref = p.value().grad();
    ASSERT_TRUE(g_ref.defined());
    if (p.key().rfind("experts.", 0) == 0) {  // sharded: each rank holds its block's full gradient
      const int64_t El = n_experts / 2;
      for (int r = 0; r < 2; ++r)
        EXPECT_TRUE(torch::allclose(grads[r][p.key()], g_ref.narrow(0, r * El, El), 1e-5, 1e-6)) << "rank " << r;
    } else {  // replicated: the sum over ranks (what data parallel's all-reduce adds)
      EXPECT_TRUE(torch::allclose(grads[0][p.key()] + grads[1][p.key()], g_ref, 1e-5, 1e-6));
    }
  }
  if (starve) {
    EXPECT_EQ(grads[1]["experts.w1"].abs().max().item<double>(), 0.0);
  }
}

TEST(ExpertParallel, ShardedSwitchLayerEqualsTheLocalLayerWithGradients) {
  expert_parallel_layer_matches_local(4, 1, 0, false, 2);
}
TEST(ExpertParallel, ShardedGranularTopKLayerWithSharedExpertEqualsTheLocalLayer) {
  expert_parallel_layer_matches_local(8, 3, 1, false, 3);
}
TEST(ExpertParallel, RankThatReceivesNoTokensStillTakesPartInBackward) {
  expert_parallel_layer_matches_local(4, 2, 1, true, 4);
}

// A checkpoint under expert parallelism: unshard_to_rank0 gathers the full
// expert weights and their AdamW state on rank 0 only; every other rank (in
// rank 0's EP group or another) keeps its shard, and shard() afterwards gives
// rank 0 its own block back. 4 ranks, EP groups {0, 1} and {2, 3}.
TEST(ExpertParallel, CheckpointGatherReachesRankZeroOnly) {
  ModelConfig mc;
  mc.d_model = 4;
  mc.n_experts = 4;
  mc.top_k = 1;
  mc.expert_hidden = 3;
  RouterConfig rc;
  const int W = 4;
  std::vector<std::map<std::string, torch::Tensor>> shard_w(W), shard_m(W), after_w(W), after_m(W), back_w(W),
      back_m(W);
  std::mutex mu;
  run_ranks(W, test_port(6), [&](const std::shared_ptr<dist::Group>& g) {
    const int r = g->rank();
    torch::manual_seed(11);
    auto moe = model::MoE(mc, rc, 0.2);
    torch::nn::Module holder;
    holder.register_module("moe", moe);
    model::ExpertSharding ep(holder, g, 2);
    torch::optim::AdamW opt(holder.parameters(), torch::optim::AdamWOptions(1e-2));
    ep.shard(&opt);
    for (auto& p : holder.parameters()) p.mutable_grad() = torch::full_like(p, double(r + 1)) + torch::randn_like(p);
    opt.step();  // AdamW state of each rank's shard
    auto snapshot = [&](std::map<std::string, torch::Tensor>& w, std::map<std::string, torch::Tensor>& m) {
      for (const auto& p : moe->experts->named_parameters()) {
        w[p.key()] = p.value().detach().clone();
        auto* st = dynamic_cast<torch::optim::AdamWParamState*>(find_param_state(opt, p.value()));
        ASSERT_NE(st, nullptr) << p.key();
        m[p.key()] = st->exp_avg().clone();
      }
    };
    std::map<std::string, torch::Tensor> w0, m0, w1, m1, w2, m2;
    snapshot(w0, m0);
    ep.unshard_to_rank0(&opt);
    snapshot(w1, m1);
    ep.shard(&opt);
    snapshot(w2, m2);
    std::lock_guard<std::mutex> lock(mu);
    shard_w[r] = w0, shard_m[r] = m0, after_w[r] = w1, after_m[r] = m1, back_w[r] = w2, back_m[r] = m2;
  });
  for (const auto& [name, w] : shard_w[0]) {
    SCOPED_TRACE(name);
    EXPECT_EQ(w.size(0), 2);  // 2 of 4 experts per rank
    EXPECT_TRUE(torch::equal(after_w[0][name], torch::cat({shard_w[0][name], shard_w[1][name]})));
    EXPECT_TRUE(torch::equal(after_m[0][name], torch::cat({shard_m[0][name], shard_m[1][name]})));
    for (int r = 1; r < W; ++r) {
      EXPECT_TRUE(torch::equal(after_w[r][name], shard_w[r][name])) << "rank " << r;
      EXPECT_TRUE(torch::equal(after_m[r][name], shard_m[r][name])) << "rank " << r;
    }
    for (int r = 0; r < W; ++r) {
      EXPECT_TRUE(torch::equal(back_w[r][name], shard_w[r][name])) << "rank " << r;
      EXPECT_TRUE(torch::equal(back_m[r][name], shard_m[r][name])) << "rank " << r;
    }
  }
}

// End to end: `moecpt launch --nproc 2` with parallel.expert_parallel = 2
// trains what 1 process trains (losses, aux, z, grad norm, loads, evaluation).
void expert_parallel_equals_one_process(const std::string& extra) {
  Fixture f("moe");
  auto one = testing::run_moecpt(f.train_args("one", extra));
  ASSERT_EQ(one.exit_code, 0) << one.output;
  auto two = testing::run_moecpt("launch --nproc 2 -- " + f.train_args("two", extra + " --set parallel.expert_parallel=2"));
  ASSERT_EQ(two.exit_code, 0) << two.output;
  EXPECT_NE(two.output.find("expert parallel: 2 ranks per EP group"), std::string::npos) << two.output;
  expect_learning(f.dir / "one/metrics.jsonl");
  expect_same_training(f.dir / "one/metrics.jsonl", f.dir / "two/metrics.jsonl", 20, 1e-5);
}

TEST(Distributed, ExpertParallelTwoRanksEqualOneProcessSwitch) {
  expert_parallel_equals_one_process("--set model.top_k=1 --set model.n_shared_experts=0");
}

TEST(Distributed, ExpertParallelTwoRanksEqualOneProcessGranularTopKWithSharedExpert) {
  expert_parallel_equals_one_process("--set model.n_experts=8 --set model.expert_hidden=8 --set model.top_k=2");
}

// Activation checkpointing under expert (and data) parallelism: a recomputed
// block redoes its all-to-alls inside the backward, on every rank in the same
// order; training must still equal one process without recomputation.
TEST(Distributed, ExpertParallelWithActivationCheckpointingEqualsOneProcess) {
  Fixture f("moe");
  const std::string model = "--set model.n_experts=8 --set model.expert_hidden=8 --set model.top_k=2";
  auto one = testing::run_moecpt(f.train_args("one", model));
  ASSERT_EQ(one.exit_code, 0) << one.output;
  auto two = testing::run_moecpt("launch --nproc 2 -- " +
                                 f.train_args("two", model + " --set parallel.expert_parallel=2"
                                                             " --set train.activation_checkpointing=full"));
  ASSERT_EQ(two.exit_code, 0) << two.output;
  expect_learning(f.dir / "one/metrics.jsonl");
  expect_same_training(f.dir / "one/metrics.jsonl", f.dir / "two/metrics.jsonl", 20, 1e-5);
}

// Checkpoints do not depend on the layout: 2 EP ranks → 1 process, and 1 process → 2 EP ranks.
TEST(Distributed, ExpertParallelCheckpointsMoveBetweenLayouts) {
  Fixture f("moe");
  auto ref = testing::run_moecpt(f.train_args("ref"));
  ASSERT_EQ(ref.exit_code, 0) << ref.output;
  const std::string ep = " --set parallel.expert_parallel=2";
  auto two = testing::run_moecpt("launch --nproc 2 -- " + f.train_args("a", "--stop-after 10" + ep));
  ASSERT_EQ(two.exit_code, 0) << two.output;
  auto one = testing::run_moecpt(f.train_args("a", "--resume"));
  ASSERT_EQ(one.exit_code, 0) << one.output;
  EXPECT_NE(one.output.find("resumed"), std::string::npos) << one.output;
  expect_same_training(f.dir / "ref/metrics.jsonl", f.dir / "a/metrics.jsonl", 20, 1e-5);

  auto first = testing::run_moecpt(f.train_args("b", "--stop-after 10"));
  ASSERT_EQ(first.exit_code, 0) << first.output;
  auto rest = testing::run_moecpt("launch --nproc 2 -- " + f.train_args("b", "--resume" + ep));
  ASSERT_EQ(rest.exit_code, 0) << rest.output;
  EXPECT_NE(rest.output.find("resumed"), std::string::npos) << rest.output;
  expect_same_training(f.dir / "ref/metrics.jsonl", f.dir / "b/metrics.jsonl", 20, 1e-5);
}

TEST(Distributed, ExpertParallelInOneProcessIsRefused) {
  Fixture f("moe");
  auto r = testing::run_moecpt(f.train_args("x", "--set parallel.expert_parallel=2"));
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.output.find("parallel.expert_parallel = 2 needs that many processes"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace moecpt
