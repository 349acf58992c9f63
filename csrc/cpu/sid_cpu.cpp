// SiD generator-loss and fake-score (EDM) loss primitives on the CPU (C++ / OpenMP).
//
// One pass over each row per primitive. Rows are spread over threads; when there are
// fewer rows than threads, each row is additionally split into chunks of K (reductions
// then use OpenMP's reduction clause: deterministic for a given thread count).

#include <omp.h>

#include <algorithm>
#include <stdexcept>

#include "gsd/kernels.h"
#include "gsd/sid_math.h"

namespace gsd {
namespace cpu {
namespace {

constexpr int64_t kChunk = 2048;  // elements summed in T before adding into double

struct SidRow {
  double term = 0, abs = 0;
  int bad = 0;
};

// Sums of one slice [k0, k1) of a row.
template <class T>
inline void sid_slice(const T* xg, const T* yr, const T* yf, int64_t k0, int64_t k1, T alpha,
                      double& term, double& abss, int& bad) {
  for (int64_t c0 = k0; c0 < k1; c0 += kChunk) {
    const int64_t c1 = std::min(k1, c0 + kChunk);
    // The loss term in double: for |inputs| ~ 1e20 its products overflow fp32 although the
    // loss itself is representable.
    double t = 0;
    T s = 0;
    int b = 0;
    const double al = double(alpha);
#pragma omp simd reduction(+ : t, s) reduction(| : b)
    for (int64_t k = c0; k < c1; ++k) {
      t += sid_term(double(xg[k]), double(yr[k]), double(yf[k]), al);
      s += sid_absdiff(xg[k], yr[k]);
      b |= finite3(xg[k], yr[k], yf[k]) ? 0 : 1;
    }
    term += t;
    abss += s;
    bad |= b;
  }
}

template <class T>
inline void fake_slice(const T* yf, const T* x, int64_t k0, int64_t k1, double& sq, int& bad) {
  for (int64_t c0 = k0; c0 < k1; c0 += kChunk) {
    const int64_t c1 = std::min(k1, c0 + kChunk);
    double t = 0;  // in double: (y - x)^2 overflows fp32 first
    int b = 0;
#pragma omp simd reduction(+ : t) reduction(| : b)
    for (int64_t k = c0; k < c1; ++k) {
      t += fake_sq(double(yf[k]), double(x[k]));
      b |= (is_finite(yf[k]) & is_finite(x[k])) ? 0 : 1;
    }
    sq += t;
    bad |= b;
  }
}

inline bool split_rows(int64_t N, int64_t K, int nthreads) {
  return N < 2 * int64_t(nthreads) && K >= 4 * kChunk && nthreads > 1;
}

template <class T>
void sid_forward_impl(const T* xg, const T* yr, const T* yf, int64_t N, int64_t K, double alpha,
                      double* loss, double* w, uint8_t* valid, int nthreads) {
  const T al = T(alpha);
  auto finish = [&](int64_t n, double term, double abss, int bad) {
    if (bad) {
      valid[n] = 0;
      w[n] = 1.0;
      loss[n] = 0.0;
    } else {
      valid[n] = 1;
      w[n] = sid_weight(abss, K);
      loss[n] = term / w[n];
    }
  };
  if (split_rows(N, K, nthreads)) {
    for (int64_t n = 0; n < N; ++n) {
      const T *a = xg + n * K, *b = yr + n * K, *c = yf + n * K;
      double term = 0, abss = 0;
      int bad = 0;
      const int64_t nch = (K + kChunk - 1) / kChunk;
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(+ : term, abss) \
    reduction(| : bad)
      for (int64_t ch = 0; ch < nch; ++ch)
        sid_slice(a, b, c, ch * kChunk, std::min(K, (ch + 1) * kChunk), al, term, abss, bad);
      finish(n, term, abss, bad);
    }
  } else {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      double term = 0, abss = 0;
      int bad = 0;
      sid_slice(xg + n * K, yr + n * K, yf + n * K, 0, K, al, term, abss, bad);
      finish(n, term, abss, bad);
    }
  }
}

template <class T>
void sid_backward_impl(const T* xg, const T* yr, const T* yf, int64_t N, int64_t K, double alpha,
                       const double* w, const uint8_t* valid, const double* scale_ptr, T* gxg,
                       T* gre, T* gfa, int nthreads) {
  const T al = T(alpha);
  const double scale = *scale_ptr;
  const int64_t nch = (K + kChunk - 1) / kChunk;
#pragma omp parallel for collapse(2) num_threads(nthreads) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t ch = 0; ch < nch; ++ch) {
      const T c = valid[n] ? T(scale / w[n]) : T(0);
      const int64_t k0 = ch * kChunk, k1 = std::min(K, k0 + kChunk);
      const T *a = xg + n * K, *b = yr + n * K, *f = yf + n * K;
      T *o1 = gxg + n * K, *o2 = gre + n * K, *o3 = gfa + n * K;
#pragma omp simd
      for (int64_t k = k0; k < k1; ++k) {
        T g1, g2, g3;
        sid_grads(a[k], b[k], f[k], al, c, &g1, &g2, &g3);
        // Invalid rows may hold NaN/inf: their gradient is exactly 0.
        o1[k] = c != T(0) ? g1 : T(0);
        o2[k] = c != T(0) ? g2 : T(0);
        o3[k] = c != T(0) ? g3 : T(0);
      }
    }
  }
}

template <class T>
void fake_forward_impl(const T* yf, const T* x, int64_t N, int64_t K, double* sq, uint8_t* valid,
                       int nthreads) {
  if (split_rows(N, K, nthreads)) {
    for (int64_t n = 0; n < N; ++n) {
      double s = 0;
      int bad = 0;
      const int64_t nch = (K + kChunk - 1) / kChunk;
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(+ : s) reduction(| : bad)
      for (int64_t ch = 0; ch < nch; ++ch)
        fake_slice(yf + n * K, x + n * K, ch * kChunk, std::min(K, (ch + 1) * kChunk), s, bad);
      valid[n] = bad ? 0 : 1;
      sq[n] = bad ? 0.0 : s;
    }
  } else {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      double s = 0;
      int bad = 0;
      fake_slice(yf + n * K, x + n * K, 0, K, s, bad);
      valid[n] = bad ? 0 : 1;
      sq[n] = bad ? 0.0 : s;
    }
  }
}

template <class T>
void fake_backward_impl(const T* yf, const T* x, int64_t N, int64_t K, const double* coef, T* gf,
                        T* gx, int nthreads) {
  const int64_t nch = (K + kChunk - 1) / kChunk;
#pragma omp parallel for collapse(2) num_threads(nthreads) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t ch = 0; ch < nch; ++ch) {
      const T c = T(coef[n]);
      const int64_t k0 = ch * kChunk, k1 = std::min(K, k0 + kChunk);
      const T *a = yf + n * K, *b = x + n * K;
      T *o1 = gf + n * K, *o2 = gx ? gx + n * K : nullptr;  // gx null: g_x not needed
      if (o2 != nullptr) {
#pragma omp simd
        for (int64_t k = k0; k < k1; ++k) {
          const T g = c != T(0) ? fake_grad(a[k], b[k], c) : T(0);
          o1[k] = g;
          o2[k] = -g;
        }
      } else {
#pragma omp simd
        for (int64_t k = k0; k < k1; ++k) o1[k] = c != T(0) ? fake_grad(a[k], b[k], c) : T(0);
      }
    }
  }
}

void check(int64_t N, int64_t K, int dtype) {
  if (N < 0 || K < 0) throw std::invalid_argument("negative size");
  if (dtype != kFloat32 && dtype != kFloat64) throw std::invalid_argument("bad dtype code");
}

}  // namespace
}  // namespace cpu

void cpu_sid_forward(const void* xg, const void* yr, const void* yf, int64_t N, int64_t K,
                     double alpha, double* loss, double* w, uint8_t* valid, int dtype,
                     int nthreads) {
  cpu::check(N, K, dtype);
  nthreads = std::max(nthreads, 1);
  if (dtype == kFloat32)
    cpu::sid_forward_impl(static_cast<const float*>(xg), static_cast<const float*>(yr),
                          static_cast<const float*>(yf), N, K, alpha, loss, w, valid, nthreads);
  else
    cpu::sid_forward_impl(static_cast<const double*>(xg), static_cast<const double*>(yr),
                          static_cast<const double*>(yf), N, K, alpha, loss, w, valid, nthreads);
}

void cpu_sid_backward(const void* xg, const void* yr, const void* yf, int64_t N, int64_t K,
                      double alpha, const double* w, const uint8_t* valid, const double* scale,
                      void* g_xg, void* g_real, void* g_fake, int dtype, int nthreads) {
  cpu::check(N, K, dtype);
  nthreads = std::max(nthreads, 1);
  if (dtype == kFloat32)
    cpu::sid_backward_impl(static_cast<const float*>(xg), static_cast<const float*>(yr),
                           static_cast<const float*>(yf), N, K, alpha, w, valid, scale,
                           static_cast<float*>(g_xg), static_cast<float*>(g_real),
                           static_cast<float*>(g_fake), nthreads);
  else
    cpu::sid_backward_impl(static_cast<const double*>(xg), static_cast<const double*>(yr),
                           static_cast<const double*>(yf), N, K, alpha, w, valid, scale,
                           static_cast<double*>(g_xg), static_cast<double*>(g_real),
                           static_cast<double*>(g_fake), nthreads);
}

void cpu_fake_forward(const void* yf, const void* x, int64_t N, int64_t K, double* sq,
                      uint8_t* valid, int dtype, int nthreads) {
  cpu::check(N, K, dtype);
  nthreads = std::max(nthreads, 1);
  if (dtype == kFloat32)
    cpu::fake_forward_impl(static_cast<const float*>(yf), static_cast<const float*>(x), N, K, sq,
                           valid, nthreads);
  else
    cpu::fake_forward_impl(static_cast<const double*>(yf), static_cast<const double*>(x), N, K,
                           sq, valid, nthreads);
}

void cpu_fake_backward(const void* yf, const void* x, int64_t N, int64_t K, const double* coef,
                       void* g_fake, void* g_x, int dtype, int nthreads) {
  cpu::check(N, K, dtype);
  nthreads = std::max(nthreads, 1);
  if (dtype == kFloat32)
    cpu::fake_backward_impl(static_cast<const float*>(yf), static_cast<const float*>(x), N, K,
                            coef, static_cast<float*>(g_fake), static_cast<float*>(g_x),
                            nthreads);
  else
    cpu::fake_backward_impl(static_cast<const double*>(yf), static_cast<const double*>(x), N, K,
                            coef, static_cast<double*>(g_fake), static_cast<double*>(g_x),
                            nthreads);
}

}  // namespace gsd
