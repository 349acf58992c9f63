// Per-element arithmetic of the SiD generator loss and of the fake-score (EDM) loss,
// shared by the CPU and CUDA kernels (docs/design.md).
#pragma once

#include "gsd/common.h"

namespace gsd {

constexpr double kSidMinWeight = 1e-5;

template <class T> GSD_HD inline bool finite3(T a, T b, T c) {
  return is_finite(a) & is_finite(b) & is_finite(c);
}

// Loss term of one element: (y_real - y_fake) * ((y_real - x_g) - alpha (y_real - y_fake)).
template <class T> GSD_HD inline T sid_term(T xg, T yr, T yf, T alpha) {
  T a = yr - yf;
  T b = yr - xg;
  return a * (b - alpha * a);
}

// |x_g - y_real|, summed for the per-sample weight.
template <class T> GSD_HD inline T sid_absdiff(T xg, T yr) { return std::fabs(xg - yr); }

// w_n from the summed |x_g - y_real| of a valid row (mean, floored at 1e-5).
GSD_HD inline double sid_weight(double abs_sum, long long K) {
  double m = abs_sum / double(K);
  return m > kSidMinWeight ? m : kSidMinWeight;
}

// Gradients of one element given c_n = scale / w_n (0 for invalid rows).
template <class T>
GSD_HD inline void sid_grads(T xg, T yr, T yf, T alpha, T c, T* g_xg, T* g_real, T* g_fake) {
  T a = yr - yf;
  T b = yr - xg;
  *g_real = c * (b + (T(1) - T(2) * alpha) * a);
  *g_fake = -c * (b - T(2) * alpha * a);
  *g_xg = -c * a;
}

// Fake-score loss: squared difference and gradient of one element.
template <class T> GSD_HD inline T fake_sq(T yf, T x) {
  T d = yf - x;
  return d * d;
}
template <class T> GSD_HD inline T fake_grad(T yf, T x, T coef) { return T(2) * coef * (yf - x); }

}  // namespace gsd
