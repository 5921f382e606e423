// The one place where LibTorch 1.13 (Debian) and 2.x (PyTorch wheels on GPU
// machines) differ for us, plus the runtime settings of the fast CPU path
// (BLAS threads, autocast queries, docs/performance.md). Everything else calls
// these wrappers.
#pragma once
#include <ATen/autocast_mode.h>
#include <dlfcn.h>
#include <torch/version.h>

#include <cmath>
#include <fstream>
#include <sstream>
#include <string>

#include "core/pch.h"

#define MOECPT_TORCH_AT_LEAST(major, minor) \
  (TORCH_VERSION_MAJOR > (major) || (TORCH_VERSION_MAJOR == (major) && TORCH_VERSION_MINOR >= (minor)))

namespace moecpt::compat {

// Causal scaled-dot-product attention on q,k,v of shape [B,H,T,Dh].
// 2.x: the fused kernel (flash / memory-efficient / math, chosen by PyTorch).
// 1.13: the same maths spelled out (softmax(QKᵀ/√Dh + causal mask) V).
inline torch::Tensor causal_attention(const torch::Tensor& q, const torch::Tensor& k,
                                      const torch::Tensor& v) {
#if MOECPT_TORCH_AT_LEAST(2, 0)
  return at::scaled_dot_product_attention(q, k, v, /*attn_mask=*/{}, /*dropout_p=*/0.0,
                                          /*is_causal=*/true);
#else
  const int64_t T = q.size(-2);
  auto scores = torch::matmul(q, k.transpose(-2, -1)) * (1.0 / std::sqrt(double(q.size(-1))));
  auto mask = torch::ones({T, T}, q.options().dtype(torch::kBool)).triu(1);
  scores = scores.masked_fill(mask, -std::numeric_limits<float>::infinity());
  return torch::matmul(torch::softmax(scores, -1), v);
#endif
}

// RMSNorm: x / sqrt(mean(x²) + eps) * weight, computed in fp32 for stability.
// 2.4+: ATen's rms_norm (a fused kernel on CUDA where the version has one;
// same formula, fp32 inside), cast back to x's dtype. Its fused kernel wants
// the weight in x's dtype (else ATen falls back to the composite ops), so a
// bf16 stream multiplies by the weight rounded to bf16, as bf16-parameter
// trainings do. 1.13: spelled out, fp32 weight.
inline torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
#if MOECPT_TORCH_AT_LEAST(2, 4)
  const auto w = weight.scalar_type() == x.scalar_type() ? weight : weight.to(x.scalar_type());
  return at::rms_norm(x, {x.size(-1)}, w, eps).to(x.scalar_type());
#else
  auto xf = x.to(torch::kFloat32);
  auto y = xf * torch::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps);
  return (y * weight.to(torch::kFloat32)).to(x.scalar_type());
#endif
}

// RAII: ops inside run in the dtype of their inputs even under autocast (bf16).
// The router uses it so its logits, softmax and top-k stay fp32 (SPEC §3).
class NoAutocast {
 public:
  NoAutocast() : guard_(c10::autocast_dispatch_keyset) {}

 private:
  c10::impl::ExcludeDispatchKeyGuard guard_;
};

// bf16 autocast for one forward pass on `device` (CPU or CUDA); restores the
// previous state on destruction. The routers opt out with NoAutocast.
class Autocast {
 public:
  explicit Autocast(const torch::Device& device) : type_(device.type()) {
#if MOECPT_TORCH_AT_LEAST(2, 4)
    prev_enabled_ = at::autocast::is_autocast_enabled(type_);
    prev_dtype_ = at::autocast::get_autocast_dtype(type_);
    at::autocast::set_autocast_enabled(type_, true);
    at::autocast::set_autocast_dtype(type_, at::kBFloat16);
#else
    if (type_ == c10::DeviceType::CPU) {
      prev_enabled_ = at::autocast::is_cpu_enabled();
      prev_dtype_ = at::autocast::get_autocast_cpu_dtype();
      at::autocast::set_cpu_enabled(true);
      at::autocast::set_autocast_cpu_dtype(at::kBFloat16);
    } else {
      prev_enabled_ = at::autocast::is_enabled();
      prev_dtype_ = at::autocast::get_autocast_gpu_dtype();
      at::autocast::set_enabled(true);
      at::autocast::set_autocast_gpu_dtype(at::kBFloat16);
    }
#endif
  }
  ~Autocast() {
#if MOECPT_TORCH_AT_LEAST(2, 4)
    at::autocast::set_autocast_enabled(type_, prev_enabled_);
    at::autocast::set_autocast_dtype(type_, prev_dtype_);
#else
    if (type_ == c10::DeviceType::CPU) {
      at::autocast::set_cpu_enabled(prev_enabled_);
      at::autocast::set_autocast_cpu_dtype(prev_dtype_);
    } else {
      at::autocast::set_enabled(prev_enabled_);
      at::autocast::set_autocast_gpu_dtype(prev_dtype_);
    }
#endif
    at::autocast::clear_cache();
  }
  Autocast(const Autocast&) = delete;
  Autocast& operator=(const Autocast&) = delete;

 private:
  c10::DeviceType type_;
  bool prev_enabled_ = false;
  at::ScalarType prev_dtype_ = at::kBFloat16;
};

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
