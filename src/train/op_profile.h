// Where a step's CPU time goes, by operator: LibTorch's (legacy, CPU) profiler
// around a callable, aggregated per op name like PyTorch's key_averages():
// calls, total time (with children) and self time (without). Autograd's
// backward nodes appear under their names (e.g. "MmBackward0"), and the MoE
// layer marks its phases as user scopes ("moe.router", "moe.dispatch", ...),
// which have only children, so their total is the phase's time.
#pragma once
#include <functional>
#include <string>
#include <vector>

namespace moecpt::train {

struct OpStat {
  std::string name;
  std::string shapes;  // with by_shapes: the inputs' shapes, e.g. "[16384, 1024] [3072, 1024]"; else empty
  int64_t calls = 0;
  double self_us = 0;   // time inside this op minus its child ops
  double total_us = 0;  // time inside this op (outermost occurrence only, no double counting of recursion)
  // With device times (CUDA): GPU time between the CUDA events recorded at the
  // op's start and end on the current stream, i.e. of the kernels it queued
  // (the stream runs them in order); 0 when not measured.
  double device_self_us = 0;
  double device_total_us = 0;
};

// Runs fn once with the profiler on (this thread and tasks it launches) and
// returns the ops sorted by self time, largest first. Throws moecpt::Error if a
// profiler is already running. device_times: also record CUDA events around
// every op (a CUDA build on a GPU; the ops are then sorted by device self time),
// which adds a little overhead per op. by_shapes: one row per (op, input
// shapes) instead of per op, to tell apart e.g. the casts of activations from
// those of weights (the profiler then records every op's input sizes).
std::vector<OpStat> profile_ops(const std::function<void()>& fn, bool device_times = false, bool by_shapes = false);

// The table as text: the top `limit` rows by self time, with shares of `wall_us`
// (of the device time instead, with device_us > 0, and a device column); rows
// with shapes show them after the op's name.
std::string format_op_table(const std::vector<OpStat>& ops, double wall_us, size_t limit, double device_us = 0);

// What an op does, by its name: a matrix product that carries the model's
// FLOPs (mm, addmm, bmm, baddbmm, addbmm, the grouped and scaled products,
// matmul, linear, and their in-place and out= forms), fused attention (any op
// whose name contains "attention": cuDNN, flash, memory-efficient, and
// moecpt's CPU attention Function), or the rest. Matrix–vector products (mv,
// addmv: the Sinkhorn iteration) are the rest: they are memory-bound and are
// not in the model's FLOP count.
enum class OpKind { kMatmul, kAttention, kOther };
OpKind op_kind(const std::string& name);

// A profiled step's time split by OpKind, summed over self times (so nested
// ops are not counted twice): device self times when any op has one (a GPU
// profile), else CPU self times.
struct TimeSplit {
  double matmul_us = 0;
  double attention_us = 0;
  double other_us = 0;
  bool device = false;  // from device times
  double total_us() const { return matmul_us + attention_us + other_us; }
  // The MFU a step of `flops` would reach if it took only the time of its
  // matrix products and attention at the speed they ran here: the ceiling
  // that removing or fusing every other op approaches. 0 without that time or
  // peak.
  double mfu_ceiling(double flops, double peak_tflops) const;
};
TimeSplit split_time(const std::vector<OpStat>& ops);

}  // namespace moecpt::train
