// Kernel benchmarks behind the MoE layer and the output head (Google Benchmark),
// forward + backward, on the mini models' shapes:
//   expert_ffn/per_expert_mm  — the library's GroupedExperts: one host copy of the
//                               group sizes, then three mm per non-empty group
//   expert_ffn/padded_bmm     — every group padded to the largest one, scattered
//                               into [E, C, D] and run as three bmm
//   dispatch                  — stable sort of the slots, gather, gate-weighted index_add
//   head_ce/unfused|fused     — logits + cross_entropy vs model/fused_ce.h
//
//   moecpt_bench_kernels [--benchmark_filter=expert_ffn]
// Environment: MOECPT_BENCH_THREADS (default 1, the end-to-end default on 2 vCPUs).
#include <benchmark/benchmark.h>

#include <cstdlib>

#include "core/malloc_policy.h"
#include "model/fused_ce.h"
#include "model/moe.h"
#include "model/torch_compat.h"

using namespace moecpt;

namespace {

void set_threads() {
  const char* v = std::getenv("MOECPT_BENCH_THREADS");
  torch::set_num_threads(v ? std::atoi(v) : 1);
  compat::set_blas_threads(1);
}

struct Shape {
  int64_t T, D, E, K, H;
};
// granular: mini granular (E = 15, k = 3, h_e = 88); switch: mini Switch (E = 8, k = 1, h_e = 352);
// dense: the mini dense MLP as one expert (h = 352, the FLOPs of switch; granular's routed
// experts are 3/4 of them, its shared expert the other 1/4).
Shape shape_of(int64_t which) {
  return which == 0 ? Shape{2048, 128, 15, 3, 88} : which == 1 ? Shape{2048, 128, 8, 1, 352} : Shape{2048, 128, 1, 1, 352};
}
const char* name_of(int64_t which) { return which == 0 ? "granular" : which == 1 ? "switch" : "dense"; }

// Routed slots sorted by expert, with a mildly skewed (realistic) load.
struct Routed {
  torch::Tensor x_SD, counts_E, order_S;
};
Routed make_routed(const Shape& s) {
  torch::manual_seed(0);
  auto logits = torch::randn({s.T, s.E}) + torch::linspace(0, 1, s.E);
  auto ids = std::get<1>(logits.topk(s.K, 1)).reshape({-1});
  auto order = std::get<1>(ids.sort(c10::optional<bool>(true), 0));
  auto counts = torch::bincount(ids, {}, s.E);
  auto x = torch::randn({s.T * s.K, s.D});
  return {x, counts, order};
}

void BM_ExpertsPerExpertMm(benchmark::State& state) {
  set_threads();
  const auto s = shape_of(state.range(0));
  state.SetLabel(name_of(state.range(0)));
  model::GroupedExperts experts(s.E, s.D, s.H, "geglu", 0.02, 0.02);
  auto r = make_routed(s);
  auto x = r.x_SD.clone().requires_grad_();
  for (auto _ : state) {
    auto y = experts(x, r.counts_E);
    y.sum().backward();
  }
}

// The padded-bmm alternative: groups scattered into [E, C, D] (C = largest group).
void BM_ExpertsPaddedBmm(benchmark::State& state) {
  set_threads();
  const auto s = shape_of(state.range(0));
  state.SetLabel(name_of(state.range(0)));
  model::GroupedExperts experts(s.E, s.D, s.H, "geglu", 0.02, 0.02);
  auto r = make_routed(s);
  auto x = r.x_SD.clone().requires_grad_();
  for (auto _ : state) {
    auto counts = r.counts_E;
    const int64_t C = counts.max().item<int64_t>();  // the one host sync
    auto starts = counts.cumsum(0) - counts;
    auto expert_S = torch::repeat_interleave(torch::arange(s.E), counts);
    auto pos_S = torch::arange(x.size(0)) - starts.index_select(0, expert_S);
    auto flat_S = expert_S * C + pos_S;
    auto xp = torch::zeros({s.E * C, s.D}).index_copy(0, flat_S, x).view({s.E, C, s.D});
    auto h = torch::gelu(torch::bmm(xp, experts->w1_EDH)) * torch::bmm(xp, experts->w3_EDH);
    auto y = torch::bmm(h, experts->w2_EHD).view({s.E * C, s.D}).index_select(0, flat_S);
    y.sum().backward();
  }
}

void BM_Dispatch(benchmark::State& state) {
  set_threads();
  const auto s = shape_of(state.range(0));
  state.SetLabel(name_of(state.range(0)));
  torch::manual_seed(0);
  auto x = torch::randn({s.T, s.D}).requires_grad_();
  auto ids = std::get<1>(torch::randn({s.T, s.E}).topk(s.K, 1));
  auto gates = torch::rand({s.T, s.K}).requires_grad_();
  for (auto _ : state) {
    auto order = std::get<1>(ids.reshape({-1}).sort(c10::optional<bool>(true), 0));
    auto token_idx = order.div(s.K, "floor");
    auto x_SD = x.index_select(0, token_idx);
    auto g = gates.reshape({-1}).index_select(0, order);
    auto y = torch::zeros({s.T, s.D}).index_add(0, token_idx, x_SD * g.unsqueeze(1));
    y.sum().backward();
  }
}

void BM_HeadCE(benchmark::State& state, bool fused) {
  set_threads();
  const int64_t N = 2048, D = 128, V = 8192;
  torch::manual_seed(0);
  auto x = torch::randn({N, D}).requires_grad_();
  auto w = (torch::randn({V, D}) * 0.02).requires_grad_();
  auto t = torch::randint(V, {N}, torch::kInt64);
  const int64_t chunk = state.range(0);
  for (auto _ : state) {
    auto loss = fused ? model::fused_linear_cross_entropy(x, w, t, chunk)
                      : torch::cross_entropy_loss(torch::mm(x, w.t()), t);
    loss.backward();
  }
  state.counters["rows_per_chunk"] = double(chunk);
}

}  // namespace

BENCHMARK(BM_ExpertsPerExpertMm)->Name("expert_ffn/per_expert_mm")->Arg(0)->Arg(1)->Arg(2)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_ExpertsPaddedBmm)->Name("expert_ffn/padded_bmm")->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_Dispatch)->Name("dispatch")->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_HeadCE, unfused, false)->Name("head_ce/unfused")->Arg(0)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_HeadCE, fused, true)->Name("head_ce/fused")->Arg(16)->Arg(32)->Arg(128)->Arg(512)->Unit(benchmark::kMillisecond)->UseRealTime();

int main(int argc, char** argv) {
  keep_freed_memory();  // as the moecpt binary does (core/malloc_policy.h)
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
