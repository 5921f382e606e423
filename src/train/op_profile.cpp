#include "train/op_profile.h"

#include <algorithm>
#include <cstdio>
#include <map>

#include "core/error.h"
#include "core/pch.h"

// The legacy profiler is deprecated in LibTorch 2.x (still shipped as of the
// versions we build against); without it, --profile is a clear error.
#if __has_include(<torch/csrc/autograd/profiler_legacy.h>)
#include <torch/csrc/autograd/profiler_legacy.h>
#define MOECPT_HAVE_LEGACY_PROFILER 1
#else
#define MOECPT_HAVE_LEGACY_PROFILER 0
#endif

namespace moecpt::train {

#if MOECPT_HAVE_LEGACY_PROFILER

namespace {
namespace prof = torch::autograd::profiler;
using torch::profiler::impl::ProfilerConfig;
using torch::profiler::impl::ProfilerState;

struct Open {
  const prof::LegacyEvent* push;
  double child_us = 0;
  double child_device_us = 0;
};

// GPU time between two events' CUDA events; 0 where none was recorded.
double device_elapsed_us(const prof::LegacyEvent& from, const prof::LegacyEvent& to) {
  if (!from.hasCuda() || !to.hasCuda()) return 0.0;
  return from.cudaElapsedUs(to);
}

// "[16384, 1024] [] [3072, 1024]": one bracket per input ([] for a non-tensor).
std::string format_shapes(const std::vector<std::vector<int64_t>>& shapes) {
  std::string s;
  for (const auto& shape : shapes) {
    if (!s.empty()) s += ' ';
    s += '[';
    for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    s += ']';
  }
  return s;
}

// One thread's push/pop events → per-name (or per name and shapes) calls, self
// and total time. Pops close the innermost open range (RecordFunction ranges
// nest per thread).
void aggregate(const std::vector<prof::LegacyEvent>& events, bool by_shapes, std::map<std::string, OpStat>& by_name) {
  std::vector<Open> stack;
  std::map<std::string, int> open_count;  // recursion guard for total time
  for (const auto& ev : events) {
    if (ev.kind() == prof::EventKind::PushRange) {
      stack.push_back({&ev});
      ++open_count[ev.name()];
    } else if (ev.kind() == prof::EventKind::PopRange) {
      if (stack.empty()) continue;  // a range opened before the profiler started
      Open o = stack.back();
      stack.pop_back();
      const double dur = o.push->cpuElapsedUs(ev);
      const double dev = device_elapsed_us(*o.push, ev);
      const std::string shapes = by_shapes ? format_shapes(o.push->shapes()) : std::string();
      auto& s = by_name[by_shapes ? std::string(o.push->name()) + '\t' + shapes : std::string(o.push->name())];
      s.name = o.push->name();
      s.shapes = shapes;
      ++s.calls;
      s.self_us += dur - o.child_us;
      s.device_self_us += dev - o.child_device_us;
      if (--open_count[o.push->name()] == 0) {
        s.total_us += dur;
        s.device_total_us += dev;
      }
      if (!stack.empty()) {
        stack.back().child_us += dur;
        stack.back().child_device_us += dev;
      }
    }
  }
}
}  // namespace

std::vector<OpStat> profile_ops(const std::function<void()>& fn, bool device_times, bool by_shapes) {
  if (prof::profilerEnabled()) throw Error("profile_ops: a profiler is already running");
  prof::enableProfilerLegacy(
      ProfilerConfig(device_times ? ProfilerState::CUDA : ProfilerState::CPU, /*report_input_shapes=*/by_shapes));
  prof::thread_event_lists lists;
  try {
    fn();
  } catch (...) {
    prof::disableProfilerLegacy();
    throw;
  }
  lists = prof::disableProfilerLegacy();
  std::map<std::string, OpStat> by_name;
  for (const auto& l : lists) aggregate(l, by_shapes, by_name);
  std::vector<OpStat> out;
  for (auto& [_, s] : by_name) out.push_back(s);
  std::sort(out.begin(), out.end(), [&](const OpStat& a, const OpStat& b) {
    return device_times ? a.device_self_us > b.device_self_us : a.self_us > b.self_us;
  });
  return out;
}

#else
std::vector<OpStat> profile_ops(const std::function<void()>&, bool, bool) {
  throw Error("--profile: this LibTorch has no legacy profiler (torch/csrc/autograd/profiler_legacy.h)");
}
#endif

std::string format_op_table(const std::vector<OpStat>& ops, double wall_us, size_t limit, double device_us) {
  std::string s;
  char line[512];
  bool shapes = false;
  for (size_t i = 0; i < ops.size() && i < limit; ++i) shapes = shapes || !ops[i].shapes.empty();
  const int w = shapes ? 78 : 42;  // the op column, wider with shapes
  auto label = [&](const OpStat& o) { return o.shapes.empty() ? o.name : o.name + " " + o.shapes; };
  if (device_us > 0) {
    std::snprintf(line, sizeof line, "  %-*s %7s %10s %6s %10s %10s\n", w, "op (by self device time)", "calls",
                  "dev self ms", "self%", "dev tot ms", "cpu self ms");
    s += line;
    for (size_t i = 0; i < ops.size() && i < limit; ++i) {
      const auto& o = ops[i];
      std::snprintf(line, sizeof line, "  %-*.*s %7lld %10.2f %5.1f%% %10.2f %10.2f\n", w, w, label(o).c_str(),
                    (long long)o.calls, o.device_self_us / 1e3, 100.0 * o.device_self_us / device_us,
                    o.device_total_us / 1e3, o.self_us / 1e3);
      s += line;
    }
    return s;
  }
  std::snprintf(line, sizeof line, "  %-*s %7s %10s %6s %10s\n", w, "op (by self CPU time)", "calls", "self ms", "self%",
                "total ms");
  s += line;
  for (size_t i = 0; i < ops.size() && i < limit; ++i) {
    const auto& o = ops[i];
    std::snprintf(line, sizeof line, "  %-*.*s %7lld %10.2f %5.1f%% %10.2f\n", w, w, label(o).c_str(), (long long)o.calls,
                  o.self_us / 1e3, wall_us > 0 ? 100.0 * o.self_us / wall_us : 0.0, o.total_us / 1e3);
    s += line;
  }
  return s;
}

OpKind op_kind(const std::string& name) {
  if (name.find("attention") != std::string::npos || name.find("Attention") != std::string::npos)
    return OpKind::kAttention;
  static const char* const kMatmuls[] = {"mm",     "addmm",  "bmm",         "baddbmm",    "addbmm",
                                         "matmul", "linear", "_grouped_mm", "_scaled_mm", "_scaled_grouped_mm"};
  const std::string prefix = "aten::";
  if (name.compare(0, prefix.size(), prefix) != 0) return OpKind::kOther;
  std::string base = name.substr(prefix.size());
  if (const auto dot = base.find('.'); dot != std::string::npos) base.resize(dot);  // overloads: "addmm.dtype_out"
  if (!base.empty() && base.back() == '_') base.pop_back();  // in place: "addmm_"
  for (const char* m : kMatmuls)
    if (base == m) return OpKind::kMatmul;
  return OpKind::kOther;
}

TimeSplit split_time(const std::vector<OpStat>& ops) {
  TimeSplit t;
  for (const auto& o : ops) t.device = t.device || o.device_self_us > 0;
  for (const auto& o : ops) {
    const double us = t.device ? o.device_self_us : o.self_us;
    switch (op_kind(o.name)) {
      case OpKind::kMatmul: t.matmul_us += us; break;
      case OpKind::kAttention: t.attention_us += us; break;
      case OpKind::kOther: t.other_us += us; break;
    }
  }
  return t;
}

double TimeSplit::mfu_ceiling(double flops, double peak_tflops) const {
  const double us = matmul_us + attention_us;
  if (us <= 0 || peak_tflops <= 0) return 0.0;
  return flops / (us * 1e-6) / (peak_tflops * 1e12);
}

}  // namespace moecpt::train
