// Isometry-loss primitives in CUDA: tiled shared-memory kernels in plain FMA arithmetic
// (fp32 or fp64), never an N x N matrix. Per-pair arithmetic from gsd/iso_math.h (the pair
// epilogue in double). This is the portable FP32 SIMT *fallback* (no tensor cores, no
// cp.async pipelining): on H100 it is estimated at ~0.5x the eager reference at N=8192,
// D=d=3072 (docs/design.md, "CUDA backend"); `auto` prefers the Triton kernels on CUDA.
//
// Scalars computed from data (1/(2h^2), the coefficients p, q, r, s) are read by the kernels
// from device memory, so no launch waits for a value on the host.
//
// Forward: one block per tile pair (only I <= J for the full square, off-diagonal tile
// pairs counted twice); each block writes its partial sums (double) to the workspace and
// a second kernel reduces them in a fixed order (deterministic).
//
// Grouped pairs (IsoArgs::groups > 0): direct one-block-per-row kernels ("grouped pairs").
//
// Backward: row-stationary. Block (I, s) owns row tile I and the column tiles
// J = s, s + S, s + 2S, ...; per column tile it recomputes the dot products, forms the
// coefficient tile in shared memory and accumulates (A @ X_J) for its rows into its own
// slice s of a partial-sum workspace (no atomics, no races). A final kernel forms
// gx_i = x_i * rowsum_i - sum_s P[s]_i.

#include <cstdint>

#include "common.cuh"
#include "gsd/iso_math.h"
#include "gsd/kernels.h"

namespace gsd {
namespace cuda {
namespace {

constexpr int kThreads = 256;  // 16 x 16
constexpr int kKC = 16;        // k-chunk staged in shared memory

// Tile rows per block: 64 (4 x 4 per thread) in fp32, 32 (2 x 2 per thread) in fp64.
template <class T> struct Cfg;
template <> struct Cfg<float> { static constexpr int BM = 64; };
template <> struct Cfg<double> { static constexpr int BM = 32; };

template <class T> struct Smem {
  static constexpr int BM = Cfg<T>::BM;
  // Staged rows (k-major), each k-row padded by 4 elements: the 16 lanes that stage one row
  // write kk*(BM+4) + row, which spreads them over banks (4*kk + row) mod 32 (at most 2-way)
  // instead of one bank (16-way conflict with BM = 64); (BM+4)*sizeof(T) stays a multiple
  // of 16 bytes, so the compute loop keeps its 128-bit shared loads.
  T a[kKC][BM + 4];  // staged rows of the row tile
  T b[kKC][BM + 4];  // staged rows of the column tile
  T coef[BM][BM + 1];  // coefficient tile a_ij (or b_ij), [i][j]
  T xc[BM][BM + 1];    // chunk of BM columns of X_J, [j][col]
};

// acc[m][n] = X[gi0 + ty*TM + m] . X[gj0 + tx*TM + n] (0 for rows past iend / jend).
template <class T>
__device__ inline void dot_tile(const T* __restrict__ X, int64_t K, int64_t gi0, int64_t iend,
                                int64_t gj0, int64_t jend, Smem<T>& sm,
                                T (&acc)[Cfg<T>::BM / 16][Cfg<T>::BM / 16]) {
  constexpr int BM = Cfg<T>::BM;
  constexpr int TM = BM / 16;
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
#pragma unroll
  for (int m = 0; m < TM; ++m)
#pragma unroll
    for (int n = 0; n < TM; ++n) acc[m][n] = T(0);
  for (int64_t k0 = 0; k0 < K; k0 += kKC) {
#pragma unroll
    for (int e = 0; e < BM * kKC / kThreads; ++e) {
      const int idx = threadIdx.x + e * kThreads;
      const int row = idx / kKC, kk = idx % kKC;
      const int64_t k = k0 + kk;
      const int64_t gi = gi0 + row, gj = gj0 + row;
      sm.a[kk][row] = (gi < iend && k < K) ? X[gi * K + k] : T(0);
      sm.b[kk][row] = (gj < jend && k < K) ? X[gj * K + k] : T(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kKC; ++kk) {
      T av[TM], bv[TM];
#pragma unroll
      for (int m = 0; m < TM; ++m) av[m] = sm.a[kk][ty * TM + m];
#pragma unroll
      for (int n = 0; n < TM; ++n) bv[n] = sm.b[kk][tx * TM + n];
#pragma unroll
      for (int m = 0; m < TM; ++m)
#pragma unroll
        for (int n = 0; n < TM; ++n) acc[m][n] = fma(av[m], bv[n], acc[m][n]);
    }
    __syncthreads();
  }
}

// Squared distances of one pair from the dot products, refined where the Gram trick cancels.
template <class T>
__device__ inline IsoPair pair_from_dots(const T* __restrict__ x, const T* __restrict__ z,
                                         int64_t D, int64_t d, int64_t gi, int64_t gj, T xni,
                                         T xnj, T dotx, T zni, T znj, T dotz, double inv_two_h2) {
  T dx2 = sq_dist(xni, xnj, dotx);
  if (sq_dist_unreliable(dx2, xni, xnj)) dx2 = sq_dist_exact(x + gi * D, x + gj * D, D);
  T dz2 = sq_dist(zni, znj, dotz);
  if (sq_dist_unreliable(dz2, zni, znj)) dz2 = sq_dist_exact(z + gi * d, z + gj * d, d);
  return iso_pair_sq(dx2, dz2, inv_two_h2);
}

// Linear index of an unordered tile pair -> (I, J) with I <= J.
__device__ inline void tri_pair(int64_t b, int64_t& I, int64_t& J) {
  int64_t j = int64_t((sqrt(8.0 * double(b) + 1.0) - 1.0) * 0.5);
  while (j * (j + 1) / 2 > b) --j;
  while ((j + 1) * (j + 2) / 2 <= b) ++j;
  J = j;
  I = b - j * (j + 1) / 2;
}

template <class T>
__global__ void __launch_bounds__(kThreads)
iso_forward_kernel(const T* __restrict__ x, const T* __restrict__ z, const T* __restrict__ xn2,
                   const T* __restrict__ zn2, int64_t D, int64_t d, int64_t r0, int64_t r1,
                   int64_t c0, int64_t c1, int64_t nTC, bool sym,
                   const double* __restrict__ inv_two_h2_ptr, double* __restrict__ partial) {
  constexpr int BM = Cfg<T>::BM;
  constexpr int TM = BM / 16;
  __shared__ Smem<T> sm;
  __shared__ double scratch[32];
  int64_t I, J;
  if (sym) {
    tri_pair(blockIdx.x, I, J);
  } else {
    I = blockIdx.x / nTC;
    J = blockIdx.x % nTC;
  }
  const int64_t gi0 = r0 + I * BM, gj0 = c0 + J * BM;
  const double inv_two_h2 = *inv_two_h2_ptr;
  T ax[TM][TM], az[TM][TM];
  dot_tile(x, D, gi0, r1, gj0, c1, sm, ax);
  dot_tile(z, d, gi0, r1, gj0, c1, sm, az);
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma unroll
  for (int m = 0; m < TM; ++m) {
    const int64_t gi = gi0 + ty * TM + m;
    if (gi >= r1) continue;
    const T xni = xn2[gi], zni = zn2[gi];
#pragma unroll
    for (int n = 0; n < TM; ++n) {
      const int64_t gj = gj0 + tx * TM + n;
      if (gj >= c1 || gj == gi) continue;
      const IsoPair p = pair_from_dots(x, z, D, d, gi, gj, xni, xn2[gj], ax[m][n], zni,
                                       zn2[gj], az[m][n], inv_two_h2);
      s0 += p.w;
      s1 += p.w * p.delta2;
      s2 += p.w * p.delta * p.dz;
      s3 += p.w * p.dz2;
    }
  }
  const double f = (sym && I != J) ? 2.0 : 1.0;
  const double t0 = block_sum(s0, scratch);
  const double t1 = block_sum(s1, scratch);
  const double t2 = block_sum(s2, scratch);
  const double t3 = block_sum(s3, scratch);
  if (threadIdx.x == 0) {
    double* o = partial + 4 * int64_t(blockIdx.x);
    o[0] = f * t0;
    o[1] = f * t1;
    o[2] = f * t2;
    o[3] = f * t3;
  }
}

__global__ void __launch_bounds__(kThreads)
reduce_partials_kernel(const double* __restrict__ partial, int64_t nblocks,
                       double* __restrict__ out4) {
  __shared__ double scratch[32];
  for (int c = 0; c < 4; ++c) {
    double s = 0.0;
    for (int64_t b = threadIdx.x; b < nblocks; b += blockDim.x) s += partial[4 * b + c];
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) out4[c] = s;
  }
}

// out[(s*R + i) * K + k] += sum_j coef[i][j] * X[gj0 + j][k] for the rows of this block.
template <class T>
__device__ inline void apply_coef(const T* __restrict__ X, int64_t K, int64_t gj0, int64_t jend,
                                  int64_t irow0, int64_t iend_local, Smem<T>& sm,
                                  T* __restrict__ out) {
  constexpr int BM = Cfg<T>::BM;
  constexpr int TM = BM / 16;
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  for (int64_t k0 = 0; k0 < K; k0 += BM) {
    // Stage BM rows x BM columns of X_J (coalesced along k).
#pragma unroll
    for (int e = 0; e < BM * BM / kThreads; ++e) {
      const int idx = threadIdx.x + e * kThreads;
      const int j = idx / BM, kk = idx % BM;
      const int64_t gj = gj0 + j, k = k0 + kk;
      sm.xc[j][kk] = (gj < jend && k < K) ? X[gj * K + k] : T(0);
    }
    __syncthreads();
    T acc[TM][TM];
#pragma unroll
    for (int m = 0; m < TM; ++m)
#pragma unroll
      for (int n = 0; n < TM; ++n) acc[m][n] = T(0);
    for (int j = 0; j < BM; ++j) {
      T cv[TM], xv[TM];
#pragma unroll
      for (int m = 0; m < TM; ++m) cv[m] = sm.coef[ty * TM + m][j];
#pragma unroll
      for (int n = 0; n < TM; ++n) xv[n] = sm.xc[j][tx + 16 * n];
#pragma unroll
      for (int m = 0; m < TM; ++m)
#pragma unroll
        for (int n = 0; n < TM; ++n) acc[m][n] = fma(cv[m], xv[n], acc[m][n]);
    }
#pragma unroll
    for (int m = 0; m < TM; ++m) {
      const int64_t il = irow0 + ty * TM + m;  // local row (relative to r0)
      if (il >= iend_local) continue;
#pragma unroll
      for (int n = 0; n < TM; ++n) {
        const int64_t k = k0 + tx + 16 * n;  // columns strided by 16: coalesced stores
        if (k < K) out[il * K + k] += acc[m][n];
      }
    }
    __syncthreads();
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads, 1)  // 1 CTA/SM anyway (> 128 registers in fp32); without
// the explicit 1 ptxas caps the fp64 variant at 80 registers and spills
iso_backward_kernel(const T* __restrict__ x, const T* __restrict__ z, const T* __restrict__ xn2,
                    const T* __restrict__ zn2, int64_t D, int64_t d, int64_t r0, int64_t r1,
                    int64_t c0, int64_t c1, int64_t nTC,
                    const double* __restrict__ inv_two_h2_ptr, const double* __restrict__ coef4,
                    bool need_x, bool need_z, T* __restrict__ Px, T* __restrict__ Pz,
                    double* __restrict__ RSa, double* __restrict__ RSb) {
  constexpr int BM = Cfg<T>::BM;
  constexpr int TM = BM / 16;
  __shared__ Smem<T> sm;
  const int64_t I = blockIdx.x;
  const int64_t split = blockIdx.y, S = gridDim.y;
  const int64_t R = r1 - r0;
  const int64_t gi0 = r0 + I * BM;
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const double inv_two_h2 = *inv_two_h2_ptr;
  const double p = coef4[0], q = coef4[1], r = coef4[2], s = coef4[3];
  T* px = need_x ? Px + split * R * D : nullptr;
  T* pz = need_z ? Pz + split * R * d : nullptr;
  double rsa[TM], rsb[TM];  // row sums of the T-rounded coefficients
#pragma unroll
  for (int m = 0; m < TM; ++m) rsa[m] = rsb[m] = 0.0;

  for (int64_t J = split; J < nTC; J += S) {
    const int64_t gj0 = c0 + J * BM;
    T ax[TM][TM], az[TM][TM];
    dot_tile(x, D, gi0, r1, gj0, c1, sm, ax);
    dot_tile(z, d, gi0, r1, gj0, c1, sm, az);
    // Coefficients, kept in registers: a in ax, b in az.
#pragma unroll
    for (int m = 0; m < TM; ++m) {
      const int64_t gi = gi0 + ty * TM + m;
      const bool row_ok = gi < r1;
      const T xni = row_ok ? xn2[gi] : T(0), zni = row_ok ? zn2[gi] : T(0);
#pragma unroll
      for (int n = 0; n < TM; ++n) {
        const int64_t gj = gj0 + tx * TM + n;
        T av = T(0), bv = T(0);
        if (row_ok && gj < c1 && gj != gi) {
          const IsoPair pr = pair_from_dots(x, z, D, d, gi, gj, xni, xn2[gj], ax[m][n], zni,
                                            zn2[gj], az[m][n], inv_two_h2);
          double ad, bd;
          iso_coefs(pr, p, q, r, s, &ad, &bd);
          av = T(ad);  // rounded once: the row sums add the values the apply uses
          bv = T(bd);
        }
        ax[m][n] = av;
        az[m][n] = bv;
        rsa[m] += double(av);
        rsb[m] += double(bv);
      }
    }
    // need_x / need_z are uniform over the grid: skipping keeps the barriers uniform.
    // x: A @ X_J
    if (need_x) {
#pragma unroll
      for (int m = 0; m < TM; ++m)
#pragma unroll
        for (int n = 0; n < TM; ++n) sm.coef[ty * TM + m][tx * TM + n] = ax[m][n];
      __syncthreads();
      apply_coef(x, D, gj0, c1, I * BM, R, sm, px);
    }
    // z: B @ Z_J (apply_coef ends with a barrier, so coef can be overwritten)
    if (need_z) {
#pragma unroll
      for (int m = 0; m < TM; ++m)
#pragma unroll
        for (int n = 0; n < TM; ++n) sm.coef[ty * TM + m][tx * TM + n] = az[m][n];
      __syncthreads();
      apply_coef(z, d, gj0, c1, I * BM, R, sm, pz);
    }
  }
  // Row sums: reduce over the 16 threads (tx) sharing a row; they sit in one warp.
#pragma unroll
  for (int m = 0; m < TM; ++m) {
    double va = rsa[m], vb = rsb[m];
    for (int o = 8; o > 0; o >>= 1) {
      va += __shfl_xor_sync(0xffffffffu, va, o);
      vb += __shfl_xor_sync(0xffffffffu, vb, o);
    }
    const int64_t il = I * BM + ty * TM + m;
    if (tx == 0 && il < R) {
      RSa[split * R + il] = va;
      RSb[split * R + il] = vb;
    }
  }
}

// g[i][k] = X[r0 + i][k] * sum_s RS[s][i] - sum_s P[s][i][k]
template <class T>
__global__ void __launch_bounds__(kThreads)
finalize_kernel(const T* __restrict__ X, int64_t K, int64_t r0, int64_t R, int64_t S,
                const T* __restrict__ P, const double* __restrict__ RS, T* __restrict__ g) {
  const int64_t total = R * K;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = idx / K;
    double rs = 0.0;
    T acc = T(0);
    for (int64_t sp = 0; sp < S; ++sp) {
      rs += RS[sp * R + i];
      acc += P[sp * total + idx];
    }
    g[idx] = X[(r0 + i) * K + (idx - i * K)] * T(rs) - acc;
  }
}

// ---------------------------------------------------------------- grouped pairs
// IsoArgs::groups = g > 0: row i pairs only with its own block of g rows (group_columns).
// One block per row: each squared distance is a block sum of (a_k - b_k)^2 in double from
// the centred rows (no Gram trick, no close-pair refine), the pair epilogue is the shared
// one; O(R g (D + d)) work, deterministic (fixed reduction order, each row owned by one block).
template <class T>
__device__ inline double block_diff_sq(const T* __restrict__ a, const T* __restrict__ b, int64_t K,
                                       double* scratch) {
  double s = 0.0;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const double u = double(a[k] - b[k]);
    s += u * u;
  }
  return block_sum(s, scratch);
}

template <class T>
__global__ void __launch_bounds__(kThreads)
iso_grouped_forward_kernel(const T* __restrict__ x, const T* __restrict__ z, int64_t D, int64_t d,
                           int64_t r0, int64_t c0, int64_t c1, int64_t groups,
                           const double* __restrict__ inv_two_h2_ptr, double* __restrict__ rows) {
  __shared__ double scratch[32];
  const int64_t t = blockIdx.x, i = r0 + t;
  const double h = *inv_two_h2_ptr;
  int64_t lo, hi;
  group_columns(i, groups, c0, c1, &lo, &hi);
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
  for (int64_t j = lo; j < hi; ++j) {
    if (j == i) continue;
    const double dx2 = block_diff_sq(x + i * D, x + j * D, D, scratch);
    const double dz2 = block_diff_sq(z + i * d, z + j * d, d, scratch);
    const IsoPair pr = iso_pair_sq(dx2, dz2, h);
    s0 += pr.w;
    s1 += pr.w * pr.delta2;
    s2 += pr.w * pr.delta * pr.dz;
    s3 += pr.w * pr.dz2;
  }
  if (threadIdx.x == 0) {
    rows[4 * t] = s0;
    rows[4 * t + 1] = s1;
    rows[4 * t + 2] = s2;
    rows[4 * t + 3] = s3;
  }
}

// gx_i = sum_j a_ij (x_i - x_j), gz_i = sum_j b_ij (z_i - z_j); every thread updates the same
// elements k of the block's own output row for every j (no races, no atomics).
template <class T>
__global__ void __launch_bounds__(kThreads)
iso_grouped_backward_kernel(const T* __restrict__ x, const T* __restrict__ z, int64_t D, int64_t d,
                            int64_t r0, int64_t c0, int64_t c1, int64_t groups,
                            const double* __restrict__ inv_two_h2_ptr,
                            const double* __restrict__ coef4, bool need_x, bool need_z,
                            T* __restrict__ gx, T* __restrict__ gz) {
  __shared__ double scratch[32];
  const int64_t t = blockIdx.x, i = r0 + t;
  const double h = *inv_two_h2_ptr;
  const double p = coef4[0], q = coef4[1], r = coef4[2], s = coef4[3];
  const T* xi = x + i * D;
  const T* zi = z + i * d;
  T* gxi = need_x ? gx + t * D : nullptr;
  T* gzi = need_z ? gz + t * d : nullptr;
  if (gxi)
    for (int64_t k = threadIdx.x; k < D; k += blockDim.x) gxi[k] = T(0);
  if (gzi)
    for (int64_t k = threadIdx.x; k < d; k += blockDim.x) gzi[k] = T(0);
  int64_t lo, hi;
  group_columns(i, groups, c0, c1, &lo, &hi);
  for (int64_t j = lo; j < hi; ++j) {
    if (j == i) continue;
    const T* xj = x + j * D;
    const T* zj = z + j * d;
    const IsoPair pr =
        iso_pair_sq(block_diff_sq(xi, xj, D, scratch), block_diff_sq(zi, zj, d, scratch), h);
    double ad, bd;
    iso_coefs(pr, p, q, r, s, &ad, &bd);
    if (gxi) {
      const T av = T(ad);
      for (int64_t k = threadIdx.x; k < D; k += blockDim.x) gxi[k] += av * (xi[k] - xj[k]);
    }
    if (gzi) {
      const T bv = T(bd);
      for (int64_t k = threadIdx.x; k < d; k += blockDim.x) gzi[k] += bv * (zi[k] - zj[k]);
    }
  }
}

// ---------------------------------------------------------------- host side
struct Plan {
  int64_t BM, nTR, nTC, R, C, S, nblocks;
  bool sym;
  size_t off_px, off_pz, off_rsa, off_rsb, off_partial, total;
};

size_t align256(size_t v) { return (v + 255) / 256 * 256; }

Plan make_plan(const IsoArgs& a, bool backward) {
  if (a.dtype != kFloat32 && a.dtype != kFloat64) throw std::invalid_argument("bad dtype code");
  if (!(0 <= a.r0 && a.r0 <= a.r1 && a.r1 <= a.N && 0 <= a.c0 && a.c0 <= a.c1 && a.c1 <= a.N))
    throw std::invalid_argument("pair ranges must satisfy 0 <= r0 <= r1 <= N, 0 <= c0 <= c1 <= N");
  if (a.groups < 0) throw std::invalid_argument("groups must be >= 0 (0: all pairs)");
  Plan P{};
  P.BM = a.dtype == kFloat32 ? Cfg<float>::BM : Cfg<double>::BM;
  const size_t ts = a.dtype == kFloat32 ? 4 : 8;
  P.R = a.r1 - a.r0;
  P.C = a.c1 - a.c0;
  P.nTR = cdiv(P.R, P.BM);
  P.nTC = cdiv(P.C, P.BM);
  P.sym = (a.r0 == a.c0 && a.r1 == a.c1);
  size_t off = 0;
  if (a.groups > 0) {  // grouped kernels: one block per row; the forward keeps 4 sums per row
    P.nblocks = P.R;
    P.S = 1;
    if (!backward) {
      P.off_partial = off;
      off += align256(size_t(P.R) * 4 * sizeof(double));
    }
  } else if (backward) {
    // Enough blocks to fill a large GPU, at most 4 partial slices.
    int64_t S = P.nTR > 0 ? cdiv(264, P.nTR) : 1;
    S = S < 1 ? 1 : (S > 4 ? 4 : S);
    if (S > P.nTC) S = P.nTC > 0 ? P.nTC : 1;
    P.S = S;
    P.off_px = off; off += align256(size_t(S) * P.R * a.D * ts);
    P.off_pz = off; off += align256(size_t(S) * P.R * a.d * ts);
    P.off_rsa = off; off += align256(size_t(S) * P.R * sizeof(double));
    P.off_rsb = off; off += align256(size_t(S) * P.R * sizeof(double));
  } else {
    P.nblocks = P.sym ? P.nTR * (P.nTR + 1) / 2 : P.nTR * P.nTC;
    P.off_partial = off; off += align256(size_t(P.nblocks) * 4 * sizeof(double));
  }
  P.total = off;
  return P;
}

template <class T>
void forward_impl(const IsoArgs& a, const Plan& P, double* out4, char* ws, cudaStream_t st) {
  double* partial = reinterpret_cast<double*>(ws + P.off_partial);
  if (P.nblocks > 0x7fffffffLL) throw std::invalid_argument("too many tiles for the CUDA grid");
  iso_forward_kernel<T><<<unsigned(P.nblocks), kThreads, 0, st>>>(
      static_cast<const T*>(a.x), static_cast<const T*>(a.z), static_cast<const T*>(a.xn2),
      static_cast<const T*>(a.zn2), a.D, a.d, a.r0, a.r1, a.c0, a.c1, P.nTC, P.sym,
      a.inv_two_h2, partial);
  check_launch("iso_forward_sums");
  reduce_partials_kernel<<<1, kThreads, 0, st>>>(partial, P.nblocks, out4);
  check_launch("iso_forward_sums (reduce)");
}

template <class T>
void grouped_forward_impl(const IsoArgs& a, const Plan& P, double* out4, char* ws,
                          cudaStream_t st) {
  double* rows = reinterpret_cast<double*>(ws + P.off_partial);
  if (P.R > 0x7fffffffLL) throw std::invalid_argument("too many rows for the CUDA grid");
  iso_grouped_forward_kernel<T><<<unsigned(P.R), kThreads, 0, st>>>(
      static_cast<const T*>(a.x), static_cast<const T*>(a.z), a.D, a.d, a.r0, a.c0, a.c1,
      a.groups, a.inv_two_h2, rows);
  check_launch("iso_forward_sums (grouped)");
  reduce_partials_kernel<<<1, kThreads, 0, st>>>(rows, P.R, out4);
  check_launch("iso_forward_sums (grouped reduce)");
}

template <class T>
void grouped_backward_impl(const IsoArgs& a, const Plan& P, const IsoGrad& g, cudaStream_t st) {
  if (P.R > 0x7fffffffLL) throw std::invalid_argument("too many rows for the CUDA grid");
  iso_grouped_backward_kernel<T><<<unsigned(P.R), kThreads, 0, st>>>(
      static_cast<const T*>(a.x), static_cast<const T*>(a.z), a.D, a.d, a.r0, a.c0, a.c1,
      a.groups, a.inv_two_h2, g.coef4, g.need_x, g.need_z, static_cast<T*>(g.gx),
      static_cast<T*>(g.gz));
  check_launch("iso_backward_rows (grouped)");
}

template <class T>
void backward_impl(const IsoArgs& a, const Plan& P, const IsoGrad& g, char* ws,
                   cudaStream_t st) {
  T* gx = static_cast<T*>(g.gx);
  T* gz = static_cast<T*>(g.gz);
  T* Px = reinterpret_cast<T*>(ws + P.off_px);
  T* Pz = reinterpret_cast<T*>(ws + P.off_pz);
  double* RSa = reinterpret_cast<double*>(ws + P.off_rsa);
  double* RSb = reinterpret_cast<double*>(ws + P.off_rsb);
  check(cudaMemsetAsync(ws, 0, P.total, st), "iso_backward_rows (memset)");
  if (P.nTR > 0x7fffffffLL) throw std::invalid_argument("too many tiles for the CUDA grid");
  dim3 grid(unsigned(P.nTR), unsigned(P.S));
  iso_backward_kernel<T><<<grid, kThreads, 0, st>>>(
      static_cast<const T*>(a.x), static_cast<const T*>(a.z), static_cast<const T*>(a.xn2),
      static_cast<const T*>(a.zn2), a.D, a.d, a.r0, a.r1, a.c0, a.c1, P.nTC, a.inv_two_h2,
      g.coef4, g.need_x, g.need_z, Px, Pz, RSa, RSb);
  check_launch("iso_backward_rows");
  auto blocks = [](int64_t total) {
    int64_t b = cdiv(total, kThreads);
    return unsigned(b < 1 ? 1 : (b > 65535 * 8 ? 65535 * 8 : b));
  };
  if (g.need_x && P.R * a.D > 0)
    finalize_kernel<T><<<blocks(P.R * a.D), kThreads, 0, st>>>(
        static_cast<const T*>(a.x), a.D, a.r0, P.R, P.S, Px, RSa, gx);
  if (g.need_z && P.R * a.d > 0)
    finalize_kernel<T><<<blocks(P.R * a.d), kThreads, 0, st>>>(
        static_cast<const T*>(a.z), a.d, a.r0, P.R, P.S, Pz, RSb, gz);
  check_launch("iso_backward_rows (finalize)");
}

}  // namespace
}  // namespace cuda

// The CUDA kernels take centred inputs with their squared norms (the Python layer makes
// them); in-kernel centring (IsoArgs::mean_x / mean_z) is a CPU-only feature.
static void require_centred(const IsoArgs& a, const char* what) {
  if (a.mean_x != nullptr || a.mean_z != nullptr || a.scale_x != nullptr ||
      a.scale_z != nullptr || a.xn2 == nullptr || a.zn2 == nullptr)
    throw std::invalid_argument(std::string(what) +
                                ": the CUDA kernels take centred x, z and their squared norms "
                                "(no column means)");
}

size_t cuda_iso_workspace_size(const IsoArgs& a, bool backward) {
  return cuda::make_plan(a, backward).total;
}

void cuda_iso_forward_sums(const IsoArgs& a, double* out4, void* ws, size_t ws_bytes,
                           uintptr_t stream) {
  require_centred(a, "iso_forward_sums");
  const cuda::Plan P = cuda::make_plan(a, false);
  if (ws_bytes < P.total) throw std::invalid_argument("iso_forward_sums: workspace too small");
  cudaStream_t st = cuda::as_stream(stream);
  if (P.nblocks == 0) {
    cuda::check(cudaMemsetAsync(out4, 0, 4 * sizeof(double), st), "iso_forward_sums (memset)");
    return;
  }
  if (a.inv_two_h2 == nullptr) throw std::invalid_argument("iso_forward_sums: inv_two_h2 missing");
  if (a.groups > 0) {
    if (a.dtype == kFloat32)
      cuda::grouped_forward_impl<float>(a, P, out4, static_cast<char*>(ws), st);
    else
      cuda::grouped_forward_impl<double>(a, P, out4, static_cast<char*>(ws), st);
    return;
  }
  if (a.dtype == kFloat32)
    cuda::forward_impl<float>(a, P, out4, static_cast<char*>(ws), st);
  else
    cuda::forward_impl<double>(a, P, out4, static_cast<char*>(ws), st);
}

void cuda_iso_backward_rows(const IsoArgs& a, const IsoGrad& g, void* ws, size_t ws_bytes,
                            uintptr_t stream) {
  require_centred(a, "iso_backward_rows");
  const cuda::Plan P = cuda::make_plan(a, true);
  if (ws_bytes < P.total) throw std::invalid_argument("iso_backward_rows: workspace too small");
  if (P.R == 0 || !(g.need_x || g.need_z)) return;
  if (g.coef4 == nullptr || a.inv_two_h2 == nullptr ||
      (g.need_x && a.D > 0 && g.gx == nullptr) || (g.need_z && a.d > 0 && g.gz == nullptr))
    throw std::invalid_argument("iso_backward_rows: missing output, coefficients or inv_two_h2");
  if (a.groups > 0) {
    if (a.dtype == kFloat32)
      cuda::grouped_backward_impl<float>(a, P, g, cuda::as_stream(stream));
    else
      cuda::grouped_backward_impl<double>(a, P, g, cuda::as_stream(stream));
    return;
  }
  if (a.dtype == kFloat32)
    cuda::backward_impl<float>(a, P, g, static_cast<char*>(ws), cuda::as_stream(stream));
  else
    cuda::backward_impl<double>(a, P, g, static_cast<char*>(ws), cuda::as_stream(stream));
}

}  // namespace gsd
