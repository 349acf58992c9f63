// SiD generator-loss and fake-score (EDM) loss primitives in CUDA: one block per row for
// the reductions (block reduction in double), grid-stride elementwise kernels for the
// gradients. Per-element arithmetic from gsd/sid_math.h (shared with the CPU kernels).

#include <cstdint>

#include "common.cuh"
#include "gsd/kernels.h"
#include "gsd/sid_math.h"

namespace gsd {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <class T>
__global__ void __launch_bounds__(kThreads)
sid_forward_kernel(const T* __restrict__ xg, const T* __restrict__ yr, const T* __restrict__ yf,
                   int64_t K, T alpha, double* __restrict__ loss, double* __restrict__ w,
                   uint8_t* __restrict__ valid) {
  __shared__ double scratch[32];
  const int64_t n = blockIdx.x;
  const T* a = xg + n * K;
  const T* b = yr + n * K;
  const T* c = yf + n * K;
  double term = 0.0, abss = 0.0;
  int bad = 0;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const T va = a[k], vb = b[k], vc = c[k];
    // in double: the products overflow fp32 for |inputs| ~ 1e20 though the loss does not
    term += sid_term(double(va), double(vb), double(vc), double(alpha));
    abss += double(sid_absdiff(va, vb));
    bad |= finite3(va, vb, vc) ? 0 : 1;
  }
  bad = __syncthreads_or(bad);
  term = block_sum(term, scratch);
  abss = block_sum(abss, scratch);
  if (threadIdx.x == 0) {
    if (bad) {
      valid[n] = 0;
      w[n] = 1.0;
      loss[n] = 0.0;
    } else {
      const double wn = sid_weight(abss, K);
      valid[n] = 1;
      w[n] = wn;
      loss[n] = term / wn;
    }
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads)
sid_backward_kernel(const T* __restrict__ xg, const T* __restrict__ yr, const T* __restrict__ yf,
                    int64_t N, int64_t K, T alpha, const double* __restrict__ w,
                    const uint8_t* __restrict__ valid, const double* __restrict__ scale_ptr,
                    T* __restrict__ gxg, T* __restrict__ gre, T* __restrict__ gfa) {
  const double scale = *scale_ptr;  // grad_output / N, a device value: no host sync
  // 2-D grid (review S9): rows along y, the row's elements along x, so the row
  // coefficient c_n (an fp64 division) is formed once per row and thread, and no
  // element needs an int64 division to find its row.
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    const T c = valid[n] ? T(scale / w[n]) : T(0);
    const int64_t base = n * K;
    for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < K;
         k += int64_t(gridDim.x) * blockDim.x) {
      const int64_t idx = base + k;
      T g1 = T(0), g2 = T(0), g3 = T(0);
      if (c != T(0)) sid_grads(xg[idx], yr[idx], yf[idx], alpha, c, &g1, &g2, &g3);
      gxg[idx] = g1;
      gre[idx] = g2;
      gfa[idx] = g3;
    }
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads)
fake_forward_kernel(const T* __restrict__ yf, const T* __restrict__ x, int64_t K,
                    double* __restrict__ sq, uint8_t* __restrict__ valid) {
  __shared__ double scratch[32];
  const int64_t n = blockIdx.x;
  const T* a = yf + n * K;
  const T* b = x + n * K;
  double s = 0.0;
  int bad = 0;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const T va = a[k], vb = b[k];
    s += fake_sq(double(va), double(vb));
    bad |= (is_finite(va) & is_finite(vb)) ? 0 : 1;
  }
  bad = __syncthreads_or(bad);
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) {
    valid[n] = bad ? 0 : 1;
    sq[n] = bad ? 0.0 : s;
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads)
fake_backward_kernel(const T* __restrict__ yf, const T* __restrict__ x, int64_t N, int64_t K,
                     const double* __restrict__ coef, T* __restrict__ gf, T* __restrict__ gx) {
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {  // 2-D grid as sid_backward_kernel
    const T c = T(coef[n]);
    const int64_t base = n * K;
    for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < K;
         k += int64_t(gridDim.x) * blockDim.x) {
      const int64_t idx = base + k;
      const T g = c != T(0) ? fake_grad(yf[idx], x[idx], c) : T(0);
      gf[idx] = g;
      if (gx != nullptr) gx[idx] = -g;  // null: g_x not needed
    }
  }
}

// Grid of the per-row elementwise kernels: x over a row's K elements, y over rows (both
// grid-strided, so any N, K fit the launch limits), about <= 2^22 blocks in all.
dim3 row_grid(int64_t N, int64_t K) {
  int64_t bx = cdiv(K, kThreads);
  bx = bx < 1 ? 1 : (bx > 1024 ? 1024 : bx);
  int64_t by = N < 1 ? 1 : (N > 65535 ? 65535 : N);
  if (bx * by > (int64_t(1) << 22)) bx = (int64_t(1) << 22) / by > 0 ? (int64_t(1) << 22) / by : 1;
  return dim3(unsigned(bx), unsigned(by));
}

void check_sizes(int64_t N, int64_t K, int dtype) {
  if (N < 0 || K < 0) throw std::invalid_argument("negative size");
  if (N > 0x7fffffffLL) throw std::invalid_argument("too many rows for the CUDA kernels");
  if (dtype != kFloat32 && dtype != kFloat64) throw std::invalid_argument("bad dtype code");
}

}  // namespace
}  // namespace cuda

void cuda_sid_forward(const void* xg, const void* yr, const void* yf, int64_t N, int64_t K,
                      double alpha, double* loss, double* w, uint8_t* valid, int dtype,
                      uintptr_t stream) {
  using namespace cuda;
  check_sizes(N, K, dtype);
  if (N == 0) return;
  cudaStream_t st = as_stream(stream);
  if (dtype == kFloat32)
    sid_forward_kernel<float><<<unsigned(N), kThreads, 0, st>>>(
        static_cast<const float*>(xg), static_cast<const float*>(yr),
        static_cast<const float*>(yf), K, float(alpha), loss, w, valid);
  else
    sid_forward_kernel<double><<<unsigned(N), kThreads, 0, st>>>(
        static_cast<const double*>(xg), static_cast<const double*>(yr),
        static_cast<const double*>(yf), K, alpha, loss, w, valid);
  check_launch("sid_forward");
}

void cuda_sid_backward(const void* xg, const void* yr, const void* yf, int64_t N, int64_t K,
                       double alpha, const double* w, const uint8_t* valid, const double* scale,
                       void* g_xg, void* g_real, void* g_fake, int dtype, uintptr_t stream) {
  using namespace cuda;
  check_sizes(N, K, dtype);
  if (N * K == 0) return;
  cudaStream_t st = as_stream(stream);
  const dim3 blocks = row_grid(N, K);
  if (dtype == kFloat32)
    sid_backward_kernel<float><<<blocks, kThreads, 0, st>>>(
        static_cast<const float*>(xg), static_cast<const float*>(yr),
        static_cast<const float*>(yf), N, K, float(alpha), w, valid, scale,
        static_cast<float*>(g_xg), static_cast<float*>(g_real), static_cast<float*>(g_fake));
  else
    sid_backward_kernel<double><<<blocks, kThreads, 0, st>>>(
        static_cast<const double*>(xg), static_cast<const double*>(yr),
        static_cast<const double*>(yf), N, K, alpha, w, valid, scale,
        static_cast<double*>(g_xg), static_cast<double*>(g_real), static_cast<double*>(g_fake));
  check_launch("sid_backward");
}

void cuda_fake_forward(const void* yf, const void* x, int64_t N, int64_t K, double* sq,
                       uint8_t* valid, int dtype, uintptr_t stream) {
  using namespace cuda;
  check_sizes(N, K, dtype);
  if (N == 0) return;
  cudaStream_t st = as_stream(stream);
  if (dtype == kFloat32)
    fake_forward_kernel<float><<<unsigned(N), kThreads, 0, st>>>(
        static_cast<const float*>(yf), static_cast<const float*>(x), K, sq, valid);
  else
    fake_forward_kernel<double><<<unsigned(N), kThreads, 0, st>>>(
        static_cast<const double*>(yf), static_cast<const double*>(x), K, sq, valid);
  check_launch("fake_forward");
}

void cuda_fake_backward(const void* yf, const void* x, int64_t N, int64_t K, const double* coef,
                        void* g_fake, void* g_x, int dtype, uintptr_t stream) {
  using namespace cuda;
  check_sizes(N, K, dtype);
  if (N * K == 0) return;
  cudaStream_t st = as_stream(stream);
  const dim3 blocks = row_grid(N, K);
  if (dtype == kFloat32)
    fake_backward_kernel<float><<<blocks, kThreads, 0, st>>>(
        static_cast<const float*>(yf), static_cast<const float*>(x), N, K, coef,
        static_cast<float*>(g_fake), static_cast<float*>(g_x));
  else
    fake_backward_kernel<double><<<blocks, kThreads, 0, st>>>(
        static_cast<const double*>(yf), static_cast<const double*>(x), N, K, coef,
        static_cast<double*>(g_fake), static_cast<double*>(g_x));
  check_launch("fake_backward");
}

}  // namespace gsd
