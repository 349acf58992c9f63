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
  // 0-dim float64 factors (CPU only, with the means): the kernels work on
  // (x - mean_x) * scale_x and (z - mean_z) * scale_z; nullptr = 1.
  const double* scale_x = nullptr;
  const double* scale_z = nullptr;
  int64_t N, D, d;
  int64_t r0, r1, c0, c1;  // pair ranges (global row indices)
  // 0: every pair (i, j) of the ranges; g > 0: only those with i / g == j / g (grouped pairs,
  // computed by separate direct kernels in O(N g (D + d)), never the tiled all-pairs ones).
  int64_t groups = 0;
  // 1/(2 h^2) as a 0-dim float64 tensor on the inputs' device (read by the kernels, so the
  // host never waits for it); 0 => global weighting; nullptr => 0.
  const double* inv_two_h2 = nullptr;
  int dtype;  // DType
};

// Backward of the isometry pair sums: coef4 = (p, q, r, s), float64 on the inputs' device.
// gx (gz) is written only when need_x (need_z); it may be null otherwise.
struct IsoGrad {
  const double* coef4;
  bool need_x, need_z;
  void* gx;
  void* gz;
};

// ---------------------------------------------------------------- CPU (OpenMP)
const char* cpu_isa();
int cpu_default_threads();

size_t cpu_iso_workspace_size(const IsoArgs& a, bool backward, int nthreads);
void cpu_iso_forward_sums(const IsoArgs& a, double* out4, void* ws, size_t ws_bytes, int nthreads);
void cpu_iso_backward_rows(const IsoArgs& a, const IsoGrad& g, void* ws, size_t ws_bytes,
                           int nthreads);
// Pairs recomputed exactly (close-pair refine) by the CPU isometry kernels since the last
// reset: a debug counter for tests of the refine predicate.
long long cpu_refine_count();
void cpu_reset_refine_count();

void cpu_sid_forward(const void* xg, const void* yr, const void* yf, int64_t N, int64_t K,
                     double alpha, double* loss, double* w, uint8_t* valid, int dtype,
                     int nthreads);
// scale: 0-dim float64 (grad_output / N) on the inputs' device.
void cpu_sid_backward(const void* xg, const void* yr, const void* yf, int64_t N, int64_t K,
                      double alpha, const double* w, const uint8_t* valid, const double* scale,
                      void* g_xg, void* g_real, void* g_fake, int dtype, int nthreads);
void cpu_fake_forward(const void* yf, const void* x, int64_t N, int64_t K, double* sq,
                      uint8_t* valid, int dtype, int nthreads);
// g_x may be null (not needed): then only g_fake is written.
void cpu_fake_backward(const void* yf, const void* x, int64_t N, int64_t K, const double* coef,
                       void* g_fake, void* g_x, int dtype, int nthreads);

// ---------------------------------------------------------------- CUDA
// `stream` is a cudaStream_t passed as an integer by the Python layer.
#if defined(GSD_WITH_CUDA)
size_t cuda_iso_workspace_size(const IsoArgs& a, bool backward);
void cuda_iso_forward_sums(const IsoArgs& a, double* out4, void* ws, size_t ws_bytes,
                           uintptr_t stream);
void cuda_iso_backward_rows(const IsoArgs& a, const IsoGrad& g, void* ws, size_t ws_bytes,
                            uintptr_t stream);
void cuda_sid_forward(const void* xg, const void* yr, const void* yf, int64_t N, int64_t K,
                      double alpha, double* loss, double* w, uint8_t* valid, int dtype,
                      uintptr_t stream);
void cuda_sid_backward(const void* xg, const void* yr, const void* yf, int64_t N, int64_t K,
                       double alpha, const double* w, const uint8_t* valid, const double* scale,
                       void* g_xg, void* g_real, void* g_fake, int dtype, uintptr_t stream);
void cuda_fake_forward(const void* yf, const void* x, int64_t N, int64_t K, double* sq,
                       uint8_t* valid, int dtype, uintptr_t stream);
void cuda_fake_backward(const void* yf, const void* x, int64_t N, int64_t K, const double* coef,
                        void* g_fake, void* g_x, int dtype, uintptr_t stream);
#endif

}  // namespace gsd
