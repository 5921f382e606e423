// moecpt's CUDA kernels (interface and maths: kernels.h). Memory-bound
// elementwise work that ATen runs as several passes: each kernel reads its
// inputs once and writes its outputs once, computing in fp32 with one rounding.
// 16-byte vector loads when sizes, strides and pointers allow, else scalar.
//
// Without a GPU the tests compile this file as C++ against a CPU emulation of
// the CUDA execution model (tests/cuda_emu: its stand-in headers define
// MOECPT_CUDA_EMULATION) and run every kernel; `launch` below is the one place
// that differs.
#include "model/cuda/kernels.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>

namespace moecpt::cuda {

namespace {

// kernel<<<grid, block, 0, st>>>(args...), each argument converted to the
// kernel's parameter type; under the emulation, every thread of the launch
// runs the kernel as a fiber on the CPU.
template <typename... P, typename... A>
void launch(void (*kernel)(P...), unsigned grid, unsigned block, cudaStream_t st, A... args) {
  static_assert(sizeof...(P) == sizeof...(A), "one argument per kernel parameter");
#ifdef MOECPT_CUDA_EMULATION
  (void)st;
  cuda_emu::launch(grid, block, [&] { kernel(P(args)...); });
#else
  kernel<<<grid, block, 0, st>>>(P(args)...);
#endif
}

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// The activations and their derivatives as ATen computes them (GeLU: the exact
// erf form, gelu_backward's cdf + x·pdf).
template <Act A>
__device__ __forceinline__ float act_f(float x) {
  if constexpr (A == Act::kGelu) return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
  else return x / (1.f + expf(-x));
}
template <Act A>
__device__ __forceinline__ float act_grad_f(float x) {
  if constexpr (A == Act::kGelu) {
    const float cdf = 0.5f * (1.f + erff(x * 0.70710678118654752f));
    const float pdf = 0.39894228040143267f * expf(-0.5f * x * x);
    return cdf + x * pdf;
  } else {
    const float s = 1.f / (1.f + expf(-x));
    return s * (1.f + x * (1.f - s));
  }
}

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}
template <typename T, int V>
__device__ __forceinline__ void store(T* p, const Pack<T, V>& x) {
  *reinterpret_cast<Pack<T, V>*>(p) = x;
}

template <typename T, int V, Act A>
__global__ void gated_forward_kernel(const T* __restrict__ h13, int64_t ld_h13, T* __restrict__ a, int64_t ld_a,
                                     int64_t rows, int64_t H) {
  const int64_t per_row = H / V, total = rows * per_row;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / per_row, j = (i - r * per_row) * V;
    const T* row = h13 + r * ld_h13;
    const auto g = load<T, V>(row + j), u = load<T, V>(row + H + j);
    Pack<T, V> o;
#pragma unroll
    for (int k = 0; k < V; ++k) o.v[k] = from_f<T>(act_f<A>(to_f(g.v[k])) * to_f(u.v[k]));
    store<T, V>(a + r * ld_a + j, o);
  }
}

template <typename T, int V, Act A>
__global__ void gated_backward_kernel(const T* __restrict__ h13, int64_t ld_h13, const T* __restrict__ da,
                                      int64_t ld_da, T* __restrict__ dh13, int64_t ld_dh13, int64_t rows, int64_t H) {
  const int64_t per_row = H / V, total = rows * per_row;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / per_row, j = (i - r * per_row) * V;
    const T* row = h13 + r * ld_h13;
    const auto g = load<T, V>(row + j), u = load<T, V>(row + H + j), d = load<T, V>(da + r * ld_da + j);
    Pack<T, V> d1, d3;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float x = to_f(g.v[k]), up = to_f(u.v[k]), dk = to_f(d.v[k]);
      d1.v[k] = from_f<T>(dk * up * act_grad_f<A>(x));
      d3.v[k] = from_f<T>(dk * act_f<A>(x));
    }
    T* out = dh13 + r * ld_dh13;
    store<T, V>(out + j, d1);
    store<T, V>(out + H + j, d3);
  }
}

template <typename T, int V>
__global__ void rotate_pairs_kernel(const T* __restrict__ x, int64_t xsb, int64_t xst, int64_t xsh,
                                    T* __restrict__ out, int64_t osb, int64_t ost, int64_t osh,
                                    const T* __restrict__ c, const T* __restrict__ s, int64_t B, int64_t T_,
                                    int64_t Hd, int64_t n, float sign) {
  const int64_t per = n / V, total = B * T_ * Hd * per;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t rest = i / per;
    const int64_t j = (i - rest * per) * V;
    const int64_t h = rest % Hd;
    rest /= Hd;
    const int64_t t = rest % T_, b = rest / T_;
    const T* xp = x + b * xsb + t * xst + h * xsh + j;
    T* op = out + b * osb + t * ost + h * osh + j;
    const auto x1 = load<T, V>(xp), x2 = load<T, V>(xp + n);
    const auto cc = load<T, V>(c + t * n + j), ss = load<T, V>(s + t * n + j);
    Pack<T, V> o1, o2;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float a1 = to_f(x1.v[k]), a2 = to_f(x2.v[k]), ck = to_f(cc.v[k]), sk = sign * to_f(ss.v[k]);
      o1.v[k] = from_f<T>(a1 * ck - a2 * sk);
      o2.v[k] = from_f<T>(a2 * ck + a1 * sk);
    }
    store<T, V>(op, o1);
    store<T, V>(op + n, o2);
  }
}

template <typename T, int V>
__global__ void gather_sum_rows_kernel(const T* __restrict__ src, int64_t ld_src, const int64_t* __restrict__ idx,
                                       const float* __restrict__ w, int64_t T_, int K, int64_t D,
                                       T* __restrict__ out, int64_t ld_out) {
  const int64_t per_row = D / V, total = T_ * per_row;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / per_row, j = (i - t * per_row) * V;
    float acc[V];
#pragma unroll
    for (int k = 0; k < V; ++k) acc[k] = 0.f;
    for (int q = 0; q < K; ++q) {
      const int64_t s = t * K + q;
      const float wq = w ? w[s] : 1.f;
      const auto x = load<T, V>(src + idx[s] * ld_src + j);
#pragma unroll
      for (int k = 0; k < V; ++k) acc[k] += wq * to_f(x.v[k]);
    }
    Pack<T, V> o;
#pragma unroll
    for (int k = 0; k < V; ++k) o.v[k] = from_f<T>(acc[k]);
    store<T, V>(out + t * ld_out + j, o);
  }
}

// One warp per slot: lanes stride over the row's V-wide vectors, writing
// dy = w·g and accumulating g·y, then a shuffle reduction for dw.
template <typename T, int V>
__global__ void combine_backward_kernel(const T* __restrict__ g, int64_t ld_g, const T* __restrict__ y, int64_t ld_y,
                                        const int64_t* __restrict__ idx, const float* __restrict__ w, int64_t S,
                                        int K, int64_t D, T* __restrict__ dy, int64_t ld_dy, float* __restrict__ dw) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
  for (int64_t s = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; s < S; s += warps) {
    const int64_t t = s / K, r = idx[s];
    const float ws = w[s];
    const T* gr = g + t * ld_g;
    const T* yr = y + r * ld_y;
    T* dr = dy + r * ld_dy;
    float dot = 0.f;
    for (int64_t j = int64_t(lane) * V; j < D; j += 32 * V) {
      const auto gv = load<T, V>(gr + j), yv = load<T, V>(yr + j);
      Pack<T, V> o;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const float gk = to_f(gv.v[k]);
        dot += gk * to_f(yv.v[k]);
        o.v[k] = from_f<T>(ws * gk);
      }
      store<T, V>(dr + j, o);
    }
#pragma unroll
    for (int o = 16; o > 0; o /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, o);
    if (lane == 0) dw[s] = dot;
  }
}

// (m, s) pairs of an online softmax: s = Σ exp(x − m) over the values seen.
__device__ __forceinline__ void lse_combine(float& m, float& s, float m2, float s2) {
  if (m2 == -INFINITY) return;
  if (m2 > m) {
    s = s * expf(m - m2) + s2;
    m = m2;
  } else {
    s += s2 * expf(m2 - m);
  }
}

template <int THREADS, bool VEC4>
__global__ void __launch_bounds__(THREADS)
    cross_entropy_rows_kernel(const float* __restrict__ logits, int64_t ld, const int64_t* __restrict__ targets,
                              int64_t V, __nv_bfloat16* __restrict__ grad, int64_t ld_grad,
                              float* __restrict__ loss) {
  const int64_t r = blockIdx.x;
  const float* x = logits + r * ld;
  float m = -INFINITY, s = 0.f;
  if constexpr (VEC4) {
    const int64_t V4 = V / 4;
    for (int64_t j = threadIdx.x; j < V4; j += THREADS) {
      const float4 v = reinterpret_cast<const float4*>(x)[j];
      const float m4 = fmaxf(fmaxf(v.x, v.y), fmaxf(v.z, v.w));
      if (m4 == -INFINITY) continue;
      if (m4 > m) {
        s *= expf(m - m4);
        m = m4;
      }
      s += expf(v.x - m) + expf(v.y - m) + expf(v.z - m) + expf(v.w - m);
    }
  } else {
    for (int64_t j = threadIdx.x; j < V; j += THREADS) lse_combine(m, s, x[j], 1.f);
  }
  // block reduction of (m, s): warps by shuffles, then the first warp
#pragma unroll
  for (int o = 16; o > 0; o /= 2) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
    lse_combine(m, s, m2, s2);
  }
  __shared__ float sm[THREADS / 32], ss[THREADS / 32];
  __shared__ float lse_shared;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) sm[warp] = m, ss[warp] = s;
  __syncthreads();
  if (warp == 0) {
    m = lane < THREADS / 32 ? sm[lane] : -INFINITY;
    s = lane < THREADS / 32 ? ss[lane] : 0.f;
#pragma unroll
    for (int o = 16; o > 0; o /= 2) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
      lse_combine(m, s, m2, s2);
    }
    if (lane == 0) {
      const float lse = m + logf(s);
      lse_shared = lse;
      const int64_t t = targets[r];
      loss[r] = (t >= 0 && t < V) ? lse - x[t] : NAN;
    }
  }
  __syncthreads();
  if (grad == nullptr) return;
  const float lse = lse_shared;
  __nv_bfloat16* g = grad + r * ld_grad;
  if constexpr (VEC4) {
    const int64_t V4 = V / 4;
    for (int64_t j = threadIdx.x; j < V4; j += THREADS) {
      const float4 v = reinterpret_cast<const float4*>(x)[j];
      __nv_bfloat162 lo = __floats2bfloat162_rn(expf(v.x - lse), expf(v.y - lse));
      __nv_bfloat162 hi = __floats2bfloat162_rn(expf(v.z - lse), expf(v.w - lse));
      reinterpret_cast<__nv_bfloat162*>(g)[2 * j] = lo;
      reinterpret_cast<__nv_bfloat162*>(g)[2 * j + 1] = hi;
    }
  } else {
    for (int64_t j = threadIdx.x; j < V; j += THREADS) g[j] = __float2bfloat16_rn(expf(x[j] - lse));
  }
  __syncthreads();  // the target's entry last, over whatever thread wrote it
  if (threadIdx.x == 0) {
    const int64_t t = targets[r];
    if (t >= 0 && t < V) g[t] = __float2bfloat16_rn(expm1f(x[t] - lse));
  }
}

// One block of kSinkhornThreads threads does every iteration: each thread
// takes rows t ≡ tid, computes d0[t] and accumulates its share of Cᵀ d0 in
// registers (E ≤ EMAX), warps and then the block reduce it. C comes
// transposed, Ct [E, T]: a warp's loads of one expert's column are 32
// consecutive floats (coalesced; a row-major [T, E] row of 31 floats per
// thread would touch 32 cache lines per load instruction). Each row's E values
// are loaded once per iteration into registers and used for both products.
// Ct (2 MB at T = 16384, E = 31) is read from L2 once per iteration.
// 512 threads for E ≤ 32; 256 for E ≤ 64, whose two register arrays of 64
// need more than 512 threads may have (128 each) without spilling.
template <int EMAX>
constexpr int kSinkhornThreads = EMAX <= 32 ? 512 : 256;

template <int EMAX>
__global__ void __launch_bounds__(kSinkhornThreads<EMAX>)
    sinkhorn_kernel(const float* __restrict__ Ct, int64_t T, int E, float tol, int64_t max_iters, float eps,
                    float* __restrict__ d0, float* __restrict__ d1_out, float* __restrict__ stats) {
  constexpr int kWarps = kSinkhornThreads<EMAX> / 32;
  __shared__ float d1[EMAX], part[kWarps][EMAX];
  __shared__ float err_shared;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  if (tid < EMAX) d1[tid] = 1.f;
  __syncthreads();
  const float inv_t = 1.f / float(T), inv_e = 1.f / float(E);
  int64_t it = 0;
  float err = 0.f;
  while (it < max_iters) {
    float acc[EMAX];
#pragma unroll
    for (int e = 0; e < EMAX; ++e) acc[e] = 0.f;
    for (int64_t t = tid; t < T; t += kSinkhornThreads<EMAX>) {
      float c[EMAX];
      float s = 0.f;
#pragma unroll
      for (int e = 0; e < EMAX; ++e) {
        c[e] = e < E ? Ct[e * T + t] : 0.f;
        s += c[e] * d1[e];
      }
      const float d0t = inv_t / (s + eps);
      d0[t] = d0t;
#pragma unroll
      for (int e = 0; e < EMAX; ++e) acc[e] += c[e] * d0t;
    }
#pragma unroll
    for (int e = 0; e < EMAX; ++e) {
      float v = acc[e];
#pragma unroll
      for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == 0) part[warp][e] = v;
    }
    __syncthreads();  // part complete
    float d1_new = 0.f, diff = 0.f;
    if (tid < E) {
      float tot = 0.f;
      for (int w = 0; w < kWarps; ++w) tot += part[w][tid];
      d1_new = inv_e / (tot + eps);
      diff = fabsf(d1_new - d1[tid]);
    }
    __syncthreads();  // every read of part and d1 done
    if (tid < E) {
      d1[tid] = d1_new;
      part[0][tid] = diff;
    }
    __syncthreads();
    if (warp == 0) {
      float v = 0.f;
      for (int e = lane; e < E; e += 32) v += part[0][e];
#pragma unroll
      for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == 0) err_shared = v * inv_e;
    }
    __syncthreads();
    err = err_shared;
    ++it;
    if (err < tol) break;  // the same value in every thread: the block leaves together
  }
  if (tid < E) d1_out[tid] = d1[tid];
  if (tid == 0) stats[0] = float(it), stats[1] = err;
}

// RMSNorm forward: one warp per row (grid-stride over rows). The lanes sum
// the squares, a shuffle reduction gives every lane r, and a second read of
// the row (from L1) writes y. With ADD the row is first h = x + a (a of type A,
// the sum rounded to T as ATen's add rounds it), written to h, and h is the row
// normalised (the second read is of h, which the same lane wrote). y is
// written as Y (x's type, or bf16 for a bf16 matmul that reads it).
template <typename T, typename A, typename Y, int V, bool ADD>
__global__ void rms_norm_forward_kernel(const T* __restrict__ x, int64_t ld_x, const A* __restrict__ a, int64_t ld_a,
                                        const float* __restrict__ w, int64_t rows, int64_t D, float eps,
                                        T* __restrict__ h, int64_t ld_h, Y* __restrict__ y, int64_t ld_y,
                                        float* __restrict__ rstd) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
  for (int64_t r = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; r < rows; r += warps) {
    const T* xr = x + r * ld_x;
    float ss = 0.f;
    for (int64_t j = int64_t(lane) * V; j < D; j += 32 * V) {
      auto v = load<T, V>(xr + j);
      if constexpr (ADD) {
        const auto av = load<A, V>(a + r * ld_a + j);
#pragma unroll
        for (int k = 0; k < V; ++k) v.v[k] = from_f<T>(to_f(v.v[k]) + to_f(av.v[k]));
        store<T, V>(h + r * ld_h + j, v);
      }
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const float f = to_f(v.v[k]);
        ss += f * f;
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o /= 2) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    const float rs = 1.f / sqrtf(ss / float(D) + eps);
    if (lane == 0) rstd[r] = rs;
    const T* src = ADD ? h + r * ld_h : xr;
    Y* yr = y + r * ld_y;
    for (int64_t j = int64_t(lane) * V; j < D; j += 32 * V) {
      const auto v = load<T, V>(src + j);
      Pack<Y, V> o;
#pragma unroll
      for (int k = 0; k < V; ++k) o.v[k] = from_f<Y>(to_f(v.v[k]) * rs * w[j + k]);
      store<Y, V>(yr + j, o);
    }
  }
}

// RMSNorm backward: warp `warp` < n_partial takes rows [warp·per, (warp+1)·per)
// in turn: per row a dot product Σ dy·w·x (shuffle-reduced), then dx; the
// weight gradient's terms dy·x·r for the lane's columns stay in registers
// (column j = (i·32 + lane)·V + k, D ≤ MAXD) and are written once, as the
// warp's row of dw_partial. With ADD, dres (the gradient reaching the input
// by another path: the residual stream's) is added to dx before its rounding.
// dy is G: x's type, or bf16 (the gradient of a bf16 y).
template <typename T, typename G, int V, int MAXD, bool ADD>
__global__ void __launch_bounds__(256)
    rms_norm_backward_kernel(const T* __restrict__ x, int64_t ld_x, const float* __restrict__ w,
                             const float* __restrict__ rstd, const G* __restrict__ dy, int64_t ld_dy,
                             const T* __restrict__ dres, int64_t ld_dres, int64_t rows, int64_t D, int64_t per,
                             int64_t n_partial, T* __restrict__ dx, int64_t ld_dx, float* __restrict__ dw_partial) {
  constexpr int kVecs = MAXD / (32 * V);
  const int lane = threadIdx.x % 32;
  const int64_t warp = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (warp >= n_partial) return;  // the whole warp
  float acc[kVecs][V];
#pragma unroll
  for (int i = 0; i < kVecs; ++i)
#pragma unroll
    for (int k = 0; k < V; ++k) acc[i][k] = 0.f;
  const float inv_d = 1.f / float(D);
  const int64_t r_end = (warp + 1) * per < rows ? (warp + 1) * per : rows;
  for (int64_t r = warp * per; r < r_end; ++r) {
    const T* xr = x + r * ld_x;
    const G* gr = dy + r * ld_dy;
    const float rs = rstd[r];
    float dot = 0.f;
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
      const int64_t j = (int64_t(i) * 32 + lane) * V;
      if (j < D) {
        const auto xv = load<T, V>(xr + j);
        const auto gv = load<G, V>(gr + j);
#pragma unroll
        for (int k = 0; k < V; ++k) dot += to_f(gv.v[k]) * w[j + k] * to_f(xv.v[k]);
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, o);
    const float c = rs * rs * rs * inv_d * dot;
    T* dr = dx + r * ld_dx;
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
      const int64_t j = (int64_t(i) * 32 + lane) * V;
      if (j < D) {
        const auto xv = load<T, V>(xr + j);
        const auto gv = load<G, V>(gr + j);
        Pack<T, V> o, rv;
        if constexpr (ADD) rv = load<T, V>(dres + r * ld_dres + j);
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const float xk = to_f(xv.v[k]), gk = to_f(gv.v[k]);
          float d = rs * w[j + k] * gk - c * xk;
          if constexpr (ADD) d += to_f(rv.v[k]);
          o.v[k] = from_f<T>(d);
          acc[i][k] += gk * xk * rs;
        }
        store<T, V>(dr + j, o);
      }
    }
  }
  float* p = dw_partial + warp * D;
#pragma unroll
  for (int i = 0; i < kVecs; ++i) {
    const int64_t j = (int64_t(i) * 32 + lane) * V;
    if (j < D)
#pragma unroll
      for (int k = 0; k < V; ++k) p[j + k] = acc[i][k];
  }
}

// The slot order as a stable counting sort (kernels.h slot_sort). The slots
// are cut into chunks of kSortChunk, one block each, walked in tiles of one
// slot per thread, in slot order. In a tile each lane finds the lanes of its
// warp with the same expert (__match_any_sync) and its rank among the earlier
// ones; each such group's first lane writes the group's size for its warp;
// after a barrier a slot's position is its expert's running position in the
// chunk, plus the sizes of its expert's groups in earlier warps, plus its rank.
// Pass 1 (WRITE false) leaves each chunk's count per expert in `chunk` [chunks, E];
// the scan turns them into each chunk's first position per expert; pass 2
// (WRITE true) starts from those and writes the order.
constexpr int kSortThreads = 256, kSortWarps = kSortThreads / 32, kSortTiles = 8;
constexpr int64_t kSortChunk = int64_t(kSortThreads) * kSortTiles;

template <bool WRITE>
__global__ void __launch_bounds__(kSortThreads)
    slot_sort_kernel(const int64_t* __restrict__ ids, int64_t S, int E, int64_t K, int* __restrict__ chunk,
                     int64_t* __restrict__ order, int64_t* __restrict__ inverse, int64_t* __restrict__ token) {
  __shared__ int run[kSlotSortMaxE];               // per expert: the chunk's count so far (+ its first position)
  __shared__ int group[kSortWarps][kSlotSortMaxE];  // per warp and expert: the tile's group size (else 0)
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t c = blockIdx.x;
  for (int e = tid; e < E; e += kSortThreads) {
    run[e] = WRITE ? chunk[c * E + e] : 0;
    for (int w = 0; w < kSortWarps; ++w) group[w][e] = 0;
  }
  __syncthreads();
  for (int tile = 0; tile < kSortTiles; ++tile) {
    const int64_t s = c * kSortChunk + int64_t(tile) * kSortThreads + tid;
    const int64_t id = s < S ? ids[s] : -1;
    const bool in = id >= 0 && id < E;  // past the end (or an id out of range): in no group
    const int e = in ? int(id) : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, unsigned(e));
    const int rank = __popc(peers & ((1u << lane) - 1u));
    if (in && rank == 0) group[warp][e] = __popc(peers);
    __syncthreads();
    if (WRITE && in) {
      int64_t pos = run[e] + rank;
      for (int w = 0; w < warp; ++w) pos += group[w][e];
      order[pos] = s;
      inverse[s] = pos;
      token[pos] = s / K;
    }
    __syncthreads();
    for (int x = tid; x < E; x += kSortThreads) {
      int n = 0;
      for (int w = 0; w < kSortWarps; ++w) n += group[w][x], group[w][x] = 0;
      run[x] += n;
    }
    __syncthreads();
  }
  if (!WRITE)
    for (int e = tid; e < E; e += kSortThreads) chunk[c * E + e] = run[e];
}

// Per expert e (thread e): the chunks' counts → each chunk's first position,
// the expert's own offset (all slots of experts < e) added; counts[e] the total.
__global__ void __launch_bounds__(kSlotSortMaxE)
    slot_sort_scan_kernel(int* __restrict__ chunk, int64_t chunks, int E, int64_t* __restrict__ counts) {
  __shared__ int total[kSlotSortMaxE], offset[kSlotSortMaxE];
  const int e = threadIdx.x;
  int sum = 0;
  if (e < E)
    for (int64_t c = 0; c < chunks; ++c) {
      const int n = chunk[c * E + e];
      chunk[c * E + e] = sum;
      sum += n;
    }
  total[e] = sum;
  __syncthreads();
  if (e == 0) {
    int acc = 0;
    for (int x = 0; x < E; ++x) offset[x] = acc, acc += total[x];
  }
  __syncthreads();
  if (e < E) {
    for (int64_t c = 0; c < chunks; ++c) chunk[c * E + e] += offset[e];
    if (counts != nullptr) counts[e] = total[e];
  }
}

constexpr int kThreads = 256;

unsigned blocks_for(int64_t total) {
  // A grid-stride loop: enough blocks to fill the device several times over.
  return unsigned(std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t(1) << 16)));
}

// The same for kernels that give each item (slot, row) a warp of 32 threads.
unsigned blocks_for_warps(int64_t items) { return blocks_for(items * 32); }

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Whether V-wide vector access is valid: every size and stride a multiple of V,
// every pointer 16-byte aligned.
template <int V>
bool vectorizable(std::initializer_list<int64_t> sizes, std::initializer_list<const void*> ptrs) {
  for (auto n : sizes)
    if (n % V != 0) return false;
  for (auto p : ptrs)
    if (!aligned16(p)) return false;
  return true;
}

template <typename T>
int gated_forward_t(Act act, const void* h13, int64_t ld_h13, void* a, int64_t ld_a, int64_t rows, int64_t H,
                    cudaStream_t st) {
  constexpr int V = 16 / sizeof(T);
  const auto* x = static_cast<const T*>(h13);
  auto* y = static_cast<T*>(a);
  if (rows == 0 || H == 0) return 0;
  const bool vec = vectorizable<V>({H, ld_h13, ld_a}, {h13, a});
  const int64_t total = rows * (vec ? H / V : H);
  const auto g = blocks_for(total);
  if (act == Act::kGelu) {
    if (vec) launch(gated_forward_kernel<T, V, Act::kGelu>, g, kThreads, st, x, ld_h13, y, ld_a, rows, H);
    else launch(gated_forward_kernel<T, 1, Act::kGelu>, g, kThreads, st, x, ld_h13, y, ld_a, rows, H);
  } else {
    if (vec) launch(gated_forward_kernel<T, V, Act::kSilu>, g, kThreads, st, x, ld_h13, y, ld_a, rows, H);
    else launch(gated_forward_kernel<T, 1, Act::kSilu>, g, kThreads, st, x, ld_h13, y, ld_a, rows, H);
  }
  return int(cudaGetLastError());
}

template <typename T>
int gated_backward_t(Act act, const void* h13, int64_t ld_h13, const void* da, int64_t ld_da, void* dh13,
                     int64_t ld_dh13, int64_t rows, int64_t H, cudaStream_t st) {
  constexpr int V = 16 / sizeof(T);
  const auto* x = static_cast<const T*>(h13);
  const auto* d = static_cast<const T*>(da);
  auto* y = static_cast<T*>(dh13);
  if (rows == 0 || H == 0) return 0;
  const bool vec = vectorizable<V>({H, ld_h13, ld_da, ld_dh13}, {h13, da, dh13});
  const int64_t total = rows * (vec ? H / V : H);
  const auto g = blocks_for(total);
  if (act == Act::kGelu) {
    if (vec) launch(gated_backward_kernel<T, V, Act::kGelu>, g, kThreads, st, x, ld_h13, d, ld_da, y, ld_dh13, rows, H);
    else launch(gated_backward_kernel<T, 1, Act::kGelu>, g, kThreads, st, x, ld_h13, d, ld_da, y, ld_dh13, rows, H);
  } else {
    if (vec) launch(gated_backward_kernel<T, V, Act::kSilu>, g, kThreads, st, x, ld_h13, d, ld_da, y, ld_dh13, rows, H);
    else launch(gated_backward_kernel<T, 1, Act::kSilu>, g, kThreads, st, x, ld_h13, d, ld_da, y, ld_dh13, rows, H);
  }
  return int(cudaGetLastError());
}

template <typename T>
int rotate_pairs_t(const void* x, const int64_t xs[3], void* out, const int64_t os[3], const void* c, const void* s,
                   int64_t B, int64_t T_, int64_t Hd, int64_t n, int sign, cudaStream_t st) {
  constexpr int V = 16 / sizeof(T);
  if (B * T_ * Hd * n == 0) return 0;
  const bool vec = vectorizable<V>({n, xs[0], xs[1], xs[2], os[0], os[1], os[2]}, {x, out, c, s});
  const int64_t total = B * T_ * Hd * (vec ? n / V : n);
  const auto g = blocks_for(total);
  const auto* xp = static_cast<const T*>(x);
  auto* op = static_cast<T*>(out);
  const auto *cp = static_cast<const T*>(c), *sp = static_cast<const T*>(s);
  if (vec)
    launch(rotate_pairs_kernel<T, V>, g, kThreads, st,
           xp, xs[0], xs[1], xs[2], op, os[0], os[1], os[2], cp, sp, B, T_, Hd, n, float(sign));
  else
    launch(rotate_pairs_kernel<T, 1>, g, kThreads, st,
           xp, xs[0], xs[1], xs[2], op, os[0], os[1], os[2], cp, sp, B, T_, Hd, n, float(sign));
  return int(cudaGetLastError());
}

template <typename T>
int gather_sum_rows_t(const void* src, int64_t ld_src, const int64_t* idx, const float* w, int64_t T_, int64_t K,
                      int64_t D, void* out, int64_t ld_out, cudaStream_t st) {
  constexpr int V = 16 / sizeof(T);
  if (T_ * D == 0) return 0;
  const bool vec = vectorizable<V>({D, ld_src, ld_out}, {src, out});
  const int64_t total = T_ * (vec ? D / V : D);
  const auto g = blocks_for(total);
  const auto* sp = static_cast<const T*>(src);
  auto* op = static_cast<T*>(out);
  if (vec) launch(gather_sum_rows_kernel<T, V>, g, kThreads, st, sp, ld_src, idx, w, T_, int(K), D, op, ld_out);
  else launch(gather_sum_rows_kernel<T, 1>, g, kThreads, st, sp, ld_src, idx, w, T_, int(K), D, op, ld_out);
  return int(cudaGetLastError());
}

template <typename T>
int combine_backward_t(const void* g, int64_t ld_g, const void* y, int64_t ld_y, const int64_t* idx, const float* w,
                       int64_t T_, int64_t K, int64_t D, void* dy, int64_t ld_dy, float* dw, cudaStream_t st) {
  constexpr int V = 16 / sizeof(T);
  const int64_t S = T_ * K;
  if (S == 0) return 0;
  const auto blocks = blocks_for_warps(S);
  const bool vec = vectorizable<V>({D, ld_g, ld_y, ld_dy}, {g, y, dy});
  const auto *gp = static_cast<const T*>(g), *yp = static_cast<const T*>(y);
  auto* dp = static_cast<T*>(dy);
  if (vec)
    launch(combine_backward_kernel<T, V>, blocks, kThreads, st,
           gp, ld_g, yp, ld_y, idx, w, S, int(K), D, dp, ld_dy, dw);
  else
    launch(combine_backward_kernel<T, 1>, blocks, kThreads, st,
           gp, ld_g, yp, ld_y, idx, w, S, int(K), D, dp, ld_dy, dw);
  return int(cudaGetLastError());
}

// a == nullptr: plain RMSNorm of x (A unused); else of h = x + a, h written.
template <typename T, typename A, typename Y>
int rms_norm_forward_t(const void* x, int64_t ld_x, const void* a, int64_t ld_a, const float* w, int64_t rows,
                       int64_t D, float eps, void* h, int64_t ld_h, void* y, int64_t ld_y, float* rstd,
                       cudaStream_t st) {
  constexpr int V = 16 / sizeof(T);
  if (rows == 0 || D == 0) return 0;
  const bool add = a != nullptr;
  const bool vec = add ? vectorizable<V>({D, ld_x, ld_a, ld_h, ld_y}, {x, a, h, y})
                       : vectorizable<V>({D, ld_x, ld_y}, {x, y});
  const auto blocks = blocks_for_warps(rows);
  const auto* xp = static_cast<const T*>(x);
  const auto* ap = static_cast<const A*>(a);
  auto* hp = static_cast<T*>(h);
  auto* yp = static_cast<Y*>(y);
  const auto go = [&](auto kernel) {
    launch(kernel, blocks, kThreads, st, xp, ld_x, ap, ld_a, w, rows, D, eps, hp, ld_h, yp, ld_y, rstd);
  };
  if (add) vec ? go(rms_norm_forward_kernel<T, A, Y, V, true>) : go(rms_norm_forward_kernel<T, A, Y, 1, true>);
  else vec ? go(rms_norm_forward_kernel<T, A, Y, V, false>) : go(rms_norm_forward_kernel<T, A, Y, 1, false>);
  return int(cudaGetLastError());
}

template <typename T, typename G, int V, bool ADD>
int rms_norm_backward_v(const T* x, int64_t ld_x, const float* w, const float* rstd, const G* dy, int64_t ld_dy,
                        const T* dres, int64_t ld_dres, int64_t rows, int64_t D, T* dx, int64_t ld_dx,
                        float* dw_partial, cudaStream_t st) {
  const int64_t partials = rms_norm_backward_partials(rows), per = (rows + partials - 1) / partials;
  const auto blocks = blocks_for_warps(partials);  // partials ≤ 2048: one warp each, none left out
  if (D <= 1024)
    launch(rms_norm_backward_kernel<T, G, V, 1024, ADD>, blocks, kThreads, st,
           x, ld_x, w, rstd, dy, ld_dy, dres, ld_dres, rows, D, per, partials, dx, ld_dx, dw_partial);
  else
    launch(rms_norm_backward_kernel<T, G, V, 2048, ADD>, blocks, kThreads, st,
           x, ld_x, w, rstd, dy, ld_dy, dres, ld_dres, rows, D, per, partials, dx, ld_dx, dw_partial);
  return int(cudaGetLastError());
}

// dres == nullptr: plain backward; else dres added to dx.
template <typename T, typename G>
int rms_norm_backward_t(const void* x, int64_t ld_x, const float* w, const float* rstd, const void* dy,
                        int64_t ld_dy, const void* dres, int64_t ld_dres, int64_t rows, int64_t D, void* dx,
                        int64_t ld_dx, float* dw_partial, cudaStream_t st) {
  constexpr int V = 16 / sizeof(T);
  if (D == 0) return 0;
  if (D > kRmsNormMaxD) return int(cudaErrorInvalidValue);
  const bool add = dres != nullptr;
  const bool vec = add ? vectorizable<V>({D, ld_x, ld_dy, ld_dres, ld_dx}, {x, dy, dres, dx})
                       : vectorizable<V>({D, ld_x, ld_dy, ld_dx}, {x, dy, dx});
  const auto *xp = static_cast<const T*>(x), *rp = static_cast<const T*>(dres);
  const auto* gp = static_cast<const G*>(dy);
  auto* dp = static_cast<T*>(dx);
  const auto go = [&](auto v, auto with_add) {
    return rms_norm_backward_v<T, G, decltype(v)::value, decltype(with_add)::value>(
        xp, ld_x, w, rstd, gp, ld_dy, rp, ld_dres, rows, D, dp, ld_dx, dw_partial, st);
  };
  using Vec = std::integral_constant<int, V>;
  using One = std::integral_constant<int, 1>;
  if (add) return vec ? go(Vec{}, std::true_type{}) : go(One{}, std::true_type{});
  return vec ? go(Vec{}, std::false_type{}) : go(One{}, std::false_type{});
}

}  // namespace

int64_t rms_norm_backward_partials(int64_t rows) { return std::clamp<int64_t>((rows + 7) / 8, 1, 2048); }

int rms_norm_forward(DType dt, const void* x, int64_t ld_x, DType dt_a, const void* a, int64_t ld_a, const float* w,
                     int64_t rows, int64_t D, float eps, void* h, int64_t ld_h, DType dt_y, void* y, int64_t ld_y,
                     float* rstd, void* stream) {
  using bf16 = __nv_bfloat16;
  auto st = static_cast<cudaStream_t>(stream);
  if (a != nullptr && h == nullptr) return int(cudaErrorInvalidValue);
  const bool a_bf16 = a != nullptr && dt_a == DType::kBFloat16, y_bf16 = dt_y == DType::kBFloat16;
  if (dt == DType::kBFloat16) {  // a and y bf16 too: fp32 a would promote h to fp32, fp32 y is not wanted
    if ((a != nullptr && !a_bf16) || !y_bf16) return int(cudaErrorInvalidValue);
    return rms_norm_forward_t<bf16, bf16, bf16>(x, ld_x, a, ld_a, w, rows, D, eps, h, ld_h, y, ld_y, rstd, st);
  }
  if (a_bf16)
    return y_bf16 ? rms_norm_forward_t<float, bf16, bf16>(x, ld_x, a, ld_a, w, rows, D, eps, h, ld_h, y, ld_y, rstd, st)
                  : rms_norm_forward_t<float, bf16, float>(x, ld_x, a, ld_a, w, rows, D, eps, h, ld_h, y, ld_y, rstd,
                                                           st);
  return y_bf16 ? rms_norm_forward_t<float, float, bf16>(x, ld_x, a, ld_a, w, rows, D, eps, h, ld_h, y, ld_y, rstd, st)
                : rms_norm_forward_t<float, float, float>(x, ld_x, a, ld_a, w, rows, D, eps, h, ld_h, y, ld_y, rstd,
                                                          st);
}

int rms_norm_backward(DType dt, const void* x, int64_t ld_x, const float* w, const float* rstd, DType dt_dy,
                      const void* dy, int64_t ld_dy, const void* dres, int64_t ld_dres, int64_t rows, int64_t D,
                      void* dx, int64_t ld_dx, float* dw_partial, void* stream) {
  using bf16 = __nv_bfloat16;
  auto st = static_cast<cudaStream_t>(stream);
  if (dt == DType::kBFloat16) {
    if (dt_dy != DType::kBFloat16) return int(cudaErrorInvalidValue);
    return rms_norm_backward_t<bf16, bf16>(x, ld_x, w, rstd, dy, ld_dy, dres, ld_dres, rows, D, dx, ld_dx, dw_partial,
                                           st);
  }
  return dt_dy == DType::kBFloat16
             ? rms_norm_backward_t<float, bf16>(x, ld_x, w, rstd, dy, ld_dy, dres, ld_dres, rows, D, dx, ld_dx,
                                                dw_partial, st)
             : rms_norm_backward_t<float, float>(x, ld_x, w, rstd, dy, ld_dy, dres, ld_dres, rows, D, dx, ld_dx,
                                                 dw_partial, st);
}

int64_t slot_sort_chunks(int64_t S) { return std::max<int64_t>(1, (S + kSortChunk - 1) / kSortChunk); }

int slot_sort(const int64_t* ids, int64_t S, int64_t E, int64_t K, int* scratch, int64_t* order, int64_t* inverse,
              int64_t* token, int64_t* counts, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  if (K < 1) return int(cudaErrorInvalidValue);
  if (const int rc = expert_counts(ids, S, E, scratch, counts, stream); rc != 0) return rc;
  launch(slot_sort_kernel<true>, unsigned(slot_sort_chunks(S)), kSortThreads, st, ids, S, int(E), K, scratch, order,
         inverse, token);
  return int(cudaGetLastError());
}

int expert_counts(const int64_t* ids, int64_t S, int64_t E, int* scratch, int64_t* counts, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  if (E < 1 || E > kSlotSortMaxE || S < 0 || S >= (int64_t(1) << 31)) return int(cudaErrorInvalidValue);
  const int64_t chunks = slot_sort_chunks(S);
  launch(slot_sort_kernel<false>, unsigned(chunks), kSortThreads, st, ids, S, int(E), int64_t(1), scratch, nullptr,
         nullptr, nullptr);
  launch(slot_sort_scan_kernel, 1, unsigned(kSlotSortMaxE), st, scratch, chunks, int(E), counts);
  return int(cudaGetLastError());
}

int cross_entropy_rows(const float* logits, int64_t ld, const int64_t* targets, int64_t rows, int64_t V,
                       void* grad_bf16, int64_t ld_grad, float* loss, void* stream) {
  if (rows == 0) return 0;
  auto st = static_cast<cudaStream_t>(stream);
  auto* g = static_cast<__nv_bfloat16*>(grad_bf16);
  constexpr int kRowThreads = 512;
  // float4 loads and bf16 pairs: V, the strides and the pointers aligned to them
  const bool vec = V % 4 == 0 && ld % 4 == 0 && aligned16(logits) &&
                   (g == nullptr || (ld_grad % 4 == 0 && (reinterpret_cast<uintptr_t>(g) & 7) == 0));
  if (vec)
    launch(cross_entropy_rows_kernel<kRowThreads, true>, unsigned(rows), kRowThreads, st,
           logits, ld, targets, V, g, ld_grad, loss);
  else
    launch(cross_entropy_rows_kernel<kRowThreads, false>, unsigned(rows), kRowThreads, st,
           logits, ld, targets, V, g, ld_grad, loss);
  return int(cudaGetLastError());
}

int sinkhorn(const float* Ct, int64_t T, int64_t E, float tol, int64_t max_iters, float eps, float* d0, float* d1,
             float* stats, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  if (E < 1 || E > 64) return int(cudaErrorInvalidValue);
  if (E <= 32)
    launch(sinkhorn_kernel<32>, 1, kSinkhornThreads<32>, st, Ct, T, int(E), tol, max_iters, eps, d0, d1, stats);
  else
    launch(sinkhorn_kernel<64>, 1, kSinkhornThreads<64>, st, Ct, T, int(E), tol, max_iters, eps, d0, d1, stats);
  return int(cudaGetLastError());
}

int gated_forward(DType dt, Act act, const void* h13, int64_t ld_h13, void* a, int64_t ld_a, int64_t rows, int64_t H,
                  void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  return dt == DType::kBFloat16 ? gated_forward_t<__nv_bfloat16>(act, h13, ld_h13, a, ld_a, rows, H, st)
                                : gated_forward_t<float>(act, h13, ld_h13, a, ld_a, rows, H, st);
}

int gated_backward(DType dt, Act act, const void* h13, int64_t ld_h13, const void* da, int64_t ld_da, void* dh13,
                   int64_t ld_dh13, int64_t rows, int64_t H, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  return dt == DType::kBFloat16
             ? gated_backward_t<__nv_bfloat16>(act, h13, ld_h13, da, ld_da, dh13, ld_dh13, rows, H, st)
             : gated_backward_t<float>(act, h13, ld_h13, da, ld_da, dh13, ld_dh13, rows, H, st);
}

int rotate_pairs(DType dt, const void* x, const int64_t x_strides[3], void* out, const int64_t out_strides[3],
                 const void* c, const void* s, int64_t B, int64_t T, int64_t Hd, int64_t n, int sign, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  return dt == DType::kBFloat16
             ? rotate_pairs_t<__nv_bfloat16>(x, x_strides, out, out_strides, c, s, B, T, Hd, n, sign, st)
             : rotate_pairs_t<float>(x, x_strides, out, out_strides, c, s, B, T, Hd, n, sign, st);
}

int gather_sum_rows(DType dt, const void* src, int64_t ld_src, const int64_t* idx, const float* w, int64_t T,
                    int64_t K, int64_t D, void* out, int64_t ld_out, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  return dt == DType::kBFloat16 ? gather_sum_rows_t<__nv_bfloat16>(src, ld_src, idx, w, T, K, D, out, ld_out, st)
                                : gather_sum_rows_t<float>(src, ld_src, idx, w, T, K, D, out, ld_out, st);
}

int combine_backward(DType dt, const void* g, int64_t ld_g, const void* y, int64_t ld_y, const int64_t* idx,
                     const float* w, int64_t T, int64_t K, int64_t D, void* dy, int64_t ld_dy, float* dw,
                     void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  return dt == DType::kBFloat16
             ? combine_backward_t<__nv_bfloat16>(g, ld_g, y, ld_y, idx, w, T, K, D, dy, ld_dy, dw, st)
             : combine_backward_t<float>(g, ld_g, y, ld_y, idx, w, T, K, D, dy, ld_dy, dw, st);
}

}  // namespace moecpt::cuda
