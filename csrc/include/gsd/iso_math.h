// Per-pair arithmetic of the isometry loss, shared by the CPU and CUDA kernels
// (docs/design.md, "Isometry loss").
#pragma once

#include "gsd/common.h"

namespace gsd {

// Squared distance from a dot product and the two squared norms, clamped at 0.
template <class T> GSD_HD inline T sq_dist(T ni, T nj, T dot) {
  return clamp_min0(ni + nj - T(2) * dot);
}

// The Gram trick loses relative accuracy when a pair is close compared with the norms
// (catastrophic cancellation; also makes exact duplicates come out as tiny non-zero
// distances). Such pairs are recomputed exactly from the rows: sq_dist_exact.
template <class T> struct RefineTol;
template <> struct RefineTol<float> { GSD_HD static constexpr float value() { return 1e-2f; } };
template <> struct RefineTol<double> { GSD_HD static constexpr double value() { return 1e-6; } };

template <class T> GSD_HD inline bool sq_dist_unreliable(T d2, T ni, T nj) {
  return d2 <= RefineTol<T>::value() * (ni + nj);
}

template <class T> GSD_HD inline T sq_dist_exact(const T* a, const T* b, int64_t K) {
  T s0 = T(0), s1 = T(0);
  int64_t k = 0;
  for (; k + 1 < K; k += 2) {
    const T u = a[k] - b[k], v = a[k + 1] - b[k + 1];
    s0 += u * u;
    s1 += v * v;
  }
  if (k < K) {
    const T u = a[k] - b[k];
    s0 += u * u;
  }
  return s0 + s1;
}

// Pair weight: exp(-dz^2 * inv_two_h2), exactly 1 when inv_two_h2 == 0 (global weighting).
template <class T> GSD_HD inline T pair_weight(T dz2, T inv_two_h2) {
  return inv_two_h2 == T(0) ? T(1) : std::exp(-dz2 * inv_two_h2);
}

// Everything the forward sums need for one pair.
template <class T> struct IsoPair {
  T w, delta2, delta, dz2, dz;
};

// From the two squared distances (already clamped / refined).
template <class T> GSD_HD inline IsoPair<T> iso_pair_sq(T delta2, T dz2, T inv_two_h2) {
  IsoPair<T> p;
  p.delta2 = delta2;
  p.dz2 = dz2;
  p.delta = std::sqrt(p.delta2);
  p.dz = std::sqrt(p.dz2);
  p.w = pair_weight(p.dz2, inv_two_h2);
  return p;
}

// Backward coefficients of one pair:
//   a = w (p delta + q dz) / delta   (0 if delta == 0)
//   b = w (r dz + s delta) / dz      (0 if dz == 0)
template <class T>
GSD_HD inline void iso_coefs(const IsoPair<T>& pr, T p, T q, T r, T s, T* a, T* b) {
  *a = pr.w * (p * pr.delta + q * pr.dz) * inv_or_zero(pr.delta);
  *b = pr.w * (r * pr.dz + s * pr.delta) * inv_or_zero(pr.dz);
}

}  // namespace gsd
