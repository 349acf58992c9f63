// Isometry-loss primitives on the CPU (C++ / OpenMP), see docs/design.md.
//
// Never builds an N x N matrix. Grouped pairs (IsoArgs::groups > 0) have their own direct
// kernels at the end ("grouped pairs"). Rows are packed into blocks of BW rows stored k-major
// (P[block][k][row-in-block]), so that one packed buffer serves as the vector operand
// (BW consecutive rows at one k) and as the broadcast operand (one row at kNB
// consecutive k) of the two register-blocked GEMM micro-kernels:
//   gram:  C[j][i]  = sum_k x_i[k] x_j[k]            (tile of dot products)
//   apply: G_i[k]  += sum_j M[j][i] x_j[k]           (the (A @ X) part of the backward)
// The gradient accumulators G use the same packed layout. They live in the caller's output
// buffers gx, gz themselves: a full tile of kTile rows takes exactly the bytes of its own
// rows there (only the last, partial row tile has a small separate accumulator), and at
// the end every block of BW rows is turned into the row-major gradient in place.
//
// Centring: with column means given (IsoArgs::mean_x / mean_z) the uncentred rows are
// centred while they are packed and the squared norms of the centred rows are computed
// there too (in double), so the Python layer makes no centred copies. The exact recompute
// of close pairs reads the rows as given: a difference x_i - x_j needs no centring.
//
// Full square (r0 == c0, r1 == c1): only the tile pairs I <= J are visited. In the
// backward a pair (I, J) updates both G_I and G_J; tasks run in rounds of a round-robin
// ("circle method") schedule in which every tile appears at most once per round, so the
// threads never write the same rows and the accumulation order does not depend on the
// number of threads. Rectangular ranges: every (row tile, column tile) pair, parallel
// over row tiles.

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <stdexcept>
#include <string>

#include "gsd/iso_math.h"
#include "gsd/kernels.h"
#include "simd.h"

namespace gsd {
namespace cpu {
namespace {

#ifndef GSD_KC
#define GSD_KC 256
#endif
constexpr int64_t kKC = GSD_KC;  // k-chunk of the gram kernel (panels stay in L1/L2)
constexpr size_t kAlign = 64;

// Pairs recomputed exactly since the last reset (tests of the refine predicate).
std::atomic<long long> g_refined{0};

inline size_t align_up(size_t v) { return (v + kAlign - 1) / kAlign * kAlign; }
inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ------------------------------------------------------------------ packing
// Pack rows [base, base + M) of X (row-major, K columns), centred by `mean` when given and
// multiplied by `sc` (a power of two from the Python layer, 1 by default: exact), into
// Mpad = ntiles * kTile rows (zero rows past M). n2out[row] gets the squared norm of
// the packed (centred) row: n2in[base + row] when given, else summed here in double in a
// fixed order; 0 for the padding rows.
template <class T>
void pack_rows(const T* X, const T* mean, T sc, const T* n2in, int64_t K, int64_t base,
               int64_t M, int64_t Mpad, T* P, T* n2out) {
  constexpr int BW = block_width<T>();
  const int64_t nblk = Mpad / BW;
  const bool want_norms = (n2in == nullptr);
#pragma omp for schedule(static)
  for (int64_t b = 0; b < nblk; ++b) {
    T* Pb = P + b * K * BW;
    double acc[BW];
    for (int l = 0; l < BW; ++l) acc[l] = 0.0;
    for (int64_t k0 = 0; k0 < K; k0 += 64) {
      const int64_t k1 = std::min<int64_t>(K, k0 + 64);
      for (int l = 0; l < BW; ++l) {
        const int64_t row = b * BW + l;
        if (row >= M) {
          for (int64_t k = k0; k < k1; ++k) Pb[k * BW + l] = T(0);
          continue;
        }
        const T* src = X + (base + row) * K;
        if (mean != nullptr) {
          for (int64_t k = k0; k < k1; ++k) Pb[k * BW + l] = (src[k] - mean[k]) * sc;
        } else {
          for (int64_t k = k0; k < k1; ++k) Pb[k * BW + l] = src[k] * sc;
        }
        if (want_norms) {  // 4 partial sums (k mod 4), then in order: deterministic
          double s4[4] = {0.0, 0.0, 0.0, 0.0};
          for (int64_t k = k0; k < k1; ++k) {
            const double v = double(Pb[k * BW + l]);
            s4[(k - k0) & 3] += v * v;
          }
          acc[l] += (s4[0] + s4[1]) + (s4[2] + s4[3]);
        }
      }
    }
    for (int l = 0; l < BW; ++l) {
      const int64_t row = b * BW + l;
      n2out[row] = row >= M ? T(0) : (want_norms ? T(acc[l]) : n2in[base + row]);
    }
  }
}

// Gradient rows [0, M) of the output (row-major, K columns), in place:
//   out[row][k] = (X[base + row][k] - mean[k]) * sc * rs[row] - G[row][k]   (mean 0 when null)
// where G is the packed accumulator: rows of the full tiles (row < Mfull = M / kTile *
// kTile) are packed in the bytes of out itself (each block of BW rows in its own rows'
// bytes: copied to the thread's `scratch` of BW * K before being overwritten), the rows of
// the last partial tile in Gtail.
template <class T>
void unpack_grad(const T* X, const T* mean, T sc, int64_t K, int64_t base, int64_t M,
                 const T* Gtail, const double* rs, T* out, T* scratch) {
  constexpr int BW = block_width<T>();
  const int64_t nblk = cdiv(M, BW);
  const int64_t Mfull = M / kTile * kTile;
#pragma omp for schedule(static)
  for (int64_t b = 0; b < nblk; ++b) {
    const int64_t row0 = b * BW;
    const T* Gb;
    if (row0 < Mfull) {  // a whole block inside a full tile (kTile is a multiple of BW)
      std::memcpy(scratch, out + row0 * K, sizeof(T) * size_t(BW) * K);
      Gb = scratch;
    } else {
      Gb = Gtail + (row0 - Mfull) * K;
    }
    for (int64_t k0 = 0; k0 < K; k0 += 64) {
      const int64_t k1 = std::min<int64_t>(K, k0 + 64);
      for (int l = 0; l < BW; ++l) {
        const int64_t row = row0 + l;
        if (row >= M) break;
        const T* src = X + (base + row) * K;
        T* dst = out + row * K;
        const T r = T(rs[row]);
        if (mean != nullptr) {
          for (int64_t k = k0; k < k1; ++k)
            dst[k] = ((src[k] - mean[k]) * sc) * r - Gb[k * BW + l];
        } else {
          for (int64_t k = k0; k < k1; ++k) dst[k] = (src[k] * sc) * r - Gb[k * BW + l];
        }
      }
    }
  }
}

// ------------------------------------------------------------------ micro-kernels
// C[c * kTile + v*L ..] (+)= sum_k A[k*BW + v*L ..] * B[k*BW + c],  c < kNB, v < kNV
template <class T>
inline void micro_gram(const T* __restrict A, const T* __restrict B, int64_t kn, T* __restrict C,
                       bool first) {
  using W = Vec<T>;
  using V = typename W::V;
  constexpr int BW = block_width<T>();
  constexpr int L = W::L;
  V acc[kNB][kNV];
#pragma GCC unroll 8
  for (int c = 0; c < kNB; ++c)
#pragma GCC unroll 4
    for (int v = 0; v < kNV; ++v) acc[c][v] = first ? W::zero() : W::load(C + c * kTile + v * L);
  for (int64_t k = 0; k < kn; ++k) {
    V a[kNV];
#pragma GCC unroll 4
    for (int v = 0; v < kNV; ++v) a[v] = W::load(A + k * BW + v * L);
#pragma GCC unroll 8
    for (int c = 0; c < kNB; ++c) {
      const V b = W::set1(B[k * BW + c]);
#pragma GCC unroll 4
      for (int v = 0; v < kNV; ++v) acc[c][v] = W::fma(a[v], b, acc[c][v]);
    }
  }
#pragma GCC unroll 8
  for (int c = 0; c < kNB; ++c)
#pragma GCC unroll 4
    for (int v = 0; v < kNV; ++v) W::store(C + c * kTile + v * L, acc[c][v]);
}

// Tile of dot products: Ct[j][i] = x_i . x_j for the kTile rows packed at PI and PJ.
template <class T>
void gram_tile(const T* PI, const T* PJ, int64_t K, T* Ct) {
  constexpr int BW = block_width<T>();
  if (K == 0) {
    std::fill(Ct, Ct + kTile * kTile, T(0));
    return;
  }
  for (int64_t k0 = 0; k0 < K; k0 += kKC) {
    const int64_t kn = std::min(kKC, K - k0);
    for (int ib = 0; ib < kTile / BW; ++ib) {
      const T* A = PI + (ib * K + k0) * BW;
      for (int j0 = 0; j0 < kTile; j0 += kNB) {
        const T* B = PJ + ((j0 / BW) * K + k0) * BW + (j0 % BW);
        micro_gram<T>(A, B, kn, Ct + j0 * kTile + ib * BW, k0 == 0);
      }
    }
  }
}

// G_dst[i][k] += sum_s M[s][i] * X_src[s][k] over the kTile x kTile tile M (dst contiguous);
// Psrc and Gdst are the packed tiles (K columns).
template <class T>
void apply_tile(const T* __restrict M, const T* __restrict Psrc, int64_t K, T* __restrict Gdst) {
  using W = Vec<T>;
  using V = typename W::V;
  constexpr int BW = block_width<T>();
  constexpr int L = W::L;
  const int64_t Kmain = K / kNB * kNB;
  for (int64_t k0 = 0; k0 < Kmain; k0 += kNB) {
    for (int ib = 0; ib < kTile / BW; ++ib) {
      T* G = Gdst + (ib * K + k0) * BW;
      V acc[kNB][kNV];
#pragma GCC unroll 8
      for (int c = 0; c < kNB; ++c)
#pragma GCC unroll 4
        for (int v = 0; v < kNV; ++v) acc[c][v] = W::load(G + c * BW + v * L);
      const T* Mcol = M + ib * BW;
      for (int sb = 0; sb < kTile / BW; ++sb) {
        const T* xs = Psrc + (sb * K + k0) * BW;
        const T* Ms = Mcol + sb * BW * kTile;
        for (int sl = 0; sl < BW; ++sl) {
          V a[kNV];
#pragma GCC unroll 4
          for (int v = 0; v < kNV; ++v) a[v] = W::load(Ms + sl * kTile + v * L);
#pragma GCC unroll 8
          for (int c = 0; c < kNB; ++c) {
            const V b = W::set1(xs[c * BW + sl]);
#pragma GCC unroll 4
            for (int v = 0; v < kNV; ++v) acc[c][v] = W::fma(a[v], b, acc[c][v]);
          }
        }
      }
#pragma GCC unroll 8
      for (int c = 0; c < kNB; ++c)
#pragma GCC unroll 4
        for (int v = 0; v < kNV; ++v) W::store(G + c * BW + v * L, acc[c][v]);
    }
  }
  // Remainder columns k in [Kmain, K).
  for (int64_t k = Kmain; k < K; ++k) {
    for (int ib = 0; ib < kTile / BW; ++ib) {
      T* G = Gdst + (ib * K + k) * BW;
      const T* Mcol = M + ib * BW;
      for (int s = 0; s < kTile; ++s) {
        const T xv = Psrc[((s / BW) * K + k) * BW + (s % BW)];
        const T* Ms = Mcol + s * kTile;
#pragma omp simd
        for (int l = 0; l < BW; ++l) G[l] += Ms[l] * xv;
      }
    }
  }
}

// ------------------------------------------------------------------ workspace
template <class T> struct Layout {
  int64_t R, C, nTR, nTC, Rpad, Cpad;
  bool sym;
  int64_t nFullR;  // row tiles with kTile rows (their accumulators live in gx, gz)
  size_t PRx, PRz, PCx, PCz, nRx, nRz, nCx, nCz, Gtx, Gtz, rsa, rsb, pairs, scratch,
      per_thread, unpack, unpack_per_thread, total;
};

template <class T> Layout<T> make_layout(const IsoArgs& a, bool backward, int nthreads) {
  Layout<T> L{};
  L.R = a.r1 - a.r0;
  L.C = a.c1 - a.c0;
  L.sym = (a.r0 == a.c0 && a.r1 == a.c1);
  L.nTR = cdiv(L.R, kTile);
  L.nTC = cdiv(L.C, kTile);
  L.Rpad = L.nTR * kTile;
  L.Cpad = L.nTC * kTile;
  L.nFullR = L.R / kTile;
  size_t off = 0;
  auto take = [&](size_t bytes) {
    size_t o = off;
    off += align_up(bytes);
    return o;
  };
  const size_t ts = sizeof(T);
  L.PRx = take(L.Rpad * a.D * ts);
  L.PRz = take(L.Rpad * a.d * ts);
  L.nRx = take(L.Rpad * ts);
  L.nRz = take(L.Rpad * ts);
  if (L.sym) {
    L.PCx = L.PRx;
    L.PCz = L.PRz;
    L.nCx = L.nRx;
    L.nCz = L.nRz;
  } else {
    L.PCx = take(L.Cpad * a.D * ts);
    L.PCz = take(L.Cpad * a.d * ts);
    L.nCx = take(L.Cpad * ts);
    L.nCz = take(L.Cpad * ts);
  }
  if (backward) {
    // Accumulators of the last row tile when it is partial (the others live in gx, gz).
    const bool tail = L.nTR > L.nFullR;
    L.Gtx = take(tail ? size_t(kTile) * a.D * ts : 0);
    L.Gtz = take(tail ? size_t(kTile) * a.d * ts : 0);
    L.rsa = take(L.Rpad * sizeof(double));
    L.rsb = take(L.Rpad * sizeof(double));
  } else {
    L.pairs = take(size_t(L.nTR) * L.nTC * 4 * sizeof(double));
  }
  // Per thread: Cx, Cz, At, Bt, A^T, B^T tiles + 4 double vectors of kTile (row/col sums).
  L.per_thread = align_up(6 * kTile * kTile * ts + 4 * kTile * sizeof(double));
  L.scratch = take(L.per_thread * size_t(std::max(nthreads, 1)));
  // Per thread, backward: one block of BW packed gradient rows while it is unpacked.
  L.unpack_per_thread =
      backward ? align_up(size_t(block_width<T>()) * std::max(a.D, a.d) * ts) : 0;
  L.unpack = take(L.unpack_per_thread * size_t(std::max(nthreads, 1)));
  L.total = off;
  return L;
}

struct Scratch {
  template <class T> static T* at(void* ws, size_t off) {
    return reinterpret_cast<T*>(static_cast<char*>(ws) + off);
  }
};

template <class T> struct ThreadBufs {
  T *Cx, *Cz, *At, *Bt, *Atr, *Btr;
  double *rsa, *rsb, *csa, *csb;
  ThreadBufs(void* ws, const Layout<T>& L, int tid) {
    T* p = Scratch::at<T>(ws, L.scratch + L.per_thread * size_t(tid));
    const int64_t t2 = int64_t(kTile) * kTile;
    Cx = p; Cz = p + t2; At = p + 2 * t2; Bt = p + 3 * t2; Atr = p + 4 * t2; Btr = p + 5 * t2;
    double* v = reinterpret_cast<double*>(p + 6 * t2);  // 6 t2 T's: a multiple of 8 bytes
    rsa = v; rsb = v + kTile; csa = v + 2 * kTile; csb = v + 3 * kTile;
  }
};

// ------------------------------------------------------------------ epilogues
// sum_k ((a_k - b_k) * sc)^2: the exact squared distance of two rows as given, in the
// scaled frame of the packed rows.
template <class T> inline T sq_dist_exact_scaled(const T* a, const T* b, int64_t K, T sc) {
  T s0 = T(0), s1 = T(0);
  int64_t k = 0;
  for (; k + 1 < K; k += 2) {
    const T u = (a[k] - b[k]) * sc, v = (a[k + 1] - b[k + 1]) * sc;
    s0 += u * u;
    s1 += v * v;
  }
  if (k < K) {
    const T u = (a[k] - b[k]) * sc;
    s0 += u * u;
  }
  return s0 + s1;
}

// Dot-product tile -> squared-distance tile (clamped), with the pairs where the Gram trick
// cancels recomputed exactly from the rows of X (row-major, K columns, centred or not:
// a difference of two rows does not depend on the centring), times the scale sc.
template <class T>
void dots_to_sq(T* Ct, const T* nI, const T* nJ, const T* X, T sc, int64_t K, int64_t gi0,
                int64_t ni, int64_t gj0, int64_t nj) {
  for (int64_t j = 0; j < kTile; ++j) {
    T* c = Ct + j * kTile;
    const T nj_ = nJ[j];
    int cnt = 0;
#pragma omp simd reduction(+ : cnt)
    for (int i = 0; i < kTile; ++i) {
      const T d2 = sq_dist(nI[i], nj_, c[i]);
      c[i] = d2;
      cnt += sq_dist_unreliable(d2, nI[i], nj_) ? 1 : 0;
    }
    if (cnt == 0 || j >= nj) continue;
    const T* xj = X + (gj0 + j) * K;
    long long done = 0;
    for (int64_t i = 0; i < ni; ++i)  // i == j (a row with itself) is never summed: skip it
      if (gi0 + i != gj0 + j && sq_dist_unreliable(c[i], nI[i], nj_)) {
        c[i] = sq_dist_exact_scaled(X + (gi0 + i) * K, xj, K, sc);
        ++done;
      }
    g_refined.fetch_add(done, std::memory_order_relaxed);
  }
}

// Forward sums of one tile pair (tiles hold squared distances); the pair epilogue and all
// sums in double (gsd/iso_math.h, EpT).
template <class T>
void tile_sums(const ThreadBufs<T>& tb, int64_t gi0, int64_t ni, int64_t gj0, int64_t nj,
               double inv_two_h2, double* out4) {
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  for (int64_t j = 0; j < nj; ++j) {
    const T* cx = tb.Cx + j * kTile;
    const T* cz = tb.Cz + j * kTile;
    const int64_t gj = gj0 + j;
    double a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
    for (int64_t i = 0; i < ni; ++i) {
      const IsoPair p = iso_pair_sq(cx[i], cz[i], inv_two_h2);
      const bool valid = (gi0 + i) != gj;
      a0 += valid ? p.w : 0.0;
      a1 += valid ? p.w * p.delta2 : 0.0;
      a2 += valid ? p.w * p.delta * p.dz : 0.0;
      a3 += valid ? p.w * p.dz2 : 0.0;
    }
    s0 += a0; s1 += a1; s2 += a2; s3 += a3;
  }
  out4[0] = s0; out4[1] = s1; out4[2] = s2; out4[3] = s3;
}

// Backward coefficients of one tile pair: At[j][i] = a_ij, Bt[j][i] = b_ij (0 outside the
// ranges and on i == j), row sums (over j) into tb.rsa/rsb, column sums into tb.csa/csb.
// The coefficients are formed in double and rounded to T once; the row and column sums add
// up those rounded values (in double), so x_i * rowsum(a) and (A @ X)_i use the same a_ij.
template <class T>
void tile_coefs(const ThreadBufs<T>& tb, int64_t gi0, int64_t ni, int64_t gj0, int64_t nj,
                double inv_two_h2, double p, double q, double r, double s) {
  for (int i = 0; i < kTile; ++i) tb.rsa[i] = tb.rsb[i] = 0.0;
  for (int64_t j = 0; j < kTile; ++j) {
    T* at = tb.At + j * kTile;
    T* bt = tb.Bt + j * kTile;
    if (j >= nj) {
      for (int i = 0; i < kTile; ++i) at[i] = bt[i] = T(0);
      tb.csa[j] = tb.csb[j] = 0.0;
      continue;
    }
    const T* cx = tb.Cx + j * kTile;
    const T* cz = tb.Cz + j * kTile;
    const int64_t gj = gj0 + j;
    double ca = 0, cb = 0;
#pragma omp simd reduction(+ : ca, cb)
    for (int64_t i = 0; i < kTile; ++i) {
      const IsoPair pr = iso_pair_sq(cx[i], cz[i], inv_two_h2);
      double ad, bd;
      iso_coefs(pr, p, q, r, s, &ad, &bd);
      const bool valid = (i < ni) & ((gi0 + i) != gj);
      const T av = valid ? T(ad) : T(0);
      const T bv = valid ? T(bd) : T(0);
      at[i] = av;
      bt[i] = bv;
      tb.rsa[i] += double(av);
      tb.rsb[i] += double(bv);
      ca += double(av);
      cb += double(bv);
    }
    tb.csa[j] = ca;
    tb.csb[j] = cb;
  }
}

template <class T> void transpose_tile(const T* in, T* out) {
  constexpr int B = 16;
  for (int i0 = 0; i0 < kTile; i0 += B)
    for (int j0 = 0; j0 < kTile; j0 += B)
      for (int i = i0; i < i0 + B; ++i)
        for (int j = j0; j < j0 + B; ++j) out[i * kTile + j] = in[j * kTile + i];
}

// ------------------------------------------------------------------ drivers
template <class T>
void iso_forward_impl(const IsoArgs& a, double* out4, void* ws, int nthreads) {
  const Layout<T> L = make_layout<T>(a, false, nthreads);
  const T* x = static_cast<const T*>(a.x);
  const T* z = static_cast<const T*>(a.z);
  const T* xn2 = static_cast<const T*>(a.xn2);
  const T* zn2 = static_cast<const T*>(a.zn2);
  const T* mx = static_cast<const T*>(a.mean_x);
  const T* mz = static_cast<const T*>(a.mean_z);
  T* PRx = Scratch::at<T>(ws, L.PRx);
  T* PRz = Scratch::at<T>(ws, L.PRz);
  T* PCx = Scratch::at<T>(ws, L.PCx);
  T* PCz = Scratch::at<T>(ws, L.PCz);
  T* nRx = Scratch::at<T>(ws, L.nRx);
  T* nRz = Scratch::at<T>(ws, L.nRz);
  T* nCx = Scratch::at<T>(ws, L.nCx);
  T* nCz = Scratch::at<T>(ws, L.nCz);
  double* pairs = Scratch::at<double>(ws, L.pairs);
  const double h = a.inv_two_h2 ? *a.inv_two_h2 : 0.0;
  const T sx = a.scale_x ? T(*a.scale_x) : T(1), sz = a.scale_z ? T(*a.scale_z) : T(1);
  const int64_t D = a.D, d = a.d;
  const int64_t npairs = L.nTR * L.nTC;

#pragma omp parallel num_threads(nthreads)
  {
    pack_rows(x, mx, sx, xn2, D, a.r0, L.R, L.Rpad, PRx, nRx);
    pack_rows(z, mz, sz, zn2, d, a.r0, L.R, L.Rpad, PRz, nRz);
    if (!L.sym) {
      pack_rows(x, mx, sx, xn2, D, a.c0, L.C, L.Cpad, PCx, nCx);
      pack_rows(z, mz, sz, zn2, d, a.c0, L.C, L.Cpad, PCz, nCz);
    }
    // (implicit barrier after each omp for)
    ThreadBufs<T> tb(ws, L, omp_get_thread_num());
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < npairs; ++t) {
      const int64_t I = t / L.nTC, J = t % L.nTC;
      if (L.sym && J < I) continue;
      const int64_t gi0 = a.r0 + I * kTile, gj0 = a.c0 + J * kTile;
      const int64_t ni = std::min<int64_t>(kTile, a.r1 - gi0);
      const int64_t nj = std::min<int64_t>(kTile, a.c1 - gj0);
      gram_tile(PRx + I * kTile * D, PCx + J * kTile * D, D, tb.Cx);
      gram_tile(PRz + I * kTile * d, PCz + J * kTile * d, d, tb.Cz);
      dots_to_sq(tb.Cx, nRx + I * kTile, nCx + J * kTile, x, sx, D, gi0, ni, gj0, nj);
      dots_to_sq(tb.Cz, nRz + I * kTile, nCz + J * kTile, z, sz, d, gi0, ni, gj0, nj);
      tile_sums(tb, gi0, ni, gj0, nj, h, pairs + 4 * t);
    }
  }
  // Deterministic reduction across tiles, in double.
  double s[4] = {0, 0, 0, 0};
  for (int64_t t = 0; t < npairs; ++t) {
    const int64_t I = t / L.nTC, J = t % L.nTC;
    if (L.sym && J < I) continue;
    const double f = (L.sym && J > I) ? 2.0 : 1.0;  // (i,j) and (j,i) have the same terms
    for (int c = 0; c < 4; ++c) s[c] += f * pairs[4 * t + c];
  }
  for (int c = 0; c < 4; ++c) out4[c] = s[c];
}

template <class T>
void iso_backward_impl(const IsoArgs& a, const IsoGrad& g, void* ws, int nthreads) {
  // gx (gz) is null when it is not needed: then its apply GEMMs, accumulators and unpack
  // are skipped (the x distances are still needed for the z coefficients and vice versa).
  T* gx = g.need_x ? static_cast<T*>(g.gx) : nullptr;
  T* gz = g.need_z ? static_cast<T*>(g.gz) : nullptr;
  const Layout<T> L = make_layout<T>(a, true, nthreads);
  const T* x = static_cast<const T*>(a.x);
  const T* z = static_cast<const T*>(a.z);
  const T* xn2 = static_cast<const T*>(a.xn2);
  const T* zn2 = static_cast<const T*>(a.zn2);
  const T* mx = static_cast<const T*>(a.mean_x);
  const T* mz = static_cast<const T*>(a.mean_z);
  T* PRx = Scratch::at<T>(ws, L.PRx);
  T* PRz = Scratch::at<T>(ws, L.PRz);
  T* PCx = Scratch::at<T>(ws, L.PCx);
  T* PCz = Scratch::at<T>(ws, L.PCz);
  T* nRx = Scratch::at<T>(ws, L.nRx);
  T* nRz = Scratch::at<T>(ws, L.nRz);
  T* nCx = Scratch::at<T>(ws, L.nCx);
  T* nCz = Scratch::at<T>(ws, L.nCz);
  T* Gtx = Scratch::at<T>(ws, L.Gtx);
  T* Gtz = Scratch::at<T>(ws, L.Gtz);
  double* rsa = Scratch::at<double>(ws, L.rsa);
  double* rsb = Scratch::at<double>(ws, L.rsb);
  const double h = a.inv_two_h2 ? *a.inv_two_h2 : 0.0;
  const double p = g.coef4[0], q = g.coef4[1], r = g.coef4[2], s = g.coef4[3];
  const T sx = a.scale_x ? T(*a.scale_x) : T(1), sz = a.scale_z ? T(*a.scale_z) : T(1);
  const int64_t D = a.D, d = a.d;
  // Packed accumulator of row tile t: in gx / gz itself for a full tile, else the tail one.
  auto Gx = [&](int64_t t) { return t < L.nFullR ? gx + t * kTile * D : Gtx; };
  auto Gz = [&](int64_t t) { return t < L.nFullR ? gz + t * kTile * d : Gtz; };

  // One tile pair: dots, coefficients, then the (A @ X) updates of the row tile (and,
  // for an off-diagonal symmetric pair, of the column tile).
  auto do_pair = [&](const ThreadBufs<T>& tb, int64_t I, int64_t J, bool both) {
    const int64_t gi0 = a.r0 + I * kTile, gj0 = a.c0 + J * kTile;
    const int64_t ni = std::min<int64_t>(kTile, a.r1 - gi0);
    const int64_t nj = std::min<int64_t>(kTile, a.c1 - gj0);
    gram_tile(PRx + I * kTile * D, PCx + J * kTile * D, D, tb.Cx);
    gram_tile(PRz + I * kTile * d, PCz + J * kTile * d, d, tb.Cz);
    dots_to_sq(tb.Cx, nRx + I * kTile, nCx + J * kTile, x, sx, D, gi0, ni, gj0, nj);
    dots_to_sq(tb.Cz, nRz + I * kTile, nCz + J * kTile, z, sz, d, gi0, ni, gj0, nj);
    tile_coefs<T>(tb, gi0, ni, gj0, nj, h, p, q, r, s);
    if (gx) apply_tile(tb.At, PCx + J * kTile * D, D, Gx(I));
    if (gz) apply_tile(tb.Bt, PCz + J * kTile * d, d, Gz(I));
    for (int i = 0; i < kTile; ++i) {
      rsa[I * kTile + i] += tb.rsa[i];
      rsb[I * kTile + i] += tb.rsb[i];
    }
    if (both) {  // symmetric, I != J: the same tile feeds the rows of J through A^T
      if (gx) {
        transpose_tile(tb.At, tb.Atr);
        apply_tile(tb.Atr, PRx + I * kTile * D, D, Gx(J));
      }
      if (gz) {
        transpose_tile(tb.Bt, tb.Btr);
        apply_tile(tb.Btr, PRz + I * kTile * d, d, Gz(J));
      }
      for (int j = 0; j < kTile; ++j) {
        rsa[J * kTile + j] += tb.csa[j];
        rsb[J * kTile + j] += tb.csb[j];
      }
    }
  };

#pragma omp parallel num_threads(nthreads)
  {
    pack_rows(x, mx, sx, xn2, D, a.r0, L.R, L.Rpad, PRx, nRx);
    pack_rows(z, mz, sz, zn2, d, a.r0, L.R, L.Rpad, PRz, nRz);
    if (!L.sym) {
      pack_rows(x, mx, sx, xn2, D, a.c0, L.C, L.Cpad, PCx, nCx);
      pack_rows(z, mz, sz, zn2, d, a.c0, L.C, L.Cpad, PCz, nCz);
    }
#pragma omp for schedule(static)
    for (int64_t t = 0; t < L.nTR; ++t) {
      if (gx) std::memset(Gx(t), 0, sizeof(T) * kTile * D);
      if (gz) std::memset(Gz(t), 0, sizeof(T) * kTile * d);
      for (int i = 0; i < kTile; ++i) rsa[t * kTile + i] = rsb[t * kTile + i] = 0.0;
    }
    ThreadBufs<T> tb(ws, L, omp_get_thread_num());
    if (L.sym) {
      // Circle method on n (odd) slots; slot nT (when nT is even) is a dummy. In round
      // rr, slot rr does its diagonal tile and slots rr-k, rr+k (mod n) meet.
      const int64_t nT = L.nTR;
      const int64_t n = (nT % 2 == 1) ? nT : nT + 1;
      const int64_t per_round = (n - 1) / 2 + 1;
      for (int64_t rr = 0; rr < n; ++rr) {
#pragma omp for schedule(dynamic, 1)
        for (int64_t k = 0; k < per_round; ++k) {
          int64_t I, J;
          if (k == 0) {
            I = J = rr;
          } else {
            I = (rr - k + n) % n;
            J = (rr + k) % n;
            if (I > J) std::swap(I, J);
          }
          if (J >= nT) continue;  // dummy slot
          do_pair(tb, I, J, I != J);
        }
      }
    } else {
#pragma omp for schedule(dynamic, 1)
      for (int64_t I = 0; I < L.nTR; ++I)
        for (int64_t J = 0; J < L.nTC; ++J) do_pair(tb, I, J, false);
    }
    T* up = Scratch::at<T>(ws, L.unpack + L.unpack_per_thread * size_t(omp_get_thread_num()));
    if (gx) unpack_grad(x, mx, sx, D, a.r0, L.R, Gtx, rsa, gx, up);
    if (gz) unpack_grad(z, mz, sz, d, a.r0, L.R, Gtz, rsb, gz, up);
  }
}

// ------------------------------------------------------------------ grouped pairs
// IsoArgs::groups = g > 0: row i pairs only with its own block of g rows (group_columns).
// Direct kernels, O(R g (D + d)): each squared distance is sum_k ((a_k - b_k) sc)^2 summed
// in double from the rows as given (no centring needed, no Gram cancellation, so no
// close-pair refine); the pair epilogue is the shared one (iso_pair_sq, iso_coefs). Each
// row is owned by one thread (it sums its own pairs (i, j) over j), so the results do not
// depend on the thread count.
template <class T> inline double diff_sq(const T* a, const T* b, int64_t K, T sc) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < K; ++k) {
    const double u = double((a[k] - b[k]) * sc);
    s += u * u;
  }
  return s;
}

size_t grouped_workspace_size(const IsoArgs& a, bool backward) {
  return backward ? 0 : size_t(std::max<int64_t>(a.r1 - a.r0, 0)) * 4 * sizeof(double);
}

template <class T>
void iso_grouped_forward_impl(const IsoArgs& a, double* out4, void* ws, int nthreads) {
  const T* x = static_cast<const T*>(a.x);
  const T* z = static_cast<const T*>(a.z);
  const T sx = a.scale_x ? T(*a.scale_x) : T(1), sz = a.scale_z ? T(*a.scale_z) : T(1);
  const double h = a.inv_two_h2 ? *a.inv_two_h2 : 0.0;
  const int64_t D = a.D, d = a.d, R = a.r1 - a.r0;
  double* rows = static_cast<double*>(ws);  // 4 sums per row, reduced in order below
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t t = 0; t < R; ++t) {
    const int64_t i = a.r0 + t;
    int64_t lo, hi;
    group_columns(i, a.groups, a.c0, a.c1, &lo, &hi);
    double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (int64_t j = lo; j < hi; ++j) {
      if (j == i) continue;
      const IsoPair pr = iso_pair_sq(diff_sq(x + i * D, x + j * D, D, sx),
                                     diff_sq(z + i * d, z + j * d, d, sz), h);
      s0 += pr.w;
      s1 += pr.w * pr.delta2;
      s2 += pr.w * pr.delta * pr.dz;
      s3 += pr.w * pr.dz2;
    }
    rows[4 * t] = s0; rows[4 * t + 1] = s1; rows[4 * t + 2] = s2; rows[4 * t + 3] = s3;
  }
  double s[4] = {0, 0, 0, 0};
  for (int64_t t = 0; t < R; ++t)
    for (int c = 0; c < 4; ++c) s[c] += rows[4 * t + c];
  for (int c = 0; c < 4; ++c) out4[c] = s[c];
}

// gx_i = sum_j a_ij (x'_i - x'_j), x' = x * sx (the centring cancels in the difference);
// a_ij rounded to T once, as in the tiled kernels. gz likewise with b_ij.
template <class T>
void iso_grouped_backward_impl(const IsoArgs& a, const IsoGrad& g, int nthreads) {
  T* gx = g.need_x ? static_cast<T*>(g.gx) : nullptr;
  T* gz = g.need_z ? static_cast<T*>(g.gz) : nullptr;
  const T* x = static_cast<const T*>(a.x);
  const T* z = static_cast<const T*>(a.z);
  const T sx = a.scale_x ? T(*a.scale_x) : T(1), sz = a.scale_z ? T(*a.scale_z) : T(1);
  const double h = a.inv_two_h2 ? *a.inv_two_h2 : 0.0;
  const double p = g.coef4[0], q = g.coef4[1], r = g.coef4[2], s = g.coef4[3];
  const int64_t D = a.D, d = a.d, R = a.r1 - a.r0;
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t t = 0; t < R; ++t) {
    const int64_t i = a.r0 + t;
    T* gxi = gx ? gx + t * D : nullptr;
    T* gzi = gz ? gz + t * d : nullptr;
    if (gxi) std::fill(gxi, gxi + D, T(0));
    if (gzi) std::fill(gzi, gzi + d, T(0));
    int64_t lo, hi;
    group_columns(i, a.groups, a.c0, a.c1, &lo, &hi);
    const T* xi = x + i * D;
    const T* zi = z + i * d;
    for (int64_t j = lo; j < hi; ++j) {
      if (j == i) continue;
      const T* xj = x + j * D;
      const T* zj = z + j * d;
      const IsoPair pr = iso_pair_sq(diff_sq(xi, xj, D, sx), diff_sq(zi, zj, d, sz), h);
      double ad, bd;
      iso_coefs(pr, p, q, r, s, &ad, &bd);
      if (gxi) {
        const T av = T(ad);
#pragma omp simd
        for (int64_t k = 0; k < D; ++k) gxi[k] += av * ((xi[k] - xj[k]) * sx);
      }
      if (gzi) {
        const T bv = T(bd);
#pragma omp simd
        for (int64_t k = 0; k < d; ++k) gzi[k] += bv * ((zi[k] - zj[k]) * sz);
      }
    }
  }
}

void check_args(const IsoArgs& a) {
  if (a.N < 0 || a.D < 0 || a.d < 0) throw std::invalid_argument("negative size");
  if (!(0 <= a.r0 && a.r0 <= a.r1 && a.r1 <= a.N && 0 <= a.c0 && a.c0 <= a.c1 && a.c1 <= a.N))
    throw std::invalid_argument("pair ranges must satisfy 0 <= r0 <= r1 <= N, 0 <= c0 <= c1 <= N");
  if (a.dtype != kFloat32 && a.dtype != kFloat64) throw std::invalid_argument("bad dtype code");
  if (a.groups < 0) throw std::invalid_argument("groups must be >= 0 (0: all pairs)");
}

}  // namespace
}  // namespace cpu

const char* cpu_isa() { return GSD_CPU_ISA; }
int cpu_default_threads() { return omp_get_max_threads(); }

size_t cpu_iso_workspace_size(const IsoArgs& a, bool backward, int nthreads) {
  cpu::check_args(a);
  if (a.groups > 0) return cpu::grouped_workspace_size(a, backward);
  return a.dtype == kFloat32 ? cpu::make_layout<float>(a, backward, nthreads).total
                             : cpu::make_layout<double>(a, backward, nthreads).total;
}

void cpu_iso_forward_sums(const IsoArgs& a, double* out4, void* ws, size_t ws_bytes,
                          int nthreads) {
  if (nthreads < 1) nthreads = 1;
  if (ws_bytes < cpu_iso_workspace_size(a, false, nthreads))
    throw std::invalid_argument("iso_forward_sums: workspace too small");
  if (a.r1 <= a.r0 || a.c1 <= a.c0) {
    for (int c = 0; c < 4; ++c) out4[c] = 0.0;
    return;
  }
  if (a.groups > 0) {
    if (a.dtype == kFloat32)
      cpu::iso_grouped_forward_impl<float>(a, out4, ws, nthreads);
    else
      cpu::iso_grouped_forward_impl<double>(a, out4, ws, nthreads);
    return;
  }
  if (a.dtype == kFloat32)
    cpu::iso_forward_impl<float>(a, out4, ws, nthreads);
  else
    cpu::iso_forward_impl<double>(a, out4, ws, nthreads);
}

void cpu_iso_backward_rows(const IsoArgs& a, const IsoGrad& g, void* ws, size_t ws_bytes,
                           int nthreads) {
  if (nthreads < 1) nthreads = 1;
  if (ws_bytes < cpu_iso_workspace_size(a, true, nthreads))
    throw std::invalid_argument("iso_backward_rows: workspace too small");
  if (a.r1 <= a.r0 || !(g.need_x || g.need_z)) return;
  if ((g.need_x && a.D > 0 && g.gx == nullptr) || (g.need_z && a.d > 0 && g.gz == nullptr) ||
      g.coef4 == nullptr)
    throw std::invalid_argument("iso_backward_rows: missing output or coefficients");
  if (a.c1 <= a.c0) {  // no pairs: zero gradient
    const size_t ts = a.dtype == kFloat32 ? 4 : 8;
    if (g.need_x) std::memset(g.gx, 0, ts * size_t(a.r1 - a.r0) * a.D);
    if (g.need_z) std::memset(g.gz, 0, ts * size_t(a.r1 - a.r0) * a.d);
    return;
  }
  if (a.groups > 0) {
    if (a.dtype == kFloat32)
      cpu::iso_grouped_backward_impl<float>(a, g, nthreads);
    else
      cpu::iso_grouped_backward_impl<double>(a, g, nthreads);
    return;
  }
  if (a.dtype == kFloat32)
    cpu::iso_backward_impl<float>(a, g, ws, nthreads);
  else
    cpu::iso_backward_impl<double>(a, g, ws, nthreads);
}

long long cpu_refine_count() { return cpu::g_refined.load(); }
void cpu_reset_refine_count() { cpu::g_refined.store(0); }

}  // namespace gsd
