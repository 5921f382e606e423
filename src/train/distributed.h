// Multi-process data parallelism on LibTorch's c10d (docs/distributed.md).
//
// A job is W processes ("ranks"), started by `moecpt launch`, torchrun or a
// cluster scheduler, which find each other through the torchrun environment:
//   RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT.
// Rank 0 hosts a c10d TCPStore at MASTER_ADDR:MASTER_PORT; every rank joins a
// ProcessGroupGloo (CPU tensors) through it. NCCL (CUDA tensors) is used when
// this LibTorch was built with it (USE_C10D_NCCL) and run.device = "cuda";
// otherwise a CUDA run is refused with a clear message.
//
// Every collective has a timeout (MOECPT_DIST_TIMEOUT_S, default 300 s) and a
// peer that dies closes its sockets, so a dead or hung rank fails the job with
// an Error that names the operation and the rank, never a silent hang.
#pragma once
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "core/pch.h"
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/version.h>

namespace moecpt::dist {

struct Env {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  int local_world_size = 1;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
};

// The torchrun environment of this process; a single process (world 1) when
// WORLD_SIZE is unset. Malformed values throw moecpt::Error naming the variable.
Env env_from_environment();

// Collective timeout: MOECPT_DIST_TIMEOUT_S seconds (default 300).
std::chrono::milliseconds collective_timeout();

// A process group of all ranks of the job. Collectives must be called in the
// same order on every rank (c10d's rule); every wait turns a c10d/Gloo failure
// into moecpt::Error("rank R: <op> failed …").
class Group {
 public:
  // Rendezvous through the TCPStore and create the Gloo (or NCCL) group. The
  // backend is explicit: Gloo for CPU tensors, NCCL for run.device = "cuda"
  // (only in builds with MOECPT_WITH_NCCL; untested, docs/distributed.md).
  static std::shared_ptr<Group> create(const Env& env, const torch::Device& device);
  // A group of some of this job's ranks (`ranks`: global ranks, this one among
  // them), for expert parallelism. Every member must call it with the same
  // ranks and tag; it is a separate c10d process group (its own connections),
  // so its collectives never interleave with this group's.
  std::shared_ptr<Group> subgroup(const std::vector<int>& ranks, const std::string& tag) const;
  ~Group();

  int rank() const { return env_.rank; }
  int size() const { return env_.world_size; }
  const Env& env() const { return env_; }
  std::string backend() const;

  // In place, blocking: sum over ranks.
  void allreduce_sum(torch::Tensor& t, const char* what);
  // Returns the sum over ranks of a copy of t (t itself is untouched).
  torch::Tensor sum(const torch::Tensor& t, const char* what);
  // In place, blocking: every rank gets root's values.
  void broadcast(std::vector<torch::Tensor>& tensors, int root, const char* what);
  void barrier(const char* what);
  // Blocking all-to-all along dim 0: rows [sum(in_splits[<j]), +in_splits[j])
  // of `in` go to rank j; `out` receives out_splits[i] rows from rank i, in
  // rank order. Empty split vectors mean equal splits.
  void alltoall(torch::Tensor& out, torch::Tensor& in, std::vector<int64_t> out_splits,
                std::vector<int64_t> in_splits, const char* what);
  // Blocking gather to `root` (a rank of this group): there element i is rank
  // i's `t`; elsewhere the result is empty.
  std::vector<torch::Tensor> gather(const torch::Tensor& t, int root, const char* what);

  // Asynchronous all-reduce (sum) of one flat tensor; wait with wait().
  c10::intrusive_ptr<c10d::Work> allreduce_async(torch::Tensor& t);
  void wait(const c10::intrusive_ptr<c10d::Work>& work, const char* what);

 private:
  Group() = default;
#if TORCH_VERSION_MAJOR >= 2
  using Backend = c10d::Backend;  // LibTorch 2.x: ProcessGroupGloo/NCCL derive from Backend
#else
  using Backend = c10d::ProcessGroup;
#endif
  c10::intrusive_ptr<Backend> make_process_group(const c10::intrusive_ptr<c10d::Store>& store, int rank,
                                                 int size) const;
  Env env_;
  bool failed_ = false;  // a collective failed: ~Group leaks pg_ (see there)
  c10::intrusive_ptr<c10d::Store> store_;  // the job's TCPStore (subgroups rendezvous through it)
  torch::Device device_{torch::kCPU};
  c10::intrusive_ptr<Backend> pg_;
};

// Copy rank 0's parameters and buffers to every rank (one broadcast per dtype).
void broadcast_module(Group& g, torch::nn::Module& m);

// Largest |difference| between this rank's parameters+buffers and rank 0's,
// measured on a per-tensor (sum, sum of squares) fingerprint. 0 when in sync.
double max_param_divergence(Group& g, torch::nn::Module& m);
// The same for a list of tensors (expert parallel: the replicated ones only).
double max_param_divergence(Group& g, const std::vector<torch::Tensor>& state);

// Gradient averaging over ranks in buckets of about `bucket_bytes` each.
// Buckets hold the parameters in reverse registration order (roughly the order
// backward produces their gradients). With overlap, a gradient hook copies each
// parameter's full gradient (this backward + what earlier micro-batches
// accumulated) into its bucket as soon as autograd produces it, and a bucket's
// all-reduce starts once all of its parameters are in — while backward still
// runs for earlier layers. Buckets always start in index order on every rank
// (c10d matches collectives by order). finish() waits for all of them and
// writes grad = sum / W into every parameter.
class GradReducer {
 public:
  GradReducer(std::shared_ptr<Group> g, std::vector<torch::Tensor> params, int64_t bucket_bytes, bool overlap);
  ~GradReducer();
  GradReducer(const GradReducer&) = delete;
  GradReducer& operator=(const GradReducer&) = delete;

  // Call before the last backward of a step (the only one with overlap).
  void arm();
  // After the last backward: reduce what is left, wait, write averaged grads.
  void finish();

  size_t n_buckets() const { return buckets_.size(); }
  bool overlap() const { return overlap_; }

 private:
  struct Bucket {
    torch::Tensor flat;
    std::vector<size_t> params;  // indices into params_
    int64_t pending = 0;
    bool launched = false;
    c10::intrusive_ptr<c10d::Work> work;
  };
  void on_grad(size_t p, const torch::Tensor& grad);
  void launch_ready();
  torch::Tensor slot(size_t p);

  std::shared_ptr<Group> g_;
  std::vector<torch::Tensor> params_;
  std::vector<size_t> bucket_of_;
  std::vector<int64_t> offset_;
  std::vector<bool> filled_;
  std::vector<Bucket> buckets_;
  std::vector<unsigned> hook_ids_;
  size_t next_launch_ = 0;
  bool armed_ = false;
  bool overlap_;
};

}  // namespace moecpt::dist
