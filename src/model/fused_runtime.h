// Runtime settings of the fast CPU path (docs/performance.md), next to the
// LibTorch 1.13/2.x wrappers of model/torch_compat.h (to move there the next
// time that header changes anyway: touching it rebuilds most of the project).
#pragma once
#include <ATen/autocast_mode.h>
#include <dlfcn.h>

#include <fstream>
#include <sstream>
#include <string>

#include "model/torch_compat.h"

namespace moecpt::compat {

// Threads of the BLAS library under ATen's matmuls, if it is OpenBLAS (Debian's
// LibTorch calls the pthread build): its own thread pool spins beside ATen's
// OpenMP threads and, on 2 loaded vCPUs, made attention's bmm up to 90x slower
// (docs/performance.md). moecpt keeps it at 1 and splits its large matmuls over
// ATen's threads itself (fused head chunks, expert groups, FFN rows:
// model/fused_ce.cpp, model/expert_ffn.cpp), each thread calling
// single-threaded BLAS. Returns false when no OpenBLAS is loaded (e.g. MKL).
inline bool set_blas_threads(int n) {
  using SetThreads = void (*)(int);
  auto fn = reinterpret_cast<SetThreads>(::dlsym(RTLD_DEFAULT, "openblas_set_num_threads"));
  if (fn == nullptr) return false;
  fn(n);
  return true;
}

// Whether autocast is on for `device`'s type (the dtype is bf16 when we set it).
inline bool autocast_enabled(const torch::Device& device) {
#if MOECPT_TORCH_AT_LEAST(2, 4)
  return at::autocast::is_autocast_enabled(device.type());
#else
  return device.is_cpu() ? at::autocast::is_cpu_enabled() : at::autocast::is_enabled();
#endif
}

// Whether LibTorch's CPU bf16 matmuls have a fast kernel on this machine, as
// far as we can tell: 1.13 sends them to oneDNN only on x86 CPUs with AVX-512
// (BW, VL and DQ); elsewhere a scalar fallback runs them. Measured on the
// AVX2-only dev VM (python3-torch 1.13, one thread): 4–5 GFLOP/s in bf16 vs
// 100–118 in fp32, and a bf16-autocast training step 11× slower than fp32
// (docs/performance.md). True when unknown (not x86, no /proc/cpuinfo).
inline bool cpu_has_fast_bf16_matmul() {
#if defined(__x86_64__)
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("flags", 0) != 0) continue;
    std::istringstream words(line);
    std::string w;
    bool bw = false, vl = false, dq = false;
    while (words >> w) {
      bw = bw || w == "avx512bw";
      vl = vl || w == "avx512vl";
      dq = dq || w == "avx512dq";
    }
    return bw && vl && dq;
  }
#endif
  return true;
}

}  // namespace moecpt::compat
