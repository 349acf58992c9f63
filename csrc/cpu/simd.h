// Minimal SIMD traits for the CPU micro-kernels.
//
// ISA choice is made at compile time from the compiler's target macros: the build uses
// -march=native by default (CMake option GSD_NATIVE_ARCH, ON for source builds), so a
// source build on an AVX-512 machine gets the AVX-512 kernels, on an AVX2+FMA machine the
// AVX2 kernels, and anywhere else a portable scalar fallback that the compiler may still
// auto-vectorise. (Runtime dispatch was not chosen: the extension is built from source on
// the machine that runs it, and a single ISA per build keeps the inline/ODR story simple.)
#pragma once

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace gsd {
namespace cpu {

template <class T> struct Vec;

#if defined(__AVX512F__)
#define GSD_CPU_ISA "avx512"
template <> struct Vec<float> {
  using V = __m512;
  static constexpr int L = 16;
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V set1(float a) { return _mm512_set1_ps(a); }
  static V zero() { return _mm512_setzero_ps(); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
};
template <> struct Vec<double> {
  using V = __m512d;
  static constexpr int L = 8;
  static V load(const double* p) { return _mm512_loadu_pd(p); }
  static void store(double* p, V v) { _mm512_storeu_pd(p, v); }
  static V set1(double a) { return _mm512_set1_pd(a); }
  static V zero() { return _mm512_setzero_pd(); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
};
// Register block: NV vectors (along the packed rows) x NB broadcasts = 24 accumulators
// of the 32 zmm registers.
constexpr int kNV = 3;
constexpr int kNB = 8;
#elif defined(__AVX2__) && defined(__FMA__)
#define GSD_CPU_ISA "avx2"
template <> struct Vec<float> {
  using V = __m256;
  static constexpr int L = 8;
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V set1(float a) { return _mm256_set1_ps(a); }
  static V zero() { return _mm256_setzero_ps(); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
};
template <> struct Vec<double> {
  using V = __m256d;
  static constexpr int L = 4;
  static V load(const double* p) { return _mm256_loadu_pd(p); }
  static void store(double* p, V v) { _mm256_storeu_pd(p, v); }
  static V set1(double a) { return _mm256_set1_pd(a); }
  static V zero() { return _mm256_setzero_pd(); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
};
// 12 accumulators + 3 loads + 1 broadcast of the 16 ymm registers.
constexpr int kNV = 3;
constexpr int kNB = 4;
#else
#define GSD_CPU_ISA "generic"
template <class T> struct Vec {
  using V = T;
  static constexpr int L = 1;
  static V load(const T* p) { return *p; }
  static void store(T* p, V v) { *p = v; }
  static V set1(T a) { return a; }
  static V zero() { return T(0); }
  static V fma(V a, V b, V c) { return a * b + c; }
};
constexpr int kNV = 4;
constexpr int kNB = 4;
#endif

// Rows per packed block: the vector dimension of the micro-kernels.
template <class T> constexpr int block_width() { return kNV * Vec<T>::L; }

// Square tile of pairs handled by one task (a multiple of every block width and of kNB).
#ifndef GSD_TILE
#define GSD_TILE 192
#endif
constexpr int kTile = GSD_TILE;

}  // namespace cpu
}  // namespace gsd
