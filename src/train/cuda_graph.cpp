#include "train/cuda_graph.h"

#include <string>

#include "core/error.h"
#include "model/cuda_kernels.h"

#ifdef MOECPT_TORCH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace moecpt {

bool MicroStepGraphs::compiled() {
#ifdef MOECPT_TORCH_CUDA
  return true;
#else
  return false;
#endif
}

struct MicroStepGraphs::Impl {
  Body body;
  std::vector<torch::Tensor> params;
  Mode mode;
  int64_t warmup;
  int64_t runs = 0, replays = 0;

  // As zero_grad(set_to_none): the next backward writes the gradients afresh.
  void unset_grads() {
    for (auto& p : params)
      if (p.grad().defined()) p.mutable_grad() = torch::Tensor();
  }

  torch::Tensor run_eager(bool first) {
    if (first) unset_grads();
    return body().clone();
  }

#ifdef MOECPT_TORCH_CUDA
  c10::DeviceIndex device = 0;
  std::optional<c10::cuda::CUDAStream> side;  // warm-up and capture stream
  std::unique_ptr<at::cuda::CUDAGraph> first_graph, accum_graph;
  torch::Tensor first_out, accum_out;  // the body's results, rewritten by each replay

  // `to` waits for the work enqueued on `from` so far.
  static void wait(c10::cuda::CUDAStream from, c10::cuda::CUDAStream to) {
    at::cuda::CUDAEvent ev;
    ev.record(from);
    ev.block(to);
  }

  torch::Tensor run_on_side(bool first) {
    const auto cur = c10::cuda::getCurrentCUDAStream(device);
    wait(cur, *side);
    torch::Tensor out;
    {
      c10::cuda::CUDAStreamGuard guard(*side);
      if (first) unset_grads();
      out = body();
    }
    wait(*side, cur);
    return out.clone();
  }

  void capture(bool first) {
    c10::cuda::device_synchronize();  // the side stream starts after everything enqueued so far
    if (!first_graph) c10::cuda::CUDACachingAllocator::emptyCache();  // the eager runs' cached blocks
    auto graph = std::make_unique<at::cuda::CUDAGraph>();
    torch::Tensor out;
    {
      c10::cuda::CUDAStreamGuard guard(*side);
      if (first) unset_grads();
      if (first_graph)
        graph->capture_begin(first_graph->pool());  // one pool: the graphs never run at once
      else
        graph->capture_begin();
      try {
        out = body();
      } catch (const std::exception& e) {
        try {
          graph->capture_end();  // leaves capture mode (and reports the invalidated capture: ignored)
        } catch (const std::exception&) {
        }
        throw Error(std::string("CUDA graph capture of the ") + (first ? "first" : "accumulating") +
                    " micro-batch failed: something in the step syncs with the host, copies from host "
                    "memory or uses another stream (the MoE's expert loop and the ATen Sinkhorn iteration "
                    "do; use the grouped GEMM and MOECPT_SINKHORN_KERNEL=1). The error: " +
                    std::string(e.what()));
      }
      try {
        graph->capture_end();
      } catch (const std::exception& e) {
        throw Error(std::string("CUDA graph capture failed when it ended (an op in the step is not "
                                "capturable): ") +
                    e.what());
      }
    }
    c10::cuda::device_synchronize();
    (first ? first_out : accum_out) = out;
    (first ? first_graph : accum_graph) = std::move(graph);
  }

  torch::Tensor run_graph(bool first) {
    if (!side) {
      device = c10::cuda::current_device();
      for (const auto& p : params)
        if (!p.is_cuda()) throw Error("CUDA graphs: every parameter must be on the CUDA device");
      side = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device);
    }
    // Eager until the warm-up is done and a first micro-batch comes to be
    // captured; an accumulating one needs the first graph's gradients.
    if (!first_graph && (runs < warmup || !first)) return run_on_side(first);
    auto& graph = first ? first_graph : accum_graph;
    if (!graph) capture(first);
    graph->replay();
    ++replays;
    return (first ? first_out : accum_out).clone();
  }
#endif
};

MicroStepGraphs::MicroStepGraphs(Body body, std::vector<torch::Tensor> params, Mode mode, int64_t warmup)
    : impl_(std::make_unique<Impl>()) {
  if (!body) throw Error("CUDA graphs: no body to run");
  if (warmup < 1) throw Error("CUDA graphs: the warm-up must be at least one eager run");
  impl_->body = std::move(body);
  impl_->params = std::move(params);
  impl_->mode = mode;
  impl_->warmup = warmup;
  if (mode == Mode::kGraph && !compiled())
    throw Error("CUDA graphs need a CUDA build of LibTorch (this build has none: docs/performance.md)");
}

MicroStepGraphs::~MicroStepGraphs() = default;

torch::Tensor MicroStepGraphs::run(bool first) {
  torch::Tensor out;
#ifdef MOECPT_TORCH_CUDA
  if (impl_->mode == Mode::kGraph) out = impl_->run_graph(first);
#endif
  if (!out.defined()) out = impl_->run_eager(first);
  ++impl_->runs;
  return out;
}

int64_t MicroStepGraphs::graphs_captured() const {
#ifdef MOECPT_TORCH_CUDA
  return int64_t(bool(impl_->first_graph)) + int64_t(bool(impl_->accum_graph));
#else
  return 0;
#endif
}

int64_t MicroStepGraphs::replays() const { return impl_->replays; }

void check_cuda_graph_support(const std::string& what, const std::string& device_setting,
                              const torch::Device& device, const ModelConfig& mc, const RouterConfig& rc) {
  if (!device.is_cuda()) throw Error(what + " needs " + device_setting);
  if (!MicroStepGraphs::compiled()) throw Error(what + " needs a CUDA build of LibTorch (docs/performance.md)");
  if (mc.ffn == "moe" && rc.type == "sinkhorn" && !model::use_sinkhorn_kernel(device, mc.n_experts))
    throw Error(what + " with the Sinkhorn router needs MOECPT_SINKHORN_KERNEL=1 (the ATen iteration reads its "
                "error on the host, which a CUDA graph cannot hold)");
}

}  // namespace moecpt
