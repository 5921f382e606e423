// `moecpt launch --nproc N -- train …`: N local ranks of one data-parallel job
// (with `--set parallel.expert_parallel=P`, experts sharded over P of them),
// each a child `moecpt` with the torchrun environment (RANK, WORLD_SIZE,
// LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT). SIGINT/SIGTERM are
// forwarded to every rank (they checkpoint and stop after the same step); if a
// rank dies or fails, the others are stopped and the job fails naming it.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "cli/commands.h"
#include "core/error.h"

namespace moecpt::cli {

namespace {

volatile sig_atomic_t g_forward_signal = 0;
extern "C" void on_launch_signal(int sig) { g_forward_signal = sig; }

// A port that was free a moment ago (the kernel picks it); rank 0's store binds it.
int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) throw Error(std::string("launch: socket(): ") + std::strerror(errno));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  socklen_t len = sizeof a;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    ::close(fd);
    throw Error(std::string("launch: cannot find a free port: ") + std::strerror(errno));
  }
  ::close(fd);
  return ntohs(a.sin_port);
}

std::string describe_status(int status) {
  if (WIFEXITED(status)) return "exited with status " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status))
    return std::string("was killed by signal ") + std::to_string(WTERMSIG(status)) + " (" +
           ::strsignal(WTERMSIG(status)) + ")";
  return "stopped with wait status " + std::to_string(status);
}

int run_launch(int nproc, int port, const std::string& addr, double grace_s, const std::vector<std::string>& args) {
  if (args.empty()) throw Error("launch: no command after `--` (e.g. moecpt launch --nproc 2 -- train -c recipe.toml)");
  if (port == 0) port = free_port();
  struct sigaction sa {};
  sa.sa_handler = on_launch_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = 0;  // no SA_RESTART: waitpid returns EINTR so the signal is forwarded at once
  ::sigaction(SIGINT, &sa, nullptr);
  ::sigaction(SIGTERM, &sa, nullptr);

  std::vector<std::string> argv_s{"/proc/self/exe"};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<pid_t> pids(size_t(nproc), -1);
  std::vector<bool> running(size_t(nproc), false);
  const pid_t launcher = ::getpid();
  std::fflush(stdout);
  std::fflush(stderr);
  for (int r = 0; r < nproc; ++r) {
    const pid_t pid = ::fork();
    if (pid < 0) throw Error(std::string("launch: fork(): ") + std::strerror(errno));
    if (pid == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive the launcher
      if (::getppid() != launcher) ::_exit(1);
      ::signal(SIGINT, SIG_DFL);
      ::signal(SIGTERM, SIG_DFL);
      ::setenv("RANK", std::to_string(r).c_str(), 1);
      ::setenv("LOCAL_RANK", std::to_string(r).c_str(), 1);
      ::setenv("WORLD_SIZE", std::to_string(nproc).c_str(), 1);
      ::setenv("LOCAL_WORLD_SIZE", std::to_string(nproc).c_str(), 1);
      ::setenv("MASTER_ADDR", addr.c_str(), 1);
      ::setenv("MASTER_PORT", std::to_string(port).c_str(), 1);
      std::vector<char*> cargv;
      for (auto& s : argv_s) cargv.push_back(s.data());
      cargv.push_back(nullptr);
      ::execv(cargv[0], cargv.data());
      std::fprintf(stderr, "error: launch: cannot start rank %d: %s\n", r, std::strerror(errno));
      ::_exit(127);
    }
    pids[size_t(r)] = pid;
    running[size_t(r)] = true;
  }
  std::fprintf(stderr, "launch: %d ranks on %s:%d (pids", nproc, addr.c_str(), port);
  for (pid_t p : pids) std::fprintf(stderr, " %d", int(p));
  std::fprintf(stderr, ")\n");

  int alive = nproc;
  std::string failure;
  auto rank_of = [&](pid_t p) {
    for (int r = 0; r < nproc; ++r)
      if (pids[size_t(r)] == p) return r;
    return -1;
  };
  auto signal_all = [&](int sig) {
    for (int r = 0; r < nproc; ++r)
      if (running[size_t(r)]) ::kill(pids[size_t(r)], sig);
  };
  auto deadline = std::chrono::steady_clock::time_point::max();
  bool killed = false;
  while (alive > 0) {
    if (g_forward_signal != 0) {
      const int sig = g_forward_signal;
      g_forward_signal = 0;
      std::fprintf(stderr, "launch: forwarding signal %d to the ranks\n", sig);
      signal_all(sig);
    }
    if (!failure.empty() && !killed && std::chrono::steady_clock::now() > deadline) {
      std::fprintf(stderr, "launch: ranks still running %.0f s after the failure; killing them\n", grace_s);
      signal_all(SIGKILL);
      killed = true;
    }
    int status = 0;
    const pid_t p = ::waitpid(-1, &status, failure.empty() ? 0 : WNOHANG);
    if (p < 0) {
      if (errno == EINTR) continue;
      if (errno == ECHILD) break;
      throw Error(std::string("launch: waitpid(): ") + std::strerror(errno));
    }
    if (p == 0) {  // WNOHANG, nobody finished yet
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      continue;
    }
    const int r = rank_of(p);
    if (r < 0) continue;
    running[size_t(r)] = false;
    --alive;
    const bool ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
    if (!ok && failure.empty()) {
      failure = "rank " + std::to_string(r) + " (pid " + std::to_string(p) + ") " + describe_status(status);
      if (alive > 0) {
        std::fprintf(stderr, "launch: %s; stopping the other %d rank(s)\n", failure.c_str(), alive);
        signal_all(SIGTERM);
        deadline = std::chrono::steady_clock::now() +
                   std::chrono::milliseconds(int64_t(grace_s * 1000));
      }
    }
  }
  if (!failure.empty()) throw Error("launch: the job failed: " + failure);
  return 0;
}

}  // namespace

void register_launch_commands(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "launch", "Run a command as N local data-parallel ranks (like torchrun): moecpt launch --nproc 2 -- train -c r.toml "
      "[--set parallel.expert_parallel=2 to shard the experts over the ranks]");
  auto nproc = std::make_shared<int>(2);
  auto port = std::make_shared<int>(0);
  auto addr = std::make_shared<std::string>("127.0.0.1");
  auto grace = std::make_shared<double>(30.0);
  auto args = std::make_shared<std::vector<std::string>>();
  cmd->add_option("--nproc", *nproc, "number of ranks (processes) on this machine")->check(CLI::Range(1, 1024));
  cmd->add_option("--master-port", *port, "rendezvous port (default: a free one)")->check(CLI::Range(0, 65535));
  cmd->add_option("--master-addr", *addr, "rendezvous address (default 127.0.0.1)");
  cmd->add_option("--grace", *grace, "seconds the other ranks get to stop after one fails, before SIGKILL");
  cmd->add_option("command", *args, "moecpt subcommand and its arguments, after `--`")->required();
  cmd->callback([=] {
    run_launch(*nproc, *port, *addr, *grace, *args);
  });
}

}  // namespace moecpt::cli
