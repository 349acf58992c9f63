// Shared definitions for the CPU (C++/OpenMP) and CUDA kernels of gsd_kernels._C.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define GSD_HD __host__ __device__
#else
#define GSD_HD
#endif

namespace gsd {

// dtype codes used across the Python <-> C++ boundary.
enum DType : int { kFloat32 = 0, kFloat64 = 1 };

template <class T> struct Limits;
template <> struct Limits<float> { GSD_HD static constexpr float max() { return FLT_MAX; } };
template <> struct Limits<double> { GSD_HD static constexpr double max() { return DBL_MAX; } };

// IEEE-exact finiteness test that vectorises (an abs + compare); NaN and +-inf give false.
// Valid as long as the code is not compiled with -ffinite-math-only / -ffast-math (it is not).
template <class T> GSD_HD inline bool is_finite(T v) { return std::fabs(v) <= Limits<T>::max(); }

// max(v, 0) that keeps NaN: a NaN input must reach the loss, not turn into a distance 0.
template <class T> GSD_HD inline T clamp_min0(T v) { return v < T(0) ? T(0) : v; }

// 1/v for v > 0, else 0 (the "coefficient 0 when the distance is 0" rule).
template <class T> GSD_HD inline T inv_or_zero(T v) { return v > T(0) ? T(1) / v : T(0); }

}  // namespace gsd
