"""Build the Cython kernels, with OpenMP when the compiler has it.

Flags: ``-O3 -fno-math-errno``. Without ``-fno-math-errno`` gcc will not
vectorise ``sqrtf`` (it must keep errno for negative input); unlike
``-ffast-math`` it keeps NaN/inf semantics. No ``-march=native``: the wheel
must run on any x86-64 that imports it, so a second build of the same
kernels for x86-64-v3 is imported only where the CPU has AVX2 and FMA. If the compiler cannot build an
OpenMP program the extension is built serial, and
``fastopt.backend_info()`` reports it.
"""

import os
import platform
import sys
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

BASE_FLAGS = ["-O3", "-fno-math-errno"]
OPENMP_FLAG = "-fopenmp"


def _compiler_has_openmp(compiler) -> bool:
    """Compile and link a tiny OpenMP program with the build's compiler."""
    src = "#include <omp.h>\nint main(void) { return omp_get_max_threads() < 1; }\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "check_openmp.c")
        with open(path, "w") as f:
            f.write(src)
        try:
            objs = compiler.compile([path], output_dir=tmp, extra_postargs=[OPENMP_FLAG])
            compiler.link_executable(objs, "check_openmp", output_dir=tmp,
                                     extra_postargs=[OPENMP_FLAG])
        except Exception:  # any compile or link failure means no OpenMP
            return False
    return True


class BuildExt(build_ext):
    def build_extensions(self):
        msvc = self.compiler.compiler_type == "msvc"
        openmp = (not msvc and os.environ.get("FASTOPT_NO_OPENMP") != "1"
                  and _compiler_has_openmp(self.compiler))
        if not openmp:
            print("fastopt: building the Cython kernels without OpenMP (serial)",
                  file=sys.stderr)
        for ext in self.extensions:
            if not msvc:
                simd = SIMD_VARIANTS[ext.name.rsplit(".", 1)[1]]
                ext.extra_compile_args = (BASE_FLAGS + simd
                                          + ([OPENMP_FLAG] if openmp else []))
                ext.extra_link_args = [OPENMP_FLAG] if openmp else []
        super().build_extensions()


# The same kernels built three times: for any x86-64, for x86-64-v3 (AVX2 +
# FMA) and for x86-64-v4 (AVX-512), each imported only where the CPU reports
# its features (fastopt/backends/cython_cpu.py). The portable build runs its
# divisions and square roots 4 lanes wide, v3 8 and v4 16.
SIMD_VARIANTS = {"kernels": []}
if platform.machine().lower() in ("x86_64", "amd64"):
    SIMD_VARIANTS["kernels_v3"] = ["-march=x86-64-v3"]
    # 512-bit vectors: without the preference gcc keeps AVX-512 code 256 bits wide
    SIMD_VARIANTS["kernels_v4"] = ["-march=x86-64-v4", "-mprefer-vector-width=512"]


def extensions():
    from Cython.Build import cythonize

    import numpy

    # the list path reads the arrays' C structs (numpy's headers)
    exts = [Extension(f"fastopt.backends._cython.{name}",
                      [f"fastopt/backends/_cython/{name}.pyx"],
                      depends=["fastopt/backends/_cython/kernels_impl.pxi"],
                      include_dirs=[numpy.get_include()],
                      define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")])
            for name in SIMD_VARIANTS]
    return cythonize(exts, compiler_directives={"language_level": 3})


# fastopt.nn kernels (MLP forward/backward): gemm through scipy's cython_blas,
# so one portable build is enough (the time is in BLAS). Same flags as the
# optimizer kernels; BuildExt reads each extension's SIMD flags by short name.
NN_EXTENSIONS = ["nn_kernels"]   # fastopt/nn/_cython/<name>.pyx
_core_extensions = extensions


def extensions():  # noqa: F811  (the optimizer kernels plus the nn kernels)
    from Cython.Build import cythonize

    core = _core_extensions()
    SIMD_VARIANTS.update({name: [] for name in NN_EXTENSIONS})
    nn = [Extension(f"fastopt.nn._cython.{name}", [f"fastopt/nn/_cython/{name}.pyx"])
          for name in NN_EXTENSIONS]
    return core + cythonize(nn, compiler_directives={"language_level": 3})


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
