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
  int64_t calls = 0;
  double self_us = 0;   // time inside this op minus its child ops
  double total_us = 0;  // time inside this op (outermost occurrence only, no double counting of recursion)
};

// Runs fn once with the profiler on (this thread and tasks it launches) and
// returns the ops sorted by self time, largest first. Throws moecpt::Error if a
// profiler is already running.
std::vector<OpStat> profile_ops(const std::function<void()>& fn);

// The table as text: the top `limit` rows by self time, with shares of `wall_us`.
std::string format_op_table(const std::vector<OpStat>& ops, double wall_us, size_t limit);

}  // namespace moecpt::train
