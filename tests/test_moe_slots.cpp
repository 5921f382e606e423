// The MoE dispatch and combine as gathers (model/moe_slots.h) against loops
// over tokens written out here, the textbook index_select / index_add ops
// under autograd, and finite differences.
#include <gtest/gtest.h>

#include <cmath>

#include "expect_error.h"
#include "gradcheck.h"

#include "core/error.h"
#include "model/cuda_kernels.h"
#include "model/moe_slots.h"

using namespace moecpt;
using namespace moecpt::model;
using moecpt::testing::expect_error_containing;
using moecpt::testing::expect_grad_matches_fd;

TEST(MoESlots, StableSortByExpertAndItsInverse) {
  // flattened ids [2, 0, 0, 1, 2, 2]: expert 0 has slots 1, 2; expert 1 slot 3;
  // expert 2 slots 0, 4, 5 (in slot order: the sort is stable).
  auto ids = torch::tensor({2, 0, 0, 1, 2, 2}, torch::kInt64).view({3, 2});
  auto o = sort_slots_by_expert(ids);
  EXPECT_EQ(o.top_k, 2);
  EXPECT_TRUE(torch::equal(o.order_S, torch::tensor({1, 2, 3, 0, 4, 5}, torch::kInt64)));
  EXPECT_TRUE(torch::equal(o.inverse_S, torch::tensor({3, 0, 1, 2, 4, 5}, torch::kInt64)));
}

// Narrow sort keys (uint8, int16, int32 by the expert count) give the int64
// sort's order: the same stable permutation, ties in slot order.
TEST(MoESlots, NarrowSortKeysGiveTheSameOrder) {
  torch::manual_seed(19);
  for (int64_t E : {31, 256, 300, 40000}) {
    auto ids = torch::randint(E, {999, 3}, torch::kInt64);
    ids[5][1] = E - 1;  // the largest id is representable
    const auto wide = sort_slots_by_expert(ids), narrow = sort_slots_by_expert(ids, E);
    EXPECT_TRUE(torch::equal(wide.order_S, narrow.order_S)) << E;
    EXPECT_TRUE(torch::equal(wide.inverse_S, narrow.inverse_S)) << E;
    EXPECT_EQ(narrow.order_S.scalar_type(), torch::kInt64);
  }
}

TEST(MoESlots, DispatchAndCombineEqualLoopsOverTokens) {
  for (int64_t K : {1, 3}) {
    torch::manual_seed(20 + K);
    const int64_t T = 9, D = 5, E = 4;
    auto ids = torch::randint(E, {T, K}, torch::kInt64);
    auto gates = torch::rand({T, K}, torch::kFloat64);
    auto x = torch::randn({T, D}, torch::kFloat64), y_SD = torch::randn({T * K, D}, torch::kFloat64);
    const auto o = sort_slots_by_expert(ids);
    auto x_SD = dispatch_slots(x, o);
    auto y = combine_slots(y_SD, gates, o);
    // slot s = t·K + j lands at sorted position inverse[s]; its expert ids are ascending
    for (int64_t t = 0; t < T; ++t) {
      auto want = torch::zeros({D}, torch::kFloat64);
      for (int64_t j = 0; j < K; ++j) {
        const int64_t pos = o.inverse_S[t * K + j].item<int64_t>();
        EXPECT_TRUE(torch::equal(x_SD[pos], x[t])) << "K " << K << " token " << t;
        want += gates[t][j] * y_SD[pos];
      }
      EXPECT_TRUE(torch::allclose(y[t], want, 0, 1e-14)) << "K " << K << " token " << t;
    }
    auto sorted_ids = ids.reshape({-1}).index_select(0, o.order_S);
    EXPECT_TRUE(torch::equal(std::get<0>(sorted_ids.sort()), sorted_ids)) << "grouped by expert";
    EXPECT_TRUE(torch::allclose(y, combine_slots_index_add(y_SD, gates, o), 0, 1e-14));
    EXPECT_TRUE(torch::equal(x_SD, dispatch_slots_index_select(x, o)));
  }
}

TEST(MoESlots, GradientsEqualTheIndexAddOpsAndFiniteDifferences) {
  for (int64_t K : {1, 2, 3}) {
    torch::manual_seed(30 + K);
    const int64_t T = 7, D = 4, E = 3;
    auto ids = torch::randint(E, {T, K}, torch::kInt64);
    const auto o = sort_slots_by_expert(ids);
    auto x0 = torch::randn({T, D}, torch::kFloat64), g0 = torch::rand({T, K}, torch::kFloat64);
    auto W = torch::randn({D, D}, torch::kFloat64), R = torch::randn({T, D}, torch::kFloat64);
    // A per-slot "expert" that depends on the slot's position, so that a
    // wrong permutation in either backward changes the gradients.
    auto pos_scale = torch::linspace(0.5, 1.5, T * K, torch::kFloat64).unsqueeze(1);
    auto loss = [&](const torch::Tensor& x, const torch::Tensor& g, bool gather) {
      auto x_SD = gather ? dispatch_slots(x, o) : dispatch_slots_index_select(x, o);
      auto y_SD = torch::tanh(torch::mm(x_SD, W)) * pos_scale;
      auto y = gather ? combine_slots(y_SD, g, o) : combine_slots_index_add(y_SD, g, o);
      return (y * R).sum();
    };
    auto xa = x0.clone().requires_grad_(), ga = g0.clone().requires_grad_();
    auto xb = x0.clone().requires_grad_(), gb = g0.clone().requires_grad_();
    loss(xa, ga, true).backward();
    loss(xb, gb, false).backward();
    EXPECT_TRUE(torch::allclose(xa.grad(), xb.grad(), 0, 1e-13)) << "K " << K;
    EXPECT_TRUE(torch::allclose(ga.grad(), gb.grad(), 0, 1e-13)) << "K " << K;
    auto x = x0.clone().requires_grad_(), g = g0.clone().requires_grad_();
    auto f = [&] { return loss(x, g, true); };
    expect_grad_matches_fd(f, x, {0, 5, 14, 27}, "x, K " + std::to_string(K));
    expect_grad_matches_fd(f, g, {0, T * K / 2, T * K - 1}, "gates, K " + std::to_string(K));
  }
}

TEST(MoESlots, Bfloat16CombineIsWithinRoundingOfTheExactSum) {
  torch::manual_seed(40);
  const int64_t T = 64, K = 3, D = 32, E = 5;
  auto ids = torch::randint(E, {T, K}, torch::kInt64);
  const auto o = sort_slots_by_expert(ids);
  auto gates = torch::softmax(torch::randn({T, K}), -1);
  auto y_SD = torch::randn({T * K, D});
  auto exact = combine_slots(y_SD.to(torch::kFloat64), gates.to(torch::kFloat64), o);
  auto y = combine_slots(y_SD.to(torch::kBFloat16), gates, o);
  EXPECT_EQ(y.scalar_type(), torch::kBFloat16);
  // |Σ g y| bound: inputs rounded (2^-8 relative each), products and sum
  // accumulated in fp32 or rounded at most per term: a few bf16 ulps of Σ|g y|.
  auto scale = combine_slots(y_SD.abs().to(torch::kFloat64), gates.to(torch::kFloat64), o);
  EXPECT_TRUE(((y.to(torch::kFloat64) - exact).abs() <= scale * 4 * std::ldexp(1.0, -8)).all().item<bool>())
      << "max |Δ| " << (y.to(torch::kFloat64) - exact).abs().max().item<double>();
}

TEST(MoESlots, MismatchedShapesAreRefusedByName) {
  const auto o = sort_slots_by_expert(torch::zeros({4, 2}, torch::kInt64));
  expect_error_containing([&] { dispatch_slots(torch::zeros({5, 3}), o); }, "5 tokens × K = 2");
  expect_error_containing([&] { combine_slots(torch::zeros({8, 3}), torch::zeros({4, 3}), o); }, "gates must be [T, K]");
  expect_error_containing([&] { combine_slots(torch::zeros({6, 3}), torch::zeros({3, 2}), o); }, "6 slot outputs for an order of 8");
  expect_error_containing([&] { sort_slots_by_expert(torch::zeros({8}, torch::kInt64)); }, "[T, K]");
}

// MOECPT_MOE_COMBINE=kernel asks for CUDA kernels; off CUDA (and for fp64) the
// gathers run, with the same results. The kernels themselves refuse CPU rows
// by name (their GPU test: CudaKernels.MoESlotGathersMatchAnFp64ReferenceOnAGpu).
TEST(MoESlots, TheKernelChoiceFallsBackToTheGathersOffCuda) {
  torch::manual_seed(41);
  const int64_t T = 6, K = 2, D = 5;
  auto ids = torch::randint(3, {T, K}, torch::kInt64);
  const auto o = sort_slots_by_expert(ids);
  auto x = torch::randn({T, D}), y_SD = torch::randn({T * K, D}), gates = torch::rand({T, K});
  EXPECT_EQ(slot_ops_for(SlotOps::kKernel, y_SD), SlotOps::kGather);
  EXPECT_EQ(slot_ops_for(SlotOps::kIndexAdd, y_SD), SlotOps::kIndexAdd);
  EXPECT_STREQ(slot_ops_name(SlotOps::kKernel), "kernel");
  EXPECT_TRUE(torch::equal(combine_slots_with(SlotOps::kKernel, y_SD, gates, o), combine_slots(y_SD, gates, o)));
  EXPECT_TRUE(torch::equal(dispatch_slots_with(SlotOps::kKernel, x, o), dispatch_slots(x, o)));
  EXPECT_TRUE(torch::allclose(combine_slots_with(SlotOps::kIndexAdd, y_SD, gates, o), combine_slots(y_SD, gates, o),
                              1e-6, 1e-6));
  expect_error_containing([&] { combine_slots_cuda(y_SD, gates, o); }, "needs fp32/bf16 CUDA rows");
  expect_error_containing([&] { dispatch_slots_cuda(x, o); }, "needs fp32/bf16 CUDA rows");
}


// The counting-sort slot order (MOECPT_SLOT_SORT_KERNEL) is CUDA only: off
// CUDA the sort runs whatever the switch says, and the kernel's entry point
// refuses CPU ids and expert counts it cannot take, by name. (Its order is
// checked against std::stable_sort under the CPU emulation, tests/cuda_emu,
// and against ATen's stable sort on a GPU, test_cuda_kernels.cpp.)
TEST(MoESlots, TheSlotSortKernelIsCudaOnlyAndRefusesWhatItCannotSort) {
  auto ids = torch::randint(31, {10, 3}, torch::kInt64);
  EXPECT_FALSE(use_slot_sort_kernel(ids.reshape({-1}), 31));
  expect_error_containing([&] { cuda_slot_sort(ids.reshape({-1}), 31, 3); },
                          "cuda_slot_sort: the expert ids must be a contiguous int64 CUDA [S] tensor");
  expect_error_containing([&] { cuda_expert_counts(ids.reshape({-1}), 31); },
                          "cuda_expert_counts: the expert ids must be a contiguous int64 CUDA [S] tensor");
  if (torch::cuda::is_available()) {
    auto on_gpu = ids.reshape({-1}).cuda();
    expect_error_containing([&] { cuda_slot_sort(on_gpu, 0, 3); }, "cuda_slot_sort: needs 1 <= E <=");
  }
}
