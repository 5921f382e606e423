// A CPU emulation of the CUDA execution model, enough to *run* moecpt's
// kernels (src/model/cuda/kernels.cu) on a machine without a GPU: the tests in
// test_kernels_emulated.cpp compile that file as C++ against the stand-in
// headers in include/ and compare what the kernels write with fp64 references.
//
// What is emulated: a launch runs its blocks one after another; the threads of
// a block run as fibers on one OS thread and switch only where CUDA threads
// wait for each other (__syncthreads, full-warp shuffles), so every such wait
// is a real rendezvous. Checked on the way, as errors (std::runtime_error):
//   - threads of one block waiting at __syncthreads on different lines, or some
//     at __syncthreads while lanes of a warp wait at a shuffle (divergence);
//   - a full-mask shuffle (or __match_any_sync) that not all 32 lanes of the
//     warp reach, or whose lanes disagree on the mask, the xor offset or the op;
//   - a block size that is 0, above 1024, or not a whole number of warps where
//     a shuffle runs.
// Fibers run in a chosen order (set_order, set_eager_warps): a data race
// between two waits (a missing __syncthreads) shows as results that differ
// between orders.
// Not emulated: memory coherence between blocks, atomics, dynamic shared
// memory, streams (a launch runs to the end before it returns).
#pragma once
#include <cstdint>
#include <functional>

namespace cuda_emu {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

// Inside a running kernel: the current thread's and block's coordinates (1-D launches).
const Dim3& thread_idx();
const Dim3& block_idx();
const Dim3& block_dim();
const Dim3& grid_dim();

// __syncthreads() at source line `line` (the line tells divergent barriers apart).
void syncthreads(int line);
// __shfl_xor_sync(mask, v, lane_mask) at source line `line`: the value of lane
// (lane ^ lane_mask).
float shfl_xor(unsigned mask, float v, int lane_mask, int line);
// __match_any_sync(mask, v) at source line `line`: the mask of the warp's lanes
// whose v equals this lane's.
unsigned match_any(unsigned mask, unsigned v, int line);

enum class Order { kForward, kReverse };
// Which fiber runs first at every resumption (default kForward).
void set_order(Order order);
// Eager warps: a warp whose 32 lanes have reached a shuffle is released at
// once and runs on (to its next wait) before the fibers not yet run; otherwise
// (default) every runnable fiber runs before any warp is released. Both are
// schedules a GPU may pick; the eager one lets a warp run ahead of the rest of
// its block across warp-level syncs, which exposes a missing __syncthreads
// between a warp op and a write that other warps still read.
void set_eager_warps(bool eager);

// Runs body once per thread of a 1-D launch of `grid` blocks of `block`
// threads; returns the CUDA error code the launch would set (0 on success, 9 =
// invalid configuration). Errors of the kernel (above) are thrown.
int launch(unsigned grid, unsigned block, const std::function<void()>& body);
// The code of the last failed launch, then 0 (cudaGetLastError).
int take_last_error();

struct Counters {
  int64_t launches = 0, blocks = 0, threads = 0, block_barriers = 0, warp_shuffles = 0;
};
// Totals since the program started (the tests check that a kernel did sync).
const Counters& counters();

}  // namespace cuda_emu
