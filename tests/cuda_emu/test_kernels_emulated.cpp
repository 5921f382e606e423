// moecpt's CUDA kernels (src/model/cuda/kernels.cu) run on the CPU under the
// emulation of tests/cuda_emu/emu.h, against fp64 references written here
// from the formulas in model/cuda/kernels.h. The GPU tests (test_cuda_kernels.cpp)
// check the same kernels on a device when there is one; these run everywhere,
// CI included, so a wrong index, a missing barrier or a shuffle that not every
// lane reaches fails here first.
//
// Buffers end where a PROT_NONE page begins (Guarded): a kernel touching memory
// past its end faults instead of reading neighbours. They start filled with
// 0xff bytes (NaN in fp32 and bf16), so an element a kernel should have written
// and did not shows as NaN, and row padding that must stay untouched is checked.
#include <cuda_bf16.h>      // the stand-ins of tests/cuda_emu/include
#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_emu/emu.h"
#include "model/cuda/kernels.h"

namespace {

namespace mc = moecpt::cuda;

// ---- memory ----------------------------------------------------------------

class Guarded {
 public:
  explicit Guarded(size_t bytes) {
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    bytes_ = (std::max<size_t>(bytes, 1) + 15) / 16 * 16;
    span_ = (bytes_ + page - 1) / page * page + page;
    base_ = mmap(nullptr, span_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base_ == MAP_FAILED) throw std::runtime_error("Guarded: mmap failed");
    mprotect(static_cast<char*>(base_) + span_ - page, page, PROT_NONE);
    data_ = static_cast<char*>(base_) + span_ - page - bytes_;
    std::memset(data_, 0xff, bytes_);
  }
  ~Guarded() { munmap(base_, span_); }
  Guarded(const Guarded&) = delete;
  Guarded& operator=(const Guarded&) = delete;
  void* data() const { return data_; }

 private:
  void* base_ = nullptr;
  char* data_ = nullptr;
  size_t bytes_ = 0, span_ = 0;
};

template <typename T>
class Buf {
 public:
  explicit Buf(size_t n) : n_(n), mem_(n * sizeof(T)) {}
  T* data() { return static_cast<T*>(mem_.data()); }
  T& operator[](size_t i) { return data()[i]; }
  size_t size() const { return n_; }

 private:
  size_t n_;
  Guarded mem_;
};

// ---- element types ---------------------------------------------------------

using bf16 = __nv_bfloat16;

inline double to_d(float x) { return x; }
inline double to_d(bf16 x) { return __bfloat162float(x); }
template <typename T>
T from_f(float x);
template <>
float from_f<float>(float x) { return x; }
template <>
bf16 from_f<bf16>(float x) { return __float2bfloat16_rn(x); }
template <typename T>
constexpr mc::DType dtype_of() {
  return std::is_same_v<T, float> ? mc::DType::kFloat32 : mc::DType::kBFloat16;
}
// The rounding of one fp32 result to T, relative (fp32: allowance for expf/erff too).
template <typename T>
constexpr double rel_tol() {
  return std::is_same_v<T, float> ? 2e-6 : 1.0 / 256;
}
template <typename T>
const char* name_of() {
  return std::is_same_v<T, float> ? "fp32" : "bf16";
}

inline bool is_nan_bits(const void* p, size_t bytes) {
  const auto* b = static_cast<const unsigned char*>(p);
  return std::all_of(b, b + bytes, [](unsigned char c) { return c == 0xff; });
}

template <typename T>
void fill_normal(T* p, size_t n, std::mt19937& rng, float scale = 1.f) {
  std::normal_distribution<float> d(0.f, scale);
  for (size_t i = 0; i < n; ++i) p[i] = from_f<T>(d(rng));
}

// |got − ref| ≤ abs + rel · scale at every index (scale: the size of the terms
// that were summed, so a cancellation is judged against its inputs).
::testing::AssertionResult all_close(const std::vector<double>& got, const std::vector<double>& ref,
                                     const std::vector<double>& scale, double rel, double abs,
                                     const std::string& what) {
  if (got.size() != ref.size()) return ::testing::AssertionFailure() << what << ": sizes differ";
  for (size_t i = 0; i < got.size(); ++i) {
    const double tol = abs + rel * scale[i];
    if (!(std::fabs(got[i] - ref[i]) <= tol))
      return ::testing::AssertionFailure() << what << ": element " << i << " is " << got[i] << ", expected "
                                           << ref[i] << " (tolerance " << tol << ")";
  }
  return ::testing::AssertionSuccess();
}

// The kernel run twice: fibers in forward order, then in reverse order with
// eager warps (emu.h): a race shows as results that differ between the two.
template <typename F>
void in_both_orders(F&& run) {
  cuda_emu::set_order(cuda_emu::Order::kForward);
  run(cuda_emu::Order::kForward);
  cuda_emu::set_order(cuda_emu::Order::kReverse);
  cuda_emu::set_eager_warps(true);
  run(cuda_emu::Order::kReverse);
  cuda_emu::set_order(cuda_emu::Order::kForward);
  cuda_emu::set_eager_warps(false);
}

// ---- the emulator itself ----------------------------------------------------

// Thread t leaves its value in shared memory, reads its neighbour's after the
// barrier (when `barrier`), and every lane gets its warp's sum by shuffles.
void exchange_kernel(const float* in, float* next, float* warp_sum, bool barrier) {
  __shared__ float buf[256];
  const unsigned t = threadIdx.x, n = blockDim.x, base = blockIdx.x * n;
  buf[t] = in[base + t];
  if (barrier) __syncthreads();
  next[base + t] = buf[(t + 1) % n];
  float v = in[base + t];
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  warp_sum[base + t] = v;
}

TEST(CudaEmulator, BarriersAndShufflesExchangeValuesAsOnAGpu) {
  constexpr unsigned kGrid = 3, kBlock = 128, kN = kGrid * kBlock;
  std::vector<float> in(kN), next(kN), sum(kN);
  std::iota(in.begin(), in.end(), 1.f);
  const auto before = cuda_emu::counters();
  in_both_orders([&](cuda_emu::Order) {
    std::fill(next.begin(), next.end(), -1.f);
    ASSERT_EQ(cuda_emu::launch(kGrid, kBlock, [&] { exchange_kernel(in.data(), next.data(), sum.data(), true); }),
              0);
    for (unsigned i = 0; i < kN; ++i) {
      const unsigned b = i / kBlock, t = i % kBlock, w0 = b * kBlock + t / 32 * 32;
      ASSERT_EQ(next[i], in[b * kBlock + (t + 1) % kBlock]) << i;
      // Σ of 32 consecutive integers from in[w0] = w0 + 1
      ASSERT_EQ(sum[i], 32.f * float(w0 + 1) + 496.f) << i;
    }
  });
  const auto& after = cuda_emu::counters();
  EXPECT_EQ(after.launches - before.launches, 2);
  EXPECT_EQ(after.blocks - before.blocks, 2 * kGrid);
  EXPECT_EQ(after.block_barriers - before.block_barriers, 2 * kGrid);                 // one per block
  EXPECT_EQ(after.warp_shuffles - before.warp_shuffles, 2 * kGrid * (kBlock / 32) * 5);  // 5 per warp
}

TEST(CudaEmulator, AMissingBarrierShowsAsResultsThatDependOnTheOrder) {
  constexpr unsigned kBlock = 64;
  std::vector<float> in(kBlock), next_fwd(kBlock), next_rev(kBlock), sum(kBlock);
  std::iota(in.begin(), in.end(), 1000.f);  // values no earlier launch left in the shared buffer
  cuda_emu::set_order(cuda_emu::Order::kForward);
  ASSERT_EQ(cuda_emu::launch(1, kBlock, [&] { exchange_kernel(in.data(), next_fwd.data(), sum.data(), false); }), 0);
  std::iota(in.begin(), in.end(), 2000.f);
  cuda_emu::set_order(cuda_emu::Order::kReverse);
  ASSERT_EQ(cuda_emu::launch(1, kBlock, [&] { exchange_kernel(in.data(), next_rev.data(), sum.data(), false); }), 0);
  cuda_emu::set_order(cuda_emu::Order::kForward);
  // In reverse order thread t+1 has written before t reads; forward, t reads what the last launch left.
  EXPECT_EQ(next_rev[0], 2001.f);
  EXPECT_NE(next_fwd[0], 1001.f);
}

// Warp 0 resets x before its shuffle, warp 1 writes x after its own: without a
// barrier between, a GPU may run warp 1 ahead, so x may end 0 or 1.
void reset_race_kernel(float* out) {
  __shared__ float x;
  if (threadIdx.x == 0) x = 0.f;
  const float v = __shfl_xor_sync(0xffffffffu, 1.f, 1);
  if (threadIdx.x == 32) x = v;
  __syncthreads();
  if (threadIdx.x == 0) out[0] = x;
}

TEST(CudaEmulator, EagerWarpsRunAheadOfTheirBlockAcrossAShuffle) {
  float fwd = -1, rev = -1, eager = -1;
  ASSERT_EQ(cuda_emu::launch(1, 64, [&] { reset_race_kernel(&fwd); }), 0);
  cuda_emu::set_order(cuda_emu::Order::kReverse);
  ASSERT_EQ(cuda_emu::launch(1, 64, [&] { reset_race_kernel(&rev); }), 0);
  cuda_emu::set_eager_warps(true);
  ASSERT_EQ(cuda_emu::launch(1, 64, [&] { reset_race_kernel(&eager); }), 0);
  cuda_emu::set_eager_warps(false);
  cuda_emu::set_order(cuda_emu::Order::kForward);
  // every fiber reaches the shuffle before any warp goes on, in either order...
  EXPECT_EQ(fwd, 1.f);
  EXPECT_EQ(rev, 1.f);
  // ...unless warps are released as they complete: warp 1 (run first in reverse) writes before warp 0 resets
  EXPECT_EQ(eager, 0.f);
}

// __match_any_sync: each lane gets the mask of the lanes with its value.
void match_kernel(unsigned* out) {
  const unsigned lane = threadIdx.x % 32;
  out[threadIdx.x] = __match_any_sync(0xffffffffu, lane % 3 == 0 ? 7u : lane % 3);
}

TEST(CudaEmulator, MatchAnyGivesEachLaneItsPeers) {
  std::vector<unsigned> out(64);
  ASSERT_EQ(cuda_emu::launch(1, 64, [&] { match_kernel(out.data()); }), 0);
  unsigned want[3] = {0, 0, 0};
  for (unsigned l = 0; l < 32; ++l) want[l % 3] |= 1u << l;
  for (unsigned t = 0; t < 64; ++t) EXPECT_EQ(out[t], want[(t % 32) % 3]) << "thread " << t;
}

void divergent_barrier_kernel() {
  if (threadIdx.x < 64) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

void half_warp_shuffle_kernel(float* out) {
  if (threadIdx.x % 32 < 16) out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}

void shuffle_kernel(float* out) { out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, float(threadIdx.x), 1); }

template <typename F>
std::string launch_error(unsigned grid, unsigned block, F body) {
  try {
    cuda_emu::launch(grid, block, body);
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  return "";
}

TEST(CudaEmulator, ReportsDivergentBarriersShufflesAndBadLaunches) {
  std::vector<float> out(64);
  const auto barrier = launch_error(1, 128, [] { divergent_barrier_kernel(); });
  EXPECT_NE(barrier.find("threads wait at different __syncthreads: 64 on line"), std::string::npos) << barrier;
  const auto half = launch_error(1, 64, [&] { half_warp_shuffle_kernel(out.data()); });
  EXPECT_NE(half.find("only 16 of 32 lanes reach a full-mask shuffle"), std::string::npos) << half;
  EXPECT_NE(half.find("has returned"), std::string::npos) << half;
  const auto partial = launch_error(1, 48, [&] { shuffle_kernel(out.data()); });
  EXPECT_NE(partial.find("48 threads are not whole warps"), std::string::npos) << partial;
  // the emulator is usable after an error
  ASSERT_EQ(cuda_emu::launch(1, 64, [&] { shuffle_kernel(out.data()); }), 0);
  EXPECT_EQ(out[4], 5.f);
  EXPECT_EQ(out[5], 4.f);
  // launch configurations CUDA refuses: the error is the launch's, then cleared
  EXPECT_EQ(cuda_emu::launch(0, 32, [] {}), 9);
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidConfiguration);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  EXPECT_EQ(cuda_emu::launch(1, 1025, [] {}), 9);
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidConfiguration);
}

// ---- gated activation ------------------------------------------------------

double act_d(mc::Act a, double x) {
  return a == mc::Act::kGelu ? 0.5 * x * (1 + std::erf(x / std::sqrt(2.0))) : x / (1 + std::exp(-x));
}
double act_grad_d(mc::Act a, double x) {
  if (a == mc::Act::kGelu)
    return 0.5 * (1 + std::erf(x / std::sqrt(2.0))) + x * std::exp(-0.5 * x * x) / std::sqrt(2 * M_PI);
  const double s = 1 / (1 + std::exp(-x));
  return s * (1 + x * (1 - s));
}
// The sizes of the terms the kernel sums in fp32 for act and act' (1 + erf
// cancels for GeLU at x ≪ 0, 1 + x(1 − σ) for SiLU near x ≈ −1.28): the
// tolerance scale of those values.
double act_terms(mc::Act a, double x) {
  return a == mc::Act::kGelu ? 0.5 * std::fabs(x) * (1 + std::fabs(std::erf(x / std::sqrt(2.0))))
                             : std::fabs(act_d(a, x));
}
double act_grad_terms(mc::Act a, double x) {
  if (a == mc::Act::kGelu)
    return 0.5 * (1 + std::fabs(std::erf(x / std::sqrt(2.0)))) +
           std::fabs(x) * std::exp(-0.5 * x * x) / std::sqrt(2 * M_PI);
  const double s = 1 / (1 + std::exp(-x));
  return s * (1 + std::fabs(x) * (1 - s));
}

template <typename T>
void check_gated(mc::Act act, int64_t rows, int64_t H, int64_t pad) {
  SCOPED_TRACE(std::string(name_of<T>()) + (act == mc::Act::kGelu ? " gelu" : " silu") + " rows " +
               std::to_string(rows) + " H " + std::to_string(H) + " pad " + std::to_string(pad));
  std::mt19937 rng(uint32_t(rows * 131 + H));
  const int64_t ld13 = 2 * H + pad, ld = H + pad;
  Buf<T> h13{size_t(rows * ld13)}, da{size_t(rows * ld)}, a{size_t(rows * ld)}, dh13{size_t(rows * ld13)};
  fill_normal(h13.data(), h13.size(), rng, 2.f);
  fill_normal(da.data(), da.size(), rng);
  ASSERT_EQ(mc::gated_forward(dtype_of<T>(), act, h13.data(), ld13, a.data(), ld, rows, H, nullptr), 0);
  ASSERT_EQ(mc::gated_backward(dtype_of<T>(), act, h13.data(), ld13, da.data(), ld, dh13.data(), ld13, rows, H,
                               nullptr),
            0);
  std::vector<double> got, ref, scale;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < H; ++j) {
      const double x = to_d(h13[r * ld13 + j]), u = to_d(h13[r * ld13 + H + j]), d = to_d(da[r * ld + j]);
      const double vals[3] = {act_d(act, x) * u, d * u * act_grad_d(act, x), d * act_d(act, x)};
      const double outs[3] = {to_d(a[r * ld + j]), to_d(dh13[r * ld13 + j]), to_d(dh13[r * ld13 + H + j])};
      const double sizes[3] = {act_terms(act, x) * std::fabs(u), std::fabs(d * u) * act_grad_terms(act, x),
                               std::fabs(d) * act_terms(act, x)};
      for (int k = 0; k < 3; ++k) got.push_back(outs[k]), ref.push_back(vals[k]), scale.push_back(sizes[k]);
    }
  EXPECT_TRUE(all_close(got, ref, scale, rel_tol<T>(), 1e-30, "a, dh1, dh3"));
  for (int64_t r = 0; pad > 0 && r < rows; ++r) {  // row padding untouched
    EXPECT_TRUE(is_nan_bits(&a[r * ld + H], size_t(pad) * sizeof(T))) << "row " << r;
    EXPECT_TRUE(is_nan_bits(&dh13[r * ld13 + 2 * H], size_t(pad) * sizeof(T))) << "row " << r;
  }
}

TEST(CudaKernelsEmulated, GatedActivationMatchesAnFp64Reference) {
  for (auto act : {mc::Act::kGelu, mc::Act::kSilu}) {
    check_gated<float>(act, 37, 48, 8);     // 16-byte vectors
    check_gated<float>(act, 5, 7, 1);       // scalar: odd width
    check_gated<bf16>(act, 37, 48, 8);      // vectors of 8
    check_gated<bf16>(act, 9, 12, 0);       // scalar: 12 is not a multiple of 8
  }
}

// ---- rotary pairs ----------------------------------------------------------

// x stored head-major ([B, Hd, T, 2n], as the attention's projections), out
// seq-major ([B, T, Hd, 2n]): the two layouts RotaryQKV uses.
template <typename T>
void check_rotate(int64_t B, int64_t Tn, int64_t Hd, int64_t n, int sign) {
  SCOPED_TRACE(std::string(name_of<T>()) + " n " + std::to_string(n) + " sign " + std::to_string(sign));
  std::mt19937 rng(uint32_t(n * 7 + sign + 3));
  const int64_t W = 2 * n, N = B * Tn * Hd * W;
  Buf<T> x{size_t(N)}, out{size_t(N)}, c{size_t(Tn * n)}, s{size_t(Tn * n)};
  fill_normal(x.data(), x.size(), rng);
  for (int64_t t = 0; t < Tn; ++t)
    for (int64_t j = 0; j < n; ++j) {
      const float th = float(t) * std::pow(10000.f, -float(j) / float(n));
      c[t * n + j] = from_f<T>(std::cos(th));
      s[t * n + j] = from_f<T>(std::sin(th));
    }
  const int64_t xs[3] = {Hd * Tn * W, W, Tn * W};  // (b, t, h) strides of [B, Hd, T, 2n]
  const int64_t os[3] = {Tn * Hd * W, Hd * W, W};  // of [B, T, Hd, 2n]
  ASSERT_EQ(mc::rotate_pairs(dtype_of<T>(), x.data(), xs, out.data(), os, c.data(), s.data(), B, Tn, Hd, n, sign,
                             nullptr),
            0);
  std::vector<double> got, ref, scale;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < Tn; ++t)
      for (int64_t h = 0; h < Hd; ++h)
        for (int64_t j = 0; j < n; ++j) {
          const int64_t xi = b * xs[0] + t * xs[1] + h * xs[2] + j, oi = b * os[0] + t * os[1] + h * os[2] + j;
          const double x1 = to_d(x[xi]), x2 = to_d(x[xi + n]), cc = to_d(c[t * n + j]), ss = sign * to_d(s[t * n + j]);
          got.push_back(to_d(out[oi])), ref.push_back(x1 * cc - x2 * ss);
          scale.push_back(std::fabs(x1 * cc) + std::fabs(x2 * ss));
          got.push_back(to_d(out[oi + n])), ref.push_back(x2 * cc + x1 * ss);
          scale.push_back(std::fabs(x2 * cc) + std::fabs(x1 * ss));
        }
  EXPECT_TRUE(all_close(got, ref, scale, rel_tol<T>(), 1e-30, "rotated pairs"));
}

TEST(CudaKernelsEmulated, RotatePairsMatchesAnFp64ReferenceAcrossLayouts) {
  for (int sign : {1, -1}) {
    check_rotate<float>(2, 5, 3, 8, sign);  // vectors of 4
    check_rotate<float>(2, 5, 3, 6, sign);  // scalar
    check_rotate<bf16>(2, 5, 3, 16, sign);  // vectors of 8
    check_rotate<bf16>(1, 4, 2, 12, sign);  // scalar
  }
}

// ---- cross-entropy rows ----------------------------------------------------

void check_cross_entropy(int64_t rows, int64_t V, int64_t ld, bool with_grad) {
  SCOPED_TRACE("V " + std::to_string(V) + " ld " + std::to_string(ld) + (with_grad ? " with grad" : ""));
  std::mt19937 rng(uint32_t(V + ld));
  Buf<float> logits{size_t(rows * ld)}, loss{size_t(rows)};
  Buf<int64_t> targets{size_t(rows)};
  Buf<bf16> grad{size_t(rows * ld)};
  fill_normal(logits.data(), logits.size(), rng, 3.f);
  for (int64_t j = 0; j < V / 2; ++j) logits[2 * ld + j] = -INFINITY;  // a masked half row
  std::uniform_int_distribution<int64_t> pick(0, V - 1);
  for (int64_t r = 0; r < rows; ++r) targets[r] = pick(rng);
  targets[2] = V - 1;  // inside the unmasked half
  targets[3] = -1;     // out of range: loss NaN
  targets[4] = V;
  std::vector<std::vector<float>> losses, grads;
  in_both_orders([&](cuda_emu::Order) {
    ASSERT_EQ(mc::cross_entropy_rows(logits.data(), ld, targets.data(), rows, V, with_grad ? grad.data() : nullptr,
                                     ld, loss.data(), nullptr),
              0);
    losses.emplace_back(loss.data(), loss.data() + rows);
    std::vector<float> g;
    for (size_t i = 0; i < grad.size(); ++i) g.push_back(__bfloat162float(grad[i]));
    grads.push_back(g);
  });
  ASSERT_EQ(0, std::memcmp(losses[0].data(), losses[1].data(), size_t(rows) * sizeof(float)));
  ASSERT_EQ(0, std::memcmp(grads[0].data(), grads[1].data(), grads[0].size() * sizeof(float)));
  std::vector<double> got, ref, scale;
  for (int64_t r = 0; r < rows; ++r) {
    double m = -INFINITY, sum = 0;
    for (int64_t j = 0; j < V; ++j) m = std::max(m, double(logits[r * ld + j]));
    for (int64_t j = 0; j < V; ++j) sum += std::exp(double(logits[r * ld + j]) - m);
    const double lse = m + std::log(sum);
    const int64_t t = targets[r];
    if (t < 0 || t >= V) {
      EXPECT_TRUE(std::isnan(loss[r])) << "row " << r << " target " << t;
    } else {
      got.push_back(loss[r]), ref.push_back(lse - logits[r * ld + t]), scale.push_back(std::fabs(lse) + 1);
    }
    if (!with_grad) continue;
    for (int64_t j = 0; j < V; ++j) {
      const double p = std::exp(double(logits[r * ld + j]) - lse);
      const double want = (j == t) ? std::expm1(double(logits[r * ld + j]) - lse) : p;
      got.push_back(__bfloat162float(grad[r * ld + j])), ref.push_back(want), scale.push_back(std::fabs(want));
    }
    EXPECT_TRUE(is_nan_bits(&grad[r * ld + V], size_t(ld - V) * sizeof(bf16))) << "row " << r;
  }
  // loss: fp32 sums over V; gradient: one bf16 rounding of fp32 values
  EXPECT_TRUE(all_close(got, ref, scale, 1.0 / 256, 1e-6, "loss and gradient rows"));
  if (!with_grad) {
    EXPECT_TRUE(is_nan_bits(grad.data(), grad.size() * sizeof(bf16)));
  }
}

TEST(CudaKernelsEmulated, CrossEntropyRowsMatchAnFp64Reference) {
  check_cross_entropy(6, 1000, 1004, true);   // float4 loads, bf16 pairs
  check_cross_entropy(6, 1001, 1001, true);   // scalar
  check_cross_entropy(5, 1000, 1000, false);  // loss only
}

TEST(CudaKernelsEmulated, CrossEntropyLossIsAccurateToFp32) {
  // the loss alone, at fp32's tolerance (the test above allows bf16's for the gradient)
  constexpr int64_t rows = 3, V = 4096;
  std::mt19937 rng(7);
  Buf<float> logits{size_t(rows * V)}, loss{size_t(rows)};
  Buf<int64_t> targets{size_t(rows)};
  fill_normal(logits.data(), logits.size(), rng, 4.f);
  for (int64_t r = 0; r < rows; ++r) targets[r] = r * 1000 + 17;
  ASSERT_EQ(mc::cross_entropy_rows(logits.data(), V, targets.data(), rows, V, nullptr, 0, loss.data(), nullptr), 0);
  for (int64_t r = 0; r < rows; ++r) {
    double m = -INFINITY, sum = 0;
    for (int64_t j = 0; j < V; ++j) m = std::max(m, double(logits[r * V + j]));
    for (int64_t j = 0; j < V; ++j) sum += std::exp(double(logits[r * V + j]) - m);
    const double want = m + std::log(sum) - logits[r * V + targets[r]];
    EXPECT_NEAR(loss[r], want, 1e-5 * (std::fabs(want) + 1)) << "row " << r;
  }
}

// ---- MoE slot gathers --------------------------------------------------------

template <typename T>
void check_slots(int64_t Tn, int64_t K, int64_t D, int64_t pad, bool weighted) {
  SCOPED_TRACE(std::string(name_of<T>()) + " T " + std::to_string(Tn) + " K " + std::to_string(K) + " D " +
               std::to_string(D) + (weighted ? " weighted" : ""));
  std::mt19937 rng(uint32_t(Tn * K * D + pad));
  const int64_t S = Tn * K, ld = D + pad;
  Buf<T> src{size_t(S * ld)}, out{size_t(Tn * ld)}, g{size_t(Tn * ld)}, dy{size_t(S * ld)};
  Buf<int64_t> idx{size_t(S)};
  Buf<float> w{size_t(S)}, dw{size_t(S)};
  fill_normal(src.data(), src.size(), rng);
  fill_normal(g.data(), g.size(), rng);
  std::vector<int64_t> perm(static_cast<size_t>(S));
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  std::copy(perm.begin(), perm.end(), idx.data());
  std::uniform_real_distribution<float> gate(0.05f, 1.f);
  for (int64_t s = 0; s < S; ++s) w[s] = gate(rng);
  const float* wp = weighted ? w.data() : nullptr;
  ASSERT_EQ(mc::gather_sum_rows(dtype_of<T>(), src.data(), ld, idx.data(), wp, Tn, K, D, out.data(), ld, nullptr), 0);
  std::vector<double> got, ref, scale;
  for (int64_t t = 0; t < Tn; ++t)
    for (int64_t d = 0; d < D; ++d) {
      double v = 0, mag = 0;
      for (int64_t q = 0; q < K; ++q) {
        const double term = (weighted ? double(w[t * K + q]) : 1.0) * to_d(src[idx[t * K + q] * ld + d]);
        v += term, mag += std::fabs(term);
      }
      got.push_back(to_d(out[t * ld + d])), ref.push_back(v), scale.push_back(mag);
    }
  EXPECT_TRUE(all_close(got, ref, scale, rel_tol<T>(), 1e-30, "gathered sums"));

  if (!weighted) return;  // the combine's backward needs the gates
  std::vector<std::vector<float>> dws;
  in_both_orders([&](cuda_emu::Order) {
    ASSERT_EQ(mc::combine_backward(dtype_of<T>(), g.data(), ld, src.data(), ld, idx.data(), w.data(), Tn, K, D,
                                   dy.data(), ld, dw.data(), nullptr),
              0);
    dws.emplace_back(dw.data(), dw.data() + S);
  });
  ASSERT_EQ(0, std::memcmp(dws[0].data(), dws[1].data(), size_t(S) * sizeof(float)));
  got.clear(), ref.clear(), scale.clear();
  std::vector<double> got_dw, ref_dw, scale_dw;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t t = s / K, r = idx[s];
    double dot = 0, mag = 0;
    for (int64_t d = 0; d < D; ++d) {
      const double gd = to_d(g[t * ld + d]), v = double(w[s]) * gd;
      got.push_back(to_d(dy[r * ld + d])), ref.push_back(v), scale.push_back(std::fabs(v));
      dot += gd * to_d(src[r * ld + d]), mag += std::fabs(gd * to_d(src[r * ld + d]));
    }
    got_dw.push_back(dw[s]), ref_dw.push_back(dot), scale_dw.push_back(mag);
    if (pad > 0) {
      EXPECT_TRUE(is_nan_bits(&dy[r * ld + D], size_t(pad) * sizeof(T))) << "row " << r;
    }
  }
  EXPECT_TRUE(all_close(got, ref, scale, rel_tol<T>(), 1e-30, "dy"));
  EXPECT_TRUE(all_close(got_dw, ref_dw, scale_dw, 1e-5, 1e-30, "dw (fp32 sums)"));
}

TEST(CudaKernelsEmulated, MoESlotGathersMatchAnFp64Reference) {
  for (int64_t K : {1, 2, 4})
    for (bool weighted : {true, false}) {
      check_slots<float>(13, K, 200, 4, weighted);  // vectors of 4, rows longer than a warp's 128
      check_slots<float>(13, K, 30, 1, weighted);   // scalar, shorter than a warp
      check_slots<bf16>(13, K, 264, 8, weighted);   // vectors of 8, two passes of a warp
      check_slots<bf16>(7, K, 20, 0, weighted);     // scalar, one pass
    }
}

// ---- RMSNorm ---------------------------------------------------------------

// add: the fused residual add in front (rms_norm_forward/backward with a and dres): the
// rows normalised are h = x + a (A: a's type), which must equal ATen's add
// bit for bit, and dres joins dx. Y: the type of y and of its gradient dy
// (bf16 for a bf16 matmul's input).
template <typename T, typename A = T, typename Y = T>
void check_rms_norm(int64_t rows, int64_t D, int64_t pad, bool add = false) {
  SCOPED_TRACE(std::string(name_of<T>()) + " rows " + std::to_string(rows) + " D " + std::to_string(D) + " pad " +
               std::to_string(pad) + (add ? std::string(" + a ") + name_of<A>() : std::string()) + " y " +
               name_of<Y>());
  std::mt19937 rng(uint32_t(rows * 31 + D + (add ? 7 : 0)));
  const int64_t ld = D + pad, partials = mc::rms_norm_backward_partials(rows);
  // a, h and dres with a row stride of their own (a wider padding; one more
  // element where there is none, which keeps those cases scalar), so a kernel
  // that mixes up the strides writes or reads the wrong elements
  const int64_t ld2 = pad > 0 ? D + 2 * pad : D + 1, pad2 = ld2 - D;
  const size_t n_add = add ? size_t(rows * ld2) : 1;
  const float eps = 1e-5f;
  Buf<T> x{size_t(rows * ld)}, dx{size_t(rows * ld)};
  Buf<Y> y{size_t(rows * ld)}, dy{size_t(rows * ld)};
  Buf<T> h{n_add}, dres{n_add};
  Buf<A> a{n_add};
  Buf<float> w{size_t(D)}, rstd{size_t(std::max<int64_t>(rows, 1))}, dw_partial{size_t(partials * D)};
  fill_normal(x.data(), x.size(), rng, 2.f);
  fill_normal(dy.data(), dy.size(), rng);
  if (add) fill_normal(a.data(), a.size(), rng), fill_normal(dres.data(), dres.size(), rng);
  std::normal_distribution<float> around_one(1.f, 0.3f);
  for (int64_t j = 0; j < D; ++j) w[j] = around_one(rng);
  if (add) {
    ASSERT_EQ(mc::rms_norm_forward(dtype_of<T>(), x.data(), ld, dtype_of<A>(), a.data(), ld2, w.data(), rows, D,
                                       eps, h.data(), ld2, dtype_of<Y>(), y.data(), ld, rstd.data(), nullptr),
              0);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < D; ++j) {
        const T want = from_f<T>(float(to_d(x[r * ld + j])) + float(to_d(a[r * ld2 + j])));
        ASSERT_EQ(0, std::memcmp(&want, &h[r * ld2 + j], sizeof(T))) << "h at row " << r << ", column " << j;
      }
      EXPECT_TRUE(is_nan_bits(&h[r * ld2 + D], size_t(pad2) * sizeof(T))) << "row " << r;
    }
  } else {
    ASSERT_EQ(mc::rms_norm_forward(dtype_of<T>(), x.data(), ld, dtype_of<T>(), nullptr, 0, w.data(), rows, D, eps,
                                       nullptr, 0, dtype_of<Y>(), y.data(), ld, rstd.data(), nullptr),
              0);
  }
  auto& n = add ? h : x;  // the rows normalised, row stride ldn
  const int64_t ldn = add ? ld2 : ld;
  std::vector<std::vector<T>> dxs;
  std::vector<std::vector<float>> dws;
  in_both_orders([&](cuda_emu::Order) {
    ASSERT_EQ(mc::rms_norm_backward(dtype_of<T>(), n.data(), ldn, w.data(), rstd.data(), dtype_of<Y>(), dy.data(), ld,
                                        add ? dres.data() : nullptr, ld2, rows, D, dx.data(), ld, dw_partial.data(),
                                        nullptr),
              0);
    dxs.emplace_back(dx.data(), dx.data() + dx.size());
    dws.emplace_back(dw_partial.data(), dw_partial.data() + dw_partial.size());
  });
  ASSERT_EQ(0, std::memcmp(dxs[0].data(), dxs[1].data(), dxs[0].size() * sizeof(T)));
  ASSERT_EQ(0, std::memcmp(dws[0].data(), dws[1].data(), dws[0].size() * sizeof(float)));

  std::vector<double> gy, ry, sy, grs, rrs, srs, gdx, rdx, sdx, gdw, rdw, sdw;
  std::vector<double> dw_ref(size_t(D), 0.0), dw_mag(size_t(D), 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int64_t j = 0; j < D; ++j) ss += to_d(n[r * ldn + j]) * to_d(n[r * ldn + j]);
    const double rs = 1 / std::sqrt(ss / double(D) + eps);
    grs.push_back(rstd[r]), rrs.push_back(rs), srs.push_back(rs);
    double dot = 0, dot_mag = 0;
    for (int64_t j = 0; j < D; ++j) {
      const double xj = to_d(n[r * ldn + j]), gj = to_d(dy[r * ld + j]), wj = w[j];
      gy.push_back(to_d(y[r * ld + j])), ry.push_back(xj * rs * wj), sy.push_back(std::fabs(xj * rs * wj));
      dot += gj * wj * xj, dot_mag += std::fabs(gj * wj * xj);
      dw_ref[size_t(j)] += gj * xj * rs, dw_mag[size_t(j)] += std::fabs(gj * xj * rs);
    }
    const double c = rs * rs * rs / double(D);
    for (int64_t j = 0; j < D; ++j) {
      const double xj = to_d(n[r * ldn + j]), gj = to_d(dy[r * ld + j]), wj = w[j];
      const double rj = add ? to_d(dres[r * ld2 + j]) : 0.0;
      gdx.push_back(to_d(dx[r * ld + j])), rdx.push_back(rs * wj * gj - c * dot * xj + rj);
      sdx.push_back(std::fabs(rs * wj * gj) + c * dot_mag * std::fabs(xj) + std::fabs(rj));
    }
    if (pad > 0) {
      EXPECT_TRUE(is_nan_bits(&y[r * ld + D], size_t(pad) * sizeof(Y))) << "row " << r;
      EXPECT_TRUE(is_nan_bits(&dx[r * ld + D], size_t(pad) * sizeof(T))) << "row " << r;
    }
  }
  for (int64_t j = 0; j < D; ++j) {
    double sum = 0;
    for (int64_t p = 0; p < partials; ++p) sum += dw_partial[size_t(p * D + j)];
    gdw.push_back(sum), rdw.push_back(dw_ref[size_t(j)]), sdw.push_back(dw_mag[size_t(j)]);
  }
  EXPECT_TRUE(all_close(grs, rrs, srs, 1e-6, 0, "rstd"));
  EXPECT_TRUE(all_close(gy, ry, sy, rel_tol<Y>(), 1e-30, "y"));
  EXPECT_TRUE(all_close(gdx, rdx, sdx, rel_tol<T>() + 1e-6, 1e-30, "dx"));
  EXPECT_TRUE(all_close(gdw, rdw, sdw, 1e-5, 1e-30, "dw (fp32 sums)"));
}

TEST(CudaKernelsEmulated, RmsNormMatchesAnFp64Reference) {
  check_rms_norm<float>(37, 128, 4);   // vectors of 4, one pass of a warp
  check_rms_norm<float>(37, 130, 0);   // scalar
  check_rms_norm<float>(9, 2048, 0);   // the widest, 16 vectors per lane
  check_rms_norm<bf16>(37, 128, 8);    // vectors of 8
  check_rms_norm<bf16>(20, 1500, 0);   // scalar, the 2048-wide variant
  check_rms_norm<float>(100, 64, 0);   // more rows than partial sums: several rows per warp
}

TEST(CudaKernelsEmulated, ResidualAddWithRmsNormMatchesAnFp64Reference) {
  check_rms_norm<float, float>(37, 128, 4, true);  // an fp32 stream without autocast, vectors of 4
  check_rms_norm<float, bf16>(37, 128, 4, true);   // fp32 stream + a bf16 sublayer output (autocast)
  check_rms_norm<float, bf16>(37, 130, 0, true);   // scalar
  check_rms_norm<bf16, bf16>(37, 128, 8, true);    // the bf16 residual stream, vectors of 8
  check_rms_norm<bf16, bf16>(20, 1500, 0, true);   // scalar, the 2048-wide variant
  check_rms_norm<float, float>(100, 64, 0, true);  // several rows per warp
  check_rms_norm<float, bf16>(9, 2048, 0, true);   // the widest
  // y (and its gradient) in bf16 from an fp32 stream, with and without the add
  check_rms_norm<float, bf16, bf16>(37, 128, 4, true);
  check_rms_norm<float, float, bf16>(37, 130, 0, true);
  check_rms_norm<float, float, bf16>(37, 128, 4);
  check_rms_norm<float, float, bf16>(9, 2048, 0);
  // fp32 a with a bf16 stream is refused (ATen's add would give fp32 h)
  Buf<float> f{8};
  EXPECT_EQ(mc::rms_norm_forward(mc::DType::kBFloat16, f.data(), 8, mc::DType::kFloat32, f.data(), 8, f.data(), 1,
                                     8, 1e-5f, f.data(), 8, mc::DType::kBFloat16, f.data(), 8, f.data(), nullptr),
            int(cudaErrorInvalidValue));
  // and so are fp32 y and dy with a bf16 stream
  EXPECT_EQ(mc::rms_norm_forward(mc::DType::kBFloat16, f.data(), 8, mc::DType::kBFloat16, nullptr, 0, f.data(), 1,
                                     8, 1e-5f, nullptr, 0, mc::DType::kFloat32, f.data(), 8, f.data(), nullptr),
            int(cudaErrorInvalidValue));
  EXPECT_EQ(mc::rms_norm_backward(mc::DType::kBFloat16, f.data(), 8, f.data(), f.data(), mc::DType::kFloat32,
                                      f.data(), 8, nullptr, 0, 1, 8, f.data(), 8, f.data(), nullptr),
            int(cudaErrorInvalidValue));
}

TEST(CudaKernelsEmulated, RmsNormBackwardRefusesRowsWiderThanItsRegisters) {
  std::vector<float> d(4);
  EXPECT_EQ(mc::rms_norm_backward(mc::DType::kFloat32, d.data(), mc::kRmsNormMaxD + 1, d.data(), d.data(),
                                  mc::DType::kFloat32, d.data(), mc::kRmsNormMaxD + 1, nullptr, 0, 1,
                                  mc::kRmsNormMaxD + 1, d.data(), mc::kRmsNormMaxD + 1, d.data(), nullptr),
            int(cudaErrorInvalidValue));
  // no rows: the weight gradient's one partial row is zeros
  Buf<float> w{8}, partial{8};
  for (int j = 0; j < 8; ++j) w[size_t(j)] = 1.f;
  ASSERT_EQ(mc::rms_norm_backward_partials(0), 1);
  ASSERT_EQ(mc::rms_norm_backward(mc::DType::kFloat32, w.data(), 8, w.data(), w.data(), mc::DType::kFloat32, w.data(), 8,
                                  nullptr, 0, 0, 8, w.data(), 8, partial.data(), nullptr),
            0);
  for (int j = 0; j < 8; ++j) EXPECT_EQ(partial[size_t(j)], 0.f);
}

// ---- MoE slot order ----------------------------------------------------------

// The slot order against std::stable_sort of the ids (what ATen's stable sort
// gives): order, inverse, token and counts, bit for bit. `skew`: most slots
// on expert 0 (groups across whole warps and tiles).
void check_slot_sort(int64_t S, int64_t E, int64_t K, bool skew) {
  SCOPED_TRACE("S " + std::to_string(S) + " E " + std::to_string(E) + " K " + std::to_string(K) +
               (skew ? " skewed" : ""));
  std::mt19937 rng(uint32_t(S * 7 + E));
  std::uniform_int_distribution<int64_t> any(0, E - 1);
  std::bernoulli_distribution to_zero(0.8);
  Buf<int64_t> ids{size_t(std::max<int64_t>(S, 1))}, order{size_t(std::max<int64_t>(S, 1))},
      inverse{size_t(std::max<int64_t>(S, 1))}, token{size_t(std::max<int64_t>(S, 1))}, counts{size_t(E)};
  Buf<int> scratch{size_t(mc::slot_sort_chunks(S) * E)};
  for (int64_t s = 0; s < S; ++s) ids[size_t(s)] = skew && to_zero(rng) ? 0 : any(rng);
  std::vector<int64_t> want(static_cast<size_t>(S));
  std::iota(want.begin(), want.end(), 0);
  std::stable_sort(want.begin(), want.end(), [&](int64_t a, int64_t b) { return ids[size_t(a)] < ids[size_t(b)]; });
  std::vector<std::vector<int64_t>> runs;
  in_both_orders([&](cuda_emu::Order) {
    ASSERT_EQ(mc::slot_sort(ids.data(), S, E, K, scratch.data(), order.data(), inverse.data(), token.data(),
                            counts.data(), nullptr),
              0);
    runs.emplace_back(order.data(), order.data() + S);
  });
  ASSERT_EQ(runs[0], runs[1]) << "the fiber order changed the result";
  std::vector<int64_t> want_counts(static_cast<size_t>(E), 0);
  for (int64_t s = 0; s < S; ++s) ++want_counts[size_t(ids[size_t(s)])];
  for (int64_t p = 0; p < S; ++p) {
    ASSERT_EQ(order[size_t(p)], want[size_t(p)]) << "position " << p;
    ASSERT_EQ(inverse[size_t(want[size_t(p)])], p) << "slot " << want[size_t(p)];
    ASSERT_EQ(token[size_t(p)], want[size_t(p)] / K) << "position " << p;
  }
  for (int64_t e = 0; e < E; ++e) EXPECT_EQ(counts[size_t(e)], want_counts[size_t(e)]) << "expert " << e;
  // the counts alone
  Buf<int64_t> counts2{size_t(E)};
  ASSERT_EQ(mc::expert_counts(ids.data(), S, E, scratch.data(), counts2.data(), nullptr), 0);
  for (int64_t e = 0; e < E; ++e) EXPECT_EQ(counts2[size_t(e)], want_counts[size_t(e)]) << "expert " << e;
}

TEST(CudaKernelsEmulated, SlotSortIsAStableSortByExpert) {
  check_slot_sort(2 * 2048 + 37, 31, 3, false);  // two full chunks and a part: a partial tile and warp
  check_slot_sort(2 * 2048 + 37, 31, 3, true);
  check_slot_sort(3000, 256, 2, false);          // the widest: one expert per scan thread
  check_slot_sort(700, 1, 1, false);             // one expert: the identity
  check_slot_sort(5, 8, 1, false);               // less than a warp
  check_slot_sort(0, 4, 1, false);               // no slots: zero counts
  Buf<int64_t> x{4};
  Buf<int> scratch{4};
  EXPECT_EQ(mc::slot_sort(x.data(), 4, mc::kSlotSortMaxE + 1, 1, scratch.data(), x.data(), x.data(), x.data(),
                          nullptr, nullptr),
            int(cudaErrorInvalidValue));
}

// ---- Sinkhorn --------------------------------------------------------------

struct SinkhornRef {
  std::vector<double> d0, d1;
  std::vector<double> errs;  // err after each iteration
};

// The iteration of model/cuda/kernels.h in fp64.
SinkhornRef sinkhorn_ref(const std::vector<float>& C, int64_t T, int64_t E, double tol, int64_t max_iters,
                         double eps) {
  SinkhornRef r{std::vector<double>(size_t(T)), std::vector<double>(size_t(E), 1.0), {}};
  for (int64_t it = 0; it < max_iters; ++it) {
    std::vector<double> col(size_t(E), 0.0);
    for (int64_t t = 0; t < T; ++t) {
      double s = 0;
      for (int64_t e = 0; e < E; ++e) s += C[size_t(t * E + e)] * r.d1[size_t(e)];
      r.d0[size_t(t)] = (1.0 / double(T)) / (s + eps);
      for (int64_t e = 0; e < E; ++e) col[size_t(e)] += C[size_t(t * E + e)] * r.d0[size_t(t)];
    }
    double err = 0;
    for (int64_t e = 0; e < E; ++e) {
      const double d1 = (1.0 / double(E)) / (col[size_t(e)] + eps);
      err += std::fabs(d1 - r.d1[size_t(e)]);
      r.d1[size_t(e)] = d1;
    }
    r.errs.push_back(err / double(E));
    if (r.errs.back() < tol) break;
  }
  return r;
}

struct SinkhornOut {
  std::vector<float> d0, d1, stats;
};

SinkhornOut run_sinkhorn(const std::vector<float>& C, int64_t T, int64_t E, float tol, int64_t max_iters) {
  Buf<float> Ct{size_t(T * E)}, d0{size_t(T)}, d1{size_t(E)}, stats(2);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t e = 0; e < E; ++e) Ct[size_t(e * T + t)] = C[size_t(t * E + e)];
  const int rc = mc::sinkhorn(Ct.data(), T, E, tol, max_iters, 1e-8f, d0.data(), d1.data(), stats.data(), nullptr);
  if (rc != 0) throw std::runtime_error("sinkhorn returned " + std::to_string(rc));
  return {{d0.data(), d0.data() + T}, {d1.data(), d1.data() + E}, {stats[0], stats[1]}};
}

std::vector<float> router_scores(int64_t T, int64_t E, uint32_t seed) {
  // C = exp(z − rowmax z), z with an expert-dependent offset: unbalanced columns to correct
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> C(static_cast<size_t>(T * E));
  for (int64_t t = 0; t < T; ++t) {
    std::vector<float> z(static_cast<size_t>(E));
    for (int64_t e = 0; e < E; ++e) z[size_t(e)] = nd(rng) + 1.5f * float(e % 5) / 4.f;
    const float m = *std::max_element(z.begin(), z.end());
    for (int64_t e = 0; e < E; ++e) C[size_t(t * E + e)] = std::exp(z[size_t(e)] - m);
  }
  return C;
}

void expect_sinkhorn_matches(const SinkhornOut& k, const SinkhornRef& ref, int64_t T, int64_t E) {
  std::vector<double> got0(k.d0.begin(), k.d0.end()), got1(k.d1.begin(), k.d1.end());
  std::vector<double> s0(static_cast<size_t>(T)), s1(static_cast<size_t>(E));
  std::transform(ref.d0.begin(), ref.d0.end(), s0.begin(), [](double v) { return std::fabs(v); });
  std::transform(ref.d1.begin(), ref.d1.end(), s1.begin(), [](double v) { return std::fabs(v); });
  EXPECT_TRUE(all_close(got0, ref.d0, s0, 1e-4, 0, "d0"));
  EXPECT_TRUE(all_close(got1, ref.d1, s1, 1e-4, 0, "d1"));
  EXPECT_EQ(k.stats[0], float(ref.errs.size()));
  // err is a difference of fp32 values of d1: allow fp32's resolution of d1 besides 0.1 %
  const double d1_mean = std::accumulate(ref.d1.begin(), ref.d1.end(), 0.0) / double(E);
  EXPECT_NEAR(k.stats[1], ref.errs.back(), 1e-3 * ref.errs.back() + 1e-6 * d1_mean);
}

TEST(CudaKernelsEmulated, SinkhornMatchesAnFp64ReferenceForEveryWidth) {
  // E ≤ 32: 512 threads; 32 < E ≤ 64: 256 threads. T below and above one row per thread.
  const std::pair<int64_t, int64_t> shapes[] = {{700, 31}, {100, 8}, {300, 40}, {600, 64}, {50, 1}};
  for (auto [T, E] : shapes) {
    SCOPED_TRACE("T " + std::to_string(T) + " E " + std::to_string(E));
    const auto C = router_scores(T, E, uint32_t(T + E));
    const auto ref = sinkhorn_ref(C, T, E, 0.0, 3, 1e-8);  // tol 0: exactly 3 iterations
    std::vector<SinkhornOut> outs;
    in_both_orders([&](cuda_emu::Order) { outs.push_back(run_sinkhorn(C, T, E, 0.f, 3)); });
    ASSERT_EQ(outs[0].d0, outs[1].d0);
    ASSERT_EQ(outs[0].d1, outs[1].d1);
    expect_sinkhorn_matches(outs[0], ref, T, E);
  }
}

TEST(CudaKernelsEmulated, SinkhornStopsWhereTheReferenceStops) {
  constexpr int64_t T = 257, E = 16;
  constexpr double tol = 1e-4;
  const auto C = router_scores(T, E, 11);
  const auto ref = sinkhorn_ref(C, T, E, tol, 100, 1e-8);
  const size_t n = ref.errs.size();
  // the reference stops well inside the budget, clear of the tolerance on both sides
  ASSERT_GT(n, 2u);
  ASSERT_LT(n, 100u);
  ASSERT_LT(ref.errs[n - 1], 0.8 * tol);
  ASSERT_GT(ref.errs[n - 2], 1.25 * tol);
  const auto k = run_sinkhorn(C, T, E, float(tol), 100);
  expect_sinkhorn_matches(k, ref, T, E);
  // rows sum to 1/T and columns to 1/E after balancing: the maths, not only agreement
  double col0 = 0;
  for (int64_t t = 0; t < T; ++t) col0 += k.d0[size_t(t)] * C[size_t(t * E)] * k.d1[0];
  EXPECT_NEAR(col0, 1.0 / E, 1e-3 / E);
}

TEST(CudaKernelsEmulated, SinkhornRefusesWidthsOutsideItsRegisters) {
  std::vector<float> d(64);
  EXPECT_EQ(mc::sinkhorn(d.data(), 1, 65, 0.f, 1, 1e-8f, d.data(), d.data(), d.data(), nullptr),
            int(cudaErrorInvalidValue));
  EXPECT_EQ(mc::sinkhorn(d.data(), 1, 0, 0.f, 1, 1e-8f, d.data(), d.data(), d.data(), nullptr),
            int(cudaErrorInvalidValue));
}

}  // namespace
