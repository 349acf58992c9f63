"""Build of gsd (pure Python packages) plus the compiled core gsd_kernels._C.

The extension is built by CMake (ninja generator) with pybind11; PyTorch is not needed at
build time (docs/definitions.md §2.5). Environment knobs:

  GSD_CUDA=auto|on|off   compile the CUDA kernels when nvcc is found / require it / skip
  GSD_CUDA_ARCHS="80;90" CUDA architectures (sm_80 and sm_90 by default)
  GSD_NATIVE_ARCH=1|0    -march=native for the CPU kernels (default 1)
  GSD_BUILD_TYPE=Release CMake build type
  CMAKE_BUILD_PARALLEL_LEVEL  build jobs (default: number of CPUs)

Fast development build into the source tree:  python setup.py build_ext --inplace
"""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _kernel_source_hash() -> str:
    """gsd_kernels/source_hash.py, loaded by path: importing gsd_kernels would need torch."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("gsd_source_hash", ROOT / "gsd_kernels" / "source_hash.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.source_hash(ROOT / "csrc")


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: Path = ROOT):
        super().__init__(name, sources=[])
        self.sourcedir = str(sourcedir)


def _tool(module: str, attr: str, exe: str) -> str:
    """Path of cmake / ninja: the pip-installed build requirement if present, else PATH."""
    try:
        mod = __import__(module)
        path = Path(getattr(mod, attr)) / exe
        if path.exists():
            return str(path)
    except Exception:
        pass
    found = shutil.which(exe)
    if not found:
        raise RuntimeError(f"{exe} not found: install it (pip install {module}) or put it on PATH")
    return found


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        import pybind11

        extdir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        cmake = _tool("cmake", "CMAKE_BIN_DIR", "cmake")
        ninja = _tool("ninja", "BIN_DIR", "ninja")
        # One CMake build tree per (interpreter, cmake, ninja): pip's isolated build
        # environments must not reuse a cache made by another environment.
        tag = hashlib.sha1(f"{sys.executable}|{cmake}|{ninja}".encode()).hexdigest()[:10]
        build_temp = Path(self.build_temp).resolve() / f"{ext.name.replace('.', '_')}_{tag}"
        build_temp.mkdir(parents=True, exist_ok=True)
        cuda = os.environ.get("GSD_CUDA", "auto").lower()
        if cuda not in ("auto", "on", "off"):
            raise RuntimeError(f"GSD_CUDA must be auto, on or off, not {cuda!r}")
        native = os.environ.get("GSD_NATIVE_ARCH", "1").lower() not in ("0", "off", "false", "no")
        args = [
            cmake, "-S", ext.sourcedir, "-B", str(build_temp), "-G", "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={ninja}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('GSD_BUILD_TYPE', 'Release')}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY_RELEASE={extdir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DGSD_CUDA={cuda}",
            f"-DGSD_CUDA_ARCHS={os.environ.get('GSD_CUDA_ARCHS', '80;90')}",
            f"-DGSD_NATIVE_ARCH={'ON' if native else 'OFF'}",
            f"-DGSD_SOURCE_HASH={_kernel_source_hash()}",
        ]
        subprocess.run(args, check=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 1)
        subprocess.run([cmake, "--build", str(build_temp), "-j", jobs], check=True)


setup(
    ext_modules=[CMakeExtension("gsd_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
)
