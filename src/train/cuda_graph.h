// One micro-batch's forward + backward replayed as a CUDA graph: the host
// enqueues the whole pass with one launch instead of thousands (on the H100 the
// host took 63 of 136 ms to enqueue a dense paper-scale step and 157 of 235 ms
// for Granular-Sinkhorn; docs/performance.md), the same technique as
// Megatron-Core's CUDA graphs and PyTorch's whole-network capture.
//
// The body is a callable that runs the forward, the loss and backward() on
// tensors that outlive this object (the static inputs: the caller copies each
// micro-batch into them before run()), and returns one tensor of results
// (losses, expert counts, …). Two graphs share one memory pool:
//   first  the first micro-batch of an optimizer step: the gradients are
//          overwritten, as after zero_grad(set_to_none) (captured with the
//          gradients unset, so autograd's accumulator writes them afresh);
//   accum  every later micro-batch: the gradients are added to, in place.
// The parameters' .grad tensors then live in the graphs' pool for good: the
// caller must not reset them (no zero_grad()); the next `first` run overwrites
// them. The optimizer, the clip and everything else stay eager (a few fused
// launches).
//
// The first `warmup` runs are eager, on the side stream the graphs are
// captured on (lazy initialisation, cuBLAS workspaces, autocast's dispatch
// lookups); before the first capture the caching allocator's free blocks are
// released, so the graphs' pool does not sit beside a second copy of the
// activations. An accum run before the first graph exists also runs eagerly
// (the first graph must be captured first: it creates the gradients the accum
// graph adds to).
//
// Requirements of the body, as for any CUDA graph: no host syncs (.item(),
// .cpu(), host copies of sizes), the same shapes every run, only the current
// stream. A body that syncs fails the capture; run() then throws a
// moecpt::Error that says so, with the CUDA error. In moecpt that means: the
// grouped expert GEMM (the loop reads the group sizes on the host), the
// Sinkhorn kernel (MOECPT_SINKHORN_KERNEL=1: the ATen iteration reads its
// error), one process (no data or expert parallelism).
//
// Mode::kEager runs every call eagerly on the current stream with the same
// gradient semantics: the trainer's and `bench train`'s micro-batches go
// through it when graphs are off (one code path for both), and the GPU tests
// compare the graphs with it. The only mode off CUDA.
#pragma once
#include <functional>
#include <memory>
#include <vector>

#include "core/config.h"
#include "core/pch.h"

namespace moecpt {

class MicroStepGraphs {
 public:
  enum class Mode { kGraph, kEager };
  using Body = std::function<torch::Tensor()>;

  // params: every parameter whose gradient the body's backward writes.
  MicroStepGraphs(Body body, std::vector<torch::Tensor> params, Mode mode = Mode::kGraph, int64_t warmup = 2);
  ~MicroStepGraphs();
  MicroStepGraphs(const MicroStepGraphs&) = delete;
  MicroStepGraphs& operator=(const MicroStepGraphs&) = delete;

  // Runs one micro-batch; first = the first of an optimizer step (gradients
  // overwritten), else accumulated. Returns a copy of the body's result, so it
  // stays valid across later runs.
  torch::Tensor run(bool first);

  // Graphs captured so far (0, 1 or 2) and runs replayed from them.
  int64_t graphs_captured() const;
  int64_t replays() const;

  // Whether this build can capture CUDA graphs (LibTorch with CUDA).
  static bool compiled();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Refuses a run whose micro-batch cannot be captured, with a moecpt::Error that
// starts with `what` (e.g. "train.cuda_graph = true"): a device that is not
// CUDA (`device_setting` says how to ask for one, e.g. "--device cuda"), a
// LibTorch without CUDA, or the Sinkhorn router without its kernel (the ATen
// iteration reads its error on the host). `bench train` and the trainer ask it.
void check_cuda_graph_support(const std::string& what, const std::string& device_setting,
                              const torch::Device& device, const ModelConfig& mc, const RouterConfig& rc);

}  // namespace moecpt
