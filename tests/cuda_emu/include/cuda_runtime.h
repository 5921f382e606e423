// Stand-in for <cuda_runtime.h> under the CPU emulation (tests/cuda_emu/emu.h):
// the few names src/model/cuda/kernels.cu uses, so it compiles as C++. Found
// before any real CUDA header because the emulation tests put this directory
// first on their include path; nothing else includes it.
#pragma once
#include <cmath>  // expf, erff, logf, expm1f, fabsf, fmaxf, INFINITY, NAN: glibc's in place of CUDA's
#include <cstdint>

#include "cuda_emu/emu.h"

#define MOECPT_CUDA_EMULATION 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Blocks run one after another, so one static per kernel instantiation is the
// block's shared memory (uninitialised in CUDA too; no kernel relies on it).
#define __shared__ static
// __restrict__ is GCC's own.

struct alignas(16) float4 {
  float x, y, z, w;
};

using cudaStream_t = struct CUstream_st*;
enum cudaError_t : int { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
inline cudaError_t cudaGetLastError() { return cudaError_t(cuda_emu::take_last_error()); }

#define threadIdx (::cuda_emu::thread_idx())
#define blockIdx (::cuda_emu::block_idx())
#define blockDim (::cuda_emu::block_dim())
#define gridDim (::cuda_emu::grid_dim())
#define __syncthreads() ::cuda_emu::syncthreads(__LINE__)
#define __shfl_xor_sync(mask, v, lane_mask) ::cuda_emu::shfl_xor((mask), (v), (lane_mask), __LINE__)
#define __match_any_sync(mask, v) ::cuda_emu::match_any((mask), unsigned(v), __LINE__)
inline int __popc(unsigned x) { return __builtin_popcount(x); }
