// Per-pair arithmetic of the isometry loss, shared by the CPU and CUDA kernels
// (docs/design.md, "Isometry loss").
#pragma once

#include "gsd/common.h"

namespace gsd {

// Squared distance from a dot product and the two squared norms, clamped at 0 (NaN stays NaN).
template <class T> GSD_HD inline T sq_dist(T ni, T nj, T dot) {
  return clamp_min0(ni + nj - T(2) * dot);
}

// The Gram trick loses relative accuracy when a pair is close compared with the norms
// (catastrophic cancellation; also makes exact duplicates come out as tiny non-zero
// distances). Such pairs are recomputed exactly from the rows: sq_dist_exact.
// ONE tolerance per dtype for every backend (docs/design.md, "Close pairs"); the Python
// side holds the same numbers in gsd_kernels/constants.py and _C exposes these.
constexpr double kClosePairTolF32 = 1e-2;
constexpr double kClosePairTolF64 = 1e-6;
template <class T> struct RefineTol;
template <> struct RefineTol<float> {
  GSD_HD static constexpr float value() { return float(kClosePairTolF32); }
};
template <> struct RefineTol<double> {
  GSD_HD static constexpr double value() { return kClosePairTolF64; }
};

// ni + nj == 0 means both (centred) rows are zero: then d2 = 0 is exact and nothing needs
// recomputing (a collapsed batch would otherwise refine all N^2 pairs). `&` not `&&`: the
// CPU loops vectorise it.
template <class T> GSD_HD inline bool sq_dist_unreliable(T d2, T ni, T nj) {
  return (ni + nj > T(0)) & (d2 <= RefineTol<T>::value() * (ni + nj));
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

// The pair epilogue (sqrt, weight, the products w*delta*dz, the coefficients and the sums
// over a tile) runs in double for fp32 inputs too; only the dot products stay in the input
// dtype. A fp32 sqrt of d2 has a small *systematic* rounding bias which, summed over ~N^2
// pairs, shifts S_xz coherently: 2e-4 relative error of the loss at D = d = 12288 (W1).
using EpT = double;

// Pair weight: exp(-dz^2 * inv_two_h2), exactly 1 when inv_two_h2 == 0 (global weighting).
GSD_HD inline EpT pair_weight(EpT dz2, EpT inv_two_h2) {
  return inv_two_h2 == EpT(0) ? EpT(1) : std::exp(-dz2 * inv_two_h2);
}

// Everything the forward sums need for one pair.
struct IsoPair {
  EpT w, delta2, delta, dz2, dz;
};

// From the two squared distances (already clamped / refined), in double.
template <class T> GSD_HD inline IsoPair iso_pair_sq(T delta2, T dz2, EpT inv_two_h2) {
  IsoPair p;
  p.delta2 = EpT(delta2);
  p.dz2 = EpT(dz2);
  p.delta = std::sqrt(p.delta2);
  p.dz = std::sqrt(p.dz2);
  p.w = pair_weight(p.dz2, inv_two_h2);
  return p;
}

// Backward coefficients of one pair:
//   a = w (p delta + q dz) / delta   (0 if delta == 0)
//   b = w (r dz + s delta) / dz      (0 if dz == 0)
GSD_HD inline void iso_coefs(const IsoPair& pr, EpT p, EpT q, EpT r, EpT s, EpT* a, EpT* b) {
  *a = pr.w * (p * pr.delta + q * pr.dz) * inv_or_zero(pr.delta);
  *b = pr.w * (r * pr.dz + s * pr.delta) * inv_or_zero(pr.dz);
}

// Grouped pairs (IsoArgs::groups = g > 0, docs/design.md "Grouped pairs"): row i pairs only
// with the rows of its own block of g consecutive rows, clipped to the column range
// [c0, c1): the columns [*lo, *hi). Those kernels compute each squared distance directly as
// sum_k ((a_k - b_k) sc)^2 (no Gram trick, so no close-pair refine): O(g (D + d)) per row.
GSD_HD inline void group_columns(int64_t i, int64_t g, int64_t c0, int64_t c1, int64_t* lo,
                                 int64_t* hi) {
  const int64_t b = (i / g) * g;
  *lo = b > c0 ? b : c0;
  *hi = (b + g) < c1 ? (b + g) : c1;
}

}  // namespace gsd
