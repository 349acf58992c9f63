// Helpers shared by the CUDA kernels of gsd_kernels._C.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace gsd {
namespace cuda {

inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("gsd_kernels CUDA error in ") + what + ": " +
                             cudaGetErrorString(err));
}

inline void check_launch(const char* what) { check(cudaGetLastError(), what); }

inline cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Sum of a double over a block (blockDim.x a multiple of 32, at most 1024). All threads
// get the result. `scratch` must hold 32 doubles. Fixed reduction order: deterministic.
__device__ inline double block_sum(double v, double* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int nw = blockDim.x >> 5;
  double t = 0.0;
  if (warp == 0) {
    t = lane < nw ? scratch[lane] : 0.0;
    for (int o = 16; o > 0; o >>= 1) t += __shfl_down_sync(0xffffffffu, t, o);
    if (lane == 0) scratch[0] = t;
  }
  __syncthreads();
  return scratch[0];
}

}  // namespace cuda
}  // namespace gsd
