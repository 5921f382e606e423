#include "train/distributed.h"

// c10d's Gloo backend is compiled into Debian's and PyTorch's LibTorch; its
// header is guarded by the macro that their builds define.
#ifndef USE_C10D_GLOO
#define USE_C10D_GLOO 1
#endif
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
// NCCL: only where the LibTorch build has it (PyTorch's CUDA wheels); configure
// with -DCMAKE_CXX_FLAGS="-DMOECPT_WITH_NCCL -DUSE_C10D_NCCL" (docs/distributed.md).
#ifdef MOECPT_WITH_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <cstdlib>
#include <exception>

#include "core/error.h"

namespace moecpt::dist {

namespace {

int env_int(const char* name, int fallback, int min_value) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == 0) return fallback;
  char* end = nullptr;
  const long x = std::strtol(v, &end, 10);
  if (*end != 0 || x < min_value || x > 1 << 30)
    throw Error(std::string("environment variable ") + name + "='" + v + "' is not an integer >= " +
                std::to_string(min_value));
  return int(x);
}

bool is_loopback(const std::string& addr) {
  return addr == "localhost" || addr.rfind("127.", 0) == 0 || addr == "::1";
}

std::string describe(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const c10::Error& x) {
    return x.what_without_backtrace();
  } catch (const std::exception& x) {
    return x.what();
  } catch (...) {
    return "unknown error";
  }
}

}  // namespace

Env env_from_environment() {
  Env e;
  e.world_size = env_int("WORLD_SIZE", 1, 1);
  e.rank = env_int("RANK", 0, 0);
  e.local_rank = env_int("LOCAL_RANK", e.rank, 0);
  e.local_world_size = env_int("LOCAL_WORLD_SIZE", e.world_size, 1);
  if (e.rank >= e.world_size)
    throw Error("environment: RANK=" + std::to_string(e.rank) + " is not below WORLD_SIZE=" +
                std::to_string(e.world_size));
  if (const char* a = std::getenv("MASTER_ADDR"); a && *a) e.master_addr = a;
  e.master_port = env_int("MASTER_PORT", 29500, 1);
  if (e.master_port > 65535) throw Error("environment: MASTER_PORT=" + std::to_string(e.master_port) + " is not a port");
  if (e.world_size > 1 && (!std::getenv("MASTER_ADDR") || !std::getenv("MASTER_PORT")))
    throw Error("environment: WORLD_SIZE=" + std::to_string(e.world_size) +
                " but MASTER_ADDR/MASTER_PORT are not set (start with `moecpt launch` or torchrun)");
  return e;
}

std::chrono::milliseconds collective_timeout() {
  return std::chrono::seconds(env_int("MOECPT_DIST_TIMEOUT_S", 300, 1));
}

std::shared_ptr<Group> Group::create(const Env& env, const torch::Device& device) {
  std::shared_ptr<Group> g(new Group());
  g->env_ = env;
  g->device_ = device;
  const auto timeout = collective_timeout();
  const std::string where = env.master_addr + ":" + std::to_string(env.master_port);
  c10::intrusive_ptr<c10d::Store> store;
  try {
    c10d::TCPStoreOptions o;
    o.port = uint16_t(env.master_port);
    o.isServer = env.rank == 0;
    o.numWorkers = size_t(env.world_size);
    o.waitWorkers = true;
    o.timeout = timeout;
    store = c10::make_intrusive<c10d::TCPStore>(env.master_addr, o);
  } catch (const std::exception& e) {
    throw Error("rank " + std::to_string(env.rank) + ": rendezvous at " + where + " failed within " +
                std::to_string(timeout.count() / 1000) + " s (" +
                (env.rank == 0 ? "is the port free?" : "is rank 0 running and MASTER_ADDR reachable?") +
                "): " + describe(std::current_exception()));
  }
  g->store_ = store;
  auto prefixed = c10::make_intrusive<c10d::PrefixStore>("moecpt", store);
  try {
    g->pg_ = g->make_process_group(prefixed, env.rank, env.world_size);
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    throw Error("rank " + std::to_string(env.rank) + ": creating the " + (device.is_cuda() ? "NCCL" : "Gloo") +
                " process group through " + where + " failed: " + describe(std::current_exception()));
  }
  return g;
}

// The backend choice, explicit: CPU tensors → Gloo; CUDA tensors → NCCL when
// compiled in (MOECPT_WITH_NCCL; never built or run on the machines this was
// developed on, so untested), else a clear refusal.
c10::intrusive_ptr<Group::Backend> Group::make_process_group(const c10::intrusive_ptr<c10d::Store>& store,
                                                             int rank, int size) const {
  const auto timeout = collective_timeout();
  if (device_.is_cuda()) {
#ifdef MOECPT_WITH_NCCL
    auto opts = c10d::ProcessGroupNCCL::Options::create();
    opts->timeout = timeout;
    return c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, size, opts);
#else
    throw Error("run.device = \"cuda\" with WORLD_SIZE > 1 needs NCCL, and this build has none "
                "(rebuild with -DMOECPT_WITH_NCCL -DUSE_C10D_NCCL against a CUDA LibTorch; docs/distributed.md)");
#endif
  }
  auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
  // GLOO_SOCKET_IFNAME picks the interface (multi-node); a loopback master
  // means a one-machine job, which needs no network at all.
  if (const char* ifname = std::getenv("GLOO_SOCKET_IFNAME"); ifname && *ifname)
    opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
  else if (is_loopback(env_.master_addr))
    opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
  else
    opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
  opts->threads = 2;
  return c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, size, opts);
}

std::shared_ptr<Group> Group::subgroup(const std::vector<int>& ranks, const std::string& tag) const {
  std::shared_ptr<Group> g(new Group());
  g->device_ = device_;
  g->store_ = store_;
  g->env_ = env_;
  g->env_.world_size = int(ranks.size());
  g->env_.rank = -1;
  for (size_t i = 0; i < ranks.size(); ++i)
    if (ranks[i] == env_.rank) g->env_.rank = int(i);
  if (g->env_.rank < 0)
    throw Error("rank " + std::to_string(env_.rank) + ": not a member of process group '" + tag + "'");
  auto prefixed = c10::make_intrusive<c10d::PrefixStore>("moecpt-" + tag, store_);
  try {
    g->pg_ = g->make_process_group(prefixed, g->env_.rank, g->env_.world_size);
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    throw Error("rank " + std::to_string(env_.rank) + ": creating process group '" + tag +
                "' failed: " + describe(std::current_exception()));
  }
  return g;
}

Group::~Group() {
  // After a failed collective the backend's worker threads may still be stuck
  // in the exchange with the dead or hung peer, and its destructor would wait
  // for them, keeping this rank from exiting with its error. Leak it instead:
  // the process is about to end anyway.
  if (failed_ && pg_) (void)pg_.release();
}

std::string Group::backend() const { return pg_ ? pg_->getBackendName() : "none"; }

void Group::wait(const c10::intrusive_ptr<c10d::Work>& work, const char* what) {
  try {
    work->wait(collective_timeout());
  } catch (const std::exception& e) {
    failed_ = true;
    throw Error("rank " + std::to_string(rank()) + " of " + std::to_string(size()) + ": " + what +
                " failed — another rank died or stopped answering (timeout " +
                std::to_string(collective_timeout().count() / 1000) +
                " s, MOECPT_DIST_TIMEOUT_S): " + describe(std::current_exception()));
  }
}

c10::intrusive_ptr<c10d::Work> Group::allreduce_async(torch::Tensor& t) {
  std::vector<torch::Tensor> v{t};
  return pg_->allreduce(v);
}

void Group::allreduce_sum(torch::Tensor& t, const char* what) {
  std::vector<torch::Tensor> v{t};
  c10::intrusive_ptr<c10d::Work> w;
  try {
    w = pg_->allreduce(v);
  } catch (const std::exception& e) {
    failed_ = true;
    throw Error("rank " + std::to_string(rank()) + ": " + what + " failed: " + describe(std::current_exception()));
  }
  wait(w, what);
}

torch::Tensor Group::sum(const torch::Tensor& t, const char* what) {
  auto c = t.detach().clone().contiguous();
  allreduce_sum(c, what);
  return c;
}

void Group::broadcast(std::vector<torch::Tensor>& tensors, int root, const char* what) {
  c10d::BroadcastOptions o;
  o.rootRank = root;
  c10::intrusive_ptr<c10d::Work> w;
  try {
    w = pg_->broadcast(tensors, o);
  } catch (const std::exception& e) {
    failed_ = true;
    throw Error("rank " + std::to_string(rank()) + ": " + what + " failed: " + describe(std::current_exception()));
  }
  wait(w, what);
}

void Group::barrier(const char* what) {
  auto t = torch::zeros({1}, torch::TensorOptions().device(device_));
  allreduce_sum(t, what);
}

void Group::alltoall(torch::Tensor& out, torch::Tensor& in, std::vector<int64_t> out_splits,
                     std::vector<int64_t> in_splits, const char* what) {
  c10::intrusive_ptr<c10d::Work> w;
  try {
    w = pg_->alltoall_base(out, in, out_splits, in_splits);
  } catch (const std::exception& e) {
    failed_ = true;
    throw Error("rank " + std::to_string(rank()) + ": " + what + " failed: " + describe(std::current_exception()));
  }
  wait(w, what);
}

std::vector<torch::Tensor> Group::gather(const torch::Tensor& t, int root, const char* what) {
  if (root < 0 || root >= size())
    throw Error(std::string(what) + ": gather root " + std::to_string(root) + " is not a rank of a group of " +
                std::to_string(size()));
  std::vector<torch::Tensor> in{t.detach().contiguous()};
  std::vector<std::vector<torch::Tensor>> out;  // empty on the other ranks (c10d's rule)
  if (rank() == root) {
    out.emplace_back();
    for (int i = 0; i < size(); ++i) out[0].push_back(torch::empty_like(in[0]));
  }
  c10d::GatherOptions opts;
  opts.rootRank = root;
  c10::intrusive_ptr<c10d::Work> w;
  try {
    w = pg_->gather(out, in, opts);
  } catch (const std::exception& e) {
    failed_ = true;
    throw Error("rank " + std::to_string(rank()) + ": " + what + " failed: " + describe(std::current_exception()));
  }
  wait(w, what);
  return rank() == root ? out[0] : std::vector<torch::Tensor>{};
}

namespace {
// All parameters then all buffers, in registration order.
std::vector<torch::Tensor> module_state(torch::nn::Module& m) {
  std::vector<torch::Tensor> out;
  for (auto& p : m.parameters()) out.push_back(p);
  for (auto& b : m.buffers()) out.push_back(b);
  return out;
}
}  // namespace

void broadcast_module(Group& g, torch::nn::Module& m) {
  torch::NoGradGuard no_grad;
  auto state = module_state(m);
  // One flat tensor per dtype: a few large messages instead of hundreds of small ones.
  std::map<c10::ScalarType, std::vector<torch::Tensor>> by_dtype;
  for (auto& t : state) by_dtype[t.scalar_type()].push_back(t);
  for (auto& [dtype, ts] : by_dtype) {
    std::vector<torch::Tensor> flat_parts;
    for (auto& t : ts) flat_parts.push_back(t.detach().reshape({-1}));
    std::vector<torch::Tensor> flat{torch::cat(flat_parts)};
    g.broadcast(flat, 0, "broadcast of the initial weights");
    int64_t off = 0;
    for (auto& t : ts) {
      t.detach().copy_(flat[0].narrow(0, off, t.numel()).view(t.sizes()));
      off += t.numel();
    }
  }
}

double max_param_divergence(Group& g, torch::nn::Module& m) { return max_param_divergence(g, module_state(m)); }

double max_param_divergence(Group& g, const std::vector<torch::Tensor>& state) {
  torch::NoGradGuard no_grad;
  auto fp = torch::zeros({int64_t(state.size()), 2}, torch::kFloat64);
  for (size_t i = 0; i < state.size(); ++i) {
    auto d = state[i].detach().to(torch::kCPU, torch::kFloat64);
    fp[int64_t(i)][0] = d.sum().item<double>();
    fp[int64_t(i)][1] = d.pow(2).sum().item<double>();
  }
  // NCCL needs device tensors; the fingerprint is tiny either way.
  const auto dev = state.empty() ? torch::Device(torch::kCPU) : state[0].device();
  std::vector<torch::Tensor> root{fp.to(dev, /*non_blocking=*/false, /*copy=*/true)};
  g.broadcast(root, 0, "weight fingerprint check");
  return (root[0].cpu() - fp).abs().max().item<double>();
}

// --- GradReducer ---------------------------------------------------------------

GradReducer::GradReducer(std::shared_ptr<Group> g, std::vector<torch::Tensor> params, int64_t bucket_bytes,
                         bool overlap)
    : g_(std::move(g)), params_(std::move(params)), overlap_(overlap) {
  const size_t n = params_.size();
  bucket_of_.assign(n, 0);
  offset_.assign(n, 0);
  filled_.assign(n, false);
  // Reverse registration order: the head and last blocks get their gradients first.
  std::vector<std::vector<size_t>> groups;
  int64_t bytes = 0;
  for (size_t k = n; k-- > 0;) {
    const auto& p = params_[k];
    if (p.scalar_type() != params_[n - 1].scalar_type() || p.device() != params_[n - 1].device())
      throw Error("data parallel: all parameters must share one dtype and device");
    const int64_t b = p.numel() * int64_t(p.element_size());
    if (groups.empty() || (bytes + b > bucket_bytes && !groups.back().empty())) {
      groups.emplace_back();
      bytes = 0;
    }
    groups.back().push_back(k);
    bytes += b;
  }
  for (auto& idx : groups) {
    Bucket bk;
    int64_t numel = 0;
    for (size_t k : idx) {
      bucket_of_[k] = buckets_.size();
      offset_[k] = numel;
      numel += params_[k].numel();
    }
    bk.flat = torch::zeros({numel}, params_[idx[0]].options().requires_grad(false));
    bk.params = idx;
    buckets_.push_back(std::move(bk));
  }
  if (overlap_)
    for (size_t k = 0; k < n; ++k)
      hook_ids_.push_back(params_[k].register_hook([this, k](torch::Tensor grad) { on_grad(k, grad); }));
}

GradReducer::~GradReducer() {
  for (size_t k = 0; k < hook_ids_.size(); ++k) params_[k].remove_hook(hook_ids_[k]);
}

torch::Tensor GradReducer::slot(size_t p) {
  return buckets_[bucket_of_[p]].flat.narrow(0, offset_[p], params_[p].numel()).view(params_[p].sizes());
}

void GradReducer::arm() {
  if (!overlap_) return;
  for (auto& b : buckets_) {
    b.pending = int64_t(b.params.size());
    b.launched = false;
    b.work.reset();
  }
  std::fill(filled_.begin(), filled_.end(), false);
  next_launch_ = 0;
  armed_ = true;
}

// Runs inside backward (autograd's hook on the leaf, before the gradient is
// accumulated into .grad): this step's full gradient is grad + what earlier
// micro-batches left in .grad.
void GradReducer::on_grad(size_t p, const torch::Tensor& grad) {
  if (!armed_ || filled_[p]) return;
  torch::NoGradGuard no_grad;
  auto s = slot(p);
  const auto& acc = params_[p].grad();
  if (acc.defined()) torch::add_out(s, acc, grad);
  else s.copy_(grad);
  filled_[p] = true;
  --buckets_[bucket_of_[p]].pending;
  launch_ready();
}

void GradReducer::launch_ready() {
  while (next_launch_ < buckets_.size() && buckets_[next_launch_].pending == 0) {
    auto& b = buckets_[next_launch_];
    b.work = g_->allreduce_async(b.flat);
    b.launched = true;
    ++next_launch_;
  }
}

void GradReducer::finish() {
  torch::NoGradGuard no_grad;
  if (!armed_) {  // no overlap: gather every gradient now
    for (auto& b : buckets_) {
      b.pending = 0;
      b.launched = false;
    }
    std::fill(filled_.begin(), filled_.end(), false);
    next_launch_ = 0;
  }
  // Parameters that got no gradient in this backward (hooks not fired): their
  // accumulated gradient, or zero. Every rank reduces every bucket.
  for (size_t k = 0; k < params_.size(); ++k) {
    if (filled_[k]) continue;
    auto s = slot(k);
    const auto& acc = params_[k].grad();
    if (acc.defined()) s.copy_(acc);
    else s.zero_();
    filled_[k] = true;
    if (armed_) --buckets_[bucket_of_[k]].pending;
  }
  for (auto& b : buckets_) b.pending = 0;
  launch_ready();
  const double inv = 1.0 / double(g_->size());
  for (auto& b : buckets_) {
    g_->wait(b.work, "gradient all-reduce");
    b.work.reset();
    b.flat.mul_(inv);
  }
  for (size_t k = 0; k < params_.size(); ++k) {
    auto& gr = params_[k].mutable_grad();
    if (gr.defined()) gr.copy_(slot(k));
    else gr = slot(k).clone();
  }
  armed_ = false;
}

}  // namespace moecpt::dist
