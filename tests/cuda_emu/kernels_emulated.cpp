// src/model/cuda/kernels.cu compiled as C++ for the CPU emulation: the
// stand-in <cuda_runtime.h> and <cuda_bf16.h> of tests/cuda_emu/include come
// first on this target's include path (tests/CMakeLists.txt).
#include "model/cuda/kernels.cu"
