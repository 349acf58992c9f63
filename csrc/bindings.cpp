// pybind11 module gsd_kernels._C: plain functions on raw pointers (Python ints), sizes,
// scalars, a dtype code (0 = float32, 1 = float64) and, for CUDA, a stream handle.
// The module never sees a torch.Tensor and does not link libtorch; the Python layer
// (gsd_kernels/backends/native.py) validates inputs and owns every allocation.

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "gsd/iso_math.h"
#include "gsd/kernels.h"

namespace py = pybind11;

#ifndef GSD_SOURCE_HASH
#define GSD_SOURCE_HASH "unknown"
#endif

// The fingerprint of the kernel sources this module was built from
// (gsd_kernels/source_hash.py), kept as plain bytes in the binary so that the Python loader
// can read it *without* importing a module that may be stale.
extern "C" __attribute__((used, visibility("default")))
const char gsd_source_hash_marker[] = "GSD_SOURCE_HASH=" GSD_SOURCE_HASH;
using gsd::IsoArgs;

namespace {

template <class P> P* ptr(uintptr_t v) { return reinterpret_cast<P*>(v); }

// `groups`: 0 = all pairs of the ranges, g > 0 = only pairs within blocks of g rows.
// A pointer argument of 0 is a null pointer (xn2, zn2, mean_x, mean_z, scale_x, scale_z
// are optional). inv_two_h2 is the address of a 0-dim float64 tensor on the inputs' device.
IsoArgs iso_args(uintptr_t x, uintptr_t z, uintptr_t xn2, uintptr_t zn2, uintptr_t mean_x,
                 uintptr_t mean_z, uintptr_t scale_x, uintptr_t scale_z, int64_t N, int64_t D,
                 int64_t d, int64_t r0, int64_t r1, int64_t c0, int64_t c1, int64_t groups,
                 uintptr_t inv_two_h2, int dtype) {
  IsoArgs a;
  a.x = ptr<const void>(x);
  a.z = ptr<const void>(z);
  a.xn2 = ptr<const void>(xn2);
  a.zn2 = ptr<const void>(zn2);
  a.mean_x = ptr<const void>(mean_x);
  a.mean_z = ptr<const void>(mean_z);
  a.scale_x = ptr<const double>(scale_x);
  a.scale_z = ptr<const double>(scale_z);
  a.N = N; a.D = D; a.d = d;
  a.r0 = r0; a.r1 = r1; a.c0 = c0; a.c1 = c1;
  a.groups = groups;
  a.inv_two_h2 = ptr<const double>(inv_two_h2);
  a.dtype = dtype;
  return a;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "gsd_kernels compiled core: CPU (OpenMP) and CUDA kernels on raw pointers";
  auto nogil = py::call_guard<py::gil_scoped_release>();

  m.def("source_hash", []() { return std::string(gsd_source_hash_marker + 16); },
        "Fingerprint of the csrc/ sources this module was built from.");
  m.def("has_cuda", []() {
#if defined(GSD_WITH_CUDA)
    return true;
#else
    return false;
#endif
  }, "Whether the CUDA kernels were compiled into this build.");
  m.def("cpu_isa", []() { return std::string(gsd::cpu_isa()); },
        "SIMD instruction set the CPU kernels were compiled for.");
  m.def("cpu_default_threads", &gsd::cpu_default_threads);
  m.attr("FLOAT32") = int(gsd::kFloat32);
  m.attr("FLOAT64") = int(gsd::kFloat64);
  // The close-pair refine tolerance (gsd/iso_math.h), per dtype: tests compare it with
  // gsd_kernels.constants.CLOSE_PAIR_TOL and the Triton module's.
  m.attr("CLOSE_PAIR_TOL_FLOAT32") = gsd::kClosePairTolF32;
  m.attr("CLOSE_PAIR_TOL_FLOAT64") = gsd::kClosePairTolF64;
  m.def("cpu_refine_count", &gsd::cpu_refine_count,
        "Pairs recomputed exactly by the CPU isometry kernels since the last reset (debug).");
  m.def("cpu_reset_refine_count", &gsd::cpu_reset_refine_count);

  // ------------------------------------------------------------------ CPU
  m.def("cpu_iso_workspace_size",
        [](int64_t N, int64_t D, int64_t d, int64_t r0, int64_t r1, int64_t c0, int64_t c1,
           int64_t groups, int dtype, bool backward, int nthreads) {
          IsoArgs a = iso_args(0, 0, 0, 0, 0, 0, 0, 0, N, D, d, r0, r1, c0, c1, groups, 0, dtype);
          return gsd::cpu_iso_workspace_size(a, backward, nthreads);
        },
        py::arg("N"), py::arg("D"), py::arg("d"), py::arg("r0"), py::arg("r1"), py::arg("c0"),
        py::arg("c1"), py::arg("groups"), py::arg("dtype"), py::arg("backward"),
        py::arg("nthreads"));
  m.def("cpu_iso_forward_sums",
        [](uintptr_t x, uintptr_t z, uintptr_t xn2, uintptr_t zn2, uintptr_t mean_x,
           uintptr_t mean_z, uintptr_t scale_x, uintptr_t scale_z, int64_t N, int64_t D,
           int64_t d, int64_t r0, int64_t r1, int64_t c0, int64_t c1, int64_t groups,
           uintptr_t inv_two_h2,
           uintptr_t out4, uintptr_t ws, size_t ws_bytes, int dtype, int nthreads) {
          IsoArgs a = iso_args(x, z, xn2, zn2, mean_x, mean_z, scale_x, scale_z, N, D, d, r0,
                               r1, c0, c1, groups, inv_two_h2, dtype);
          gsd::cpu_iso_forward_sums(a, ptr<double>(out4), ptr<void>(ws), ws_bytes, nthreads);
        },
        nogil);
  m.def("cpu_iso_backward_rows",
        [](uintptr_t x, uintptr_t z, uintptr_t xn2, uintptr_t zn2, uintptr_t mean_x,
           uintptr_t mean_z, uintptr_t scale_x, uintptr_t scale_z, int64_t N, int64_t D,
           int64_t d, int64_t r0, int64_t r1, int64_t c0, int64_t c1, int64_t groups,
           uintptr_t inv_two_h2,
           uintptr_t coef4, bool need_x, bool need_z, uintptr_t gx, uintptr_t gz, uintptr_t ws,
           size_t ws_bytes, int dtype, int nthreads) {
          IsoArgs a = iso_args(x, z, xn2, zn2, mean_x, mean_z, scale_x, scale_z, N, D, d, r0,
                               r1, c0, c1, groups, inv_two_h2, dtype);
          gsd::IsoGrad g{ptr<const double>(coef4), need_x, need_z, ptr<void>(gx), ptr<void>(gz)};
          gsd::cpu_iso_backward_rows(a, g, ptr<void>(ws), ws_bytes, nthreads);
        },
        nogil);
  m.def("cpu_sid_forward",
        [](uintptr_t xg, uintptr_t yr, uintptr_t yf, int64_t N, int64_t K, double alpha,
           uintptr_t loss, uintptr_t w, uintptr_t valid, int dtype, int nthreads) {
          gsd::cpu_sid_forward(ptr<const void>(xg), ptr<const void>(yr), ptr<const void>(yf), N, K,
                               alpha, ptr<double>(loss), ptr<double>(w), ptr<uint8_t>(valid),
                               dtype, nthreads);
        },
        nogil);
  m.def("cpu_sid_backward",
        [](uintptr_t xg, uintptr_t yr, uintptr_t yf, int64_t N, int64_t K, double alpha,
           uintptr_t w, uintptr_t valid, uintptr_t scale, uintptr_t g_xg, uintptr_t g_real,
           uintptr_t g_fake, int dtype, int nthreads) {
          gsd::cpu_sid_backward(ptr<const void>(xg), ptr<const void>(yr), ptr<const void>(yf), N,
                                K, alpha, ptr<const double>(w), ptr<const uint8_t>(valid),
                                ptr<const double>(scale),
                                ptr<void>(g_xg), ptr<void>(g_real), ptr<void>(g_fake), dtype,
                                nthreads);
        },
        nogil);
  m.def("cpu_fake_forward",
        [](uintptr_t yf, uintptr_t x, int64_t N, int64_t K, uintptr_t sq, uintptr_t valid,
           int dtype, int nthreads) {
          gsd::cpu_fake_forward(ptr<const void>(yf), ptr<const void>(x), N, K, ptr<double>(sq),
                                ptr<uint8_t>(valid), dtype, nthreads);
        },
        nogil);
  m.def("cpu_fake_backward",
        [](uintptr_t yf, uintptr_t x, int64_t N, int64_t K, uintptr_t coef, uintptr_t g_fake,
           uintptr_t g_x, int dtype, int nthreads) {
          gsd::cpu_fake_backward(ptr<const void>(yf), ptr<const void>(x), N, K,
                                 ptr<const double>(coef), ptr<void>(g_fake), ptr<void>(g_x),
                                 dtype, nthreads);
        },
        nogil);

#if defined(GSD_WITH_CUDA)
  // ------------------------------------------------------------------ CUDA
  m.def("cuda_iso_workspace_size",
        [](int64_t N, int64_t D, int64_t d, int64_t r0, int64_t r1, int64_t c0, int64_t c1,
           int64_t groups, int dtype, bool backward) {
          IsoArgs a = iso_args(0, 0, 0, 0, 0, 0, 0, 0, N, D, d, r0, r1, c0, c1, groups, 0, dtype);
          return gsd::cuda_iso_workspace_size(a, backward);
        },
        py::arg("N"), py::arg("D"), py::arg("d"), py::arg("r0"), py::arg("r1"), py::arg("c0"),
        py::arg("c1"), py::arg("groups"), py::arg("dtype"), py::arg("backward"));
  m.def("cuda_iso_forward_sums",
        [](uintptr_t x, uintptr_t z, uintptr_t xn2, uintptr_t zn2, uintptr_t mean_x,
           uintptr_t mean_z, uintptr_t scale_x, uintptr_t scale_z, int64_t N, int64_t D,
           int64_t d, int64_t r0, int64_t r1, int64_t c0, int64_t c1, int64_t groups,
           uintptr_t inv_two_h2,
           uintptr_t out4, uintptr_t ws, size_t ws_bytes, int dtype, uintptr_t stream) {
          IsoArgs a = iso_args(x, z, xn2, zn2, mean_x, mean_z, scale_x, scale_z, N, D, d, r0,
                               r1, c0, c1, groups, inv_two_h2, dtype);
          gsd::cuda_iso_forward_sums(a, ptr<double>(out4), ptr<void>(ws), ws_bytes, stream);
        },
        nogil);
  m.def("cuda_iso_backward_rows",
        [](uintptr_t x, uintptr_t z, uintptr_t xn2, uintptr_t zn2, uintptr_t mean_x,
           uintptr_t mean_z, uintptr_t scale_x, uintptr_t scale_z, int64_t N, int64_t D,
           int64_t d, int64_t r0, int64_t r1, int64_t c0, int64_t c1, int64_t groups,
           uintptr_t inv_two_h2,
           uintptr_t coef4, bool need_x, bool need_z, uintptr_t gx, uintptr_t gz, uintptr_t ws,
           size_t ws_bytes, int dtype, uintptr_t stream) {
          IsoArgs a = iso_args(x, z, xn2, zn2, mean_x, mean_z, scale_x, scale_z, N, D, d, r0,
                               r1, c0, c1, groups, inv_two_h2, dtype);
          gsd::IsoGrad g{ptr<const double>(coef4), need_x, need_z, ptr<void>(gx), ptr<void>(gz)};
          gsd::cuda_iso_backward_rows(a, g, ptr<void>(ws), ws_bytes, stream);
        },
        nogil);
  m.def("cuda_sid_forward",
        [](uintptr_t xg, uintptr_t yr, uintptr_t yf, int64_t N, int64_t K, double alpha,
           uintptr_t loss, uintptr_t w, uintptr_t valid, int dtype, uintptr_t stream) {
          gsd::cuda_sid_forward(ptr<const void>(xg), ptr<const void>(yr), ptr<const void>(yf), N,
                                K, alpha, ptr<double>(loss), ptr<double>(w), ptr<uint8_t>(valid),
                                dtype, stream);
        },
        nogil);
  m.def("cuda_sid_backward",
        [](uintptr_t xg, uintptr_t yr, uintptr_t yf, int64_t N, int64_t K, double alpha,
           uintptr_t w, uintptr_t valid, uintptr_t scale, uintptr_t g_xg, uintptr_t g_real,
           uintptr_t g_fake, int dtype, uintptr_t stream) {
          gsd::cuda_sid_backward(ptr<const void>(xg), ptr<const void>(yr), ptr<const void>(yf), N,
                                 K, alpha, ptr<const double>(w), ptr<const uint8_t>(valid),
                                ptr<const double>(scale),
                                 ptr<void>(g_xg), ptr<void>(g_real), ptr<void>(g_fake), dtype,
                                 stream);
        },
        nogil);
  m.def("cuda_fake_forward",
        [](uintptr_t yf, uintptr_t x, int64_t N, int64_t K, uintptr_t sq, uintptr_t valid,
           int dtype, uintptr_t stream) {
          gsd::cuda_fake_forward(ptr<const void>(yf), ptr<const void>(x), N, K, ptr<double>(sq),
                                 ptr<uint8_t>(valid), dtype, stream);
        },
        nogil);
  m.def("cuda_fake_backward",
        [](uintptr_t yf, uintptr_t x, int64_t N, int64_t K, uintptr_t coef, uintptr_t g_fake,
           uintptr_t g_x, int dtype, uintptr_t stream) {
          gsd::cuda_fake_backward(ptr<const void>(yf), ptr<const void>(x), N, K,
                                  ptr<const double>(coef), ptr<void>(g_fake), ptr<void>(g_x),
                                  dtype, stream);
        },
        nogil);
#endif
}
