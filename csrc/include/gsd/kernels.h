// Host-side entry points of the CPU and CUDA kernels (raw pointers, sizes, scalars).
// All memory is owned by the caller (the Python layer); kernels needing scratch space
// take a workspace whose size a *_workspace_size function reports.
#pragma once

#include <cstddef>
#include <cstdint>

#include "gsd/common.h"

namespace gsd {

struct IsoArgs {
  // x, z: (N, D) samples and (N, d) latents, row-major. Without means they must be centred
  // already; with means (CPU only) the kernels centre them while packing (x - mean_x).
  const void* x;
  const void* z;
  // (N,) squared row norms of the centred x, z; nullptr (CPU only): computed while packing.
  const void* xn2;
  const void* zn2;
  // (D,), (d,) column means in the dtype of x, or nullptr (inputs already centred). CPU only.
  const void* mean_x = nullptr;
  const void* mean_z = nullptr;
  int64_t N, D, d;
  int64_t r0, r1, c0, c1;  // pair ranges (global row indices)
  double inv_two_h2;       // 0 => global weighting
  int dtype;               // DType
};

// ---------------------------------------------------------------- CPU (OpenMP)
const char* cpu_isa();
int cpu_default_threads();

size_t cpu_iso_workspace_size(const IsoArgs& a, bool backward, int nthreads);
void cpu_iso_forward_sums(const IsoArgs& a, double* out4, void* ws, size_t ws_bytes, int nthreads);
void cpu_iso_backward_rows(const IsoArgs& a, double p, double q, double r, double s, void* gx,
                           void* gz, void* ws, size_t ws_bytes, int nthreads);

void cpu_sid_forward(const void* xg, const void* yr, const void* yf, int64_t N, int64_t K,
                     double alpha, double* loss, double* w, uint8_t* valid, int dtype,
                     int nthreads);
void cpu_sid_backward(const void* xg, const void* yr, const void* yf, int64_t N, int64_t K,
                      double alpha, const double* w, const uint8_t* valid, double scale,
                      void* g_xg, void* g_real, void* g_fake, int dtype, int nthreads);
void cpu_fake_forward(const void* yf, const void* x, int64_t N, int64_t K, double* sq,
                      uint8_t* valid, int dtype, int nthreads);
void cpu_fake_backward(const void* yf, const void* x, int64_t N, int64_t K, const double* coef,
                       void* g_fake, void* g_x, int dtype, int nthreads);

// ---------------------------------------------------------------- CUDA
// `stream` is a cudaStream_t passed as an integer by the Python layer.
#if defined(GSD_WITH_CUDA)
size_t cuda_iso_workspace_size(const IsoArgs& a, bool backward);
void cuda_iso_forward_sums(const IsoArgs& a, double* out4, void* ws, size_t ws_bytes,
                           uintptr_t stream);
void cuda_iso_backward_rows(const IsoArgs& a, double p, double q, double r, double s, void* gx,
                            void* gz, void* ws, size_t ws_bytes, uintptr_t stream);
void cuda_sid_forward(const void* xg, const void* yr, const void* yf, int64_t N, int64_t K,
                      double alpha, double* loss, double* w, uint8_t* valid, int dtype,
                      uintptr_t stream);
void cuda_sid_backward(const void* xg, const void* yr, const void* yf, int64_t N, int64_t K,
                       double alpha, const double* w, const uint8_t* valid, double scale,
                       void* g_xg, void* g_real, void* g_fake, int dtype, uintptr_t stream);
void cuda_fake_forward(const void* yf, const void* x, int64_t N, int64_t K, double* sq,
                       uint8_t* valid, int dtype, uintptr_t stream);
void cuda_fake_backward(const void* yf, const void* x, int64_t N, int64_t K, const double* coef,
                        void* g_fake, void* g_x, int dtype, uintptr_t stream);
#endif

}  // namespace gsd
