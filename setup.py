"""Build the Cython kernels, with OpenMP when the compiler has it.

Flags: ``-O3 -fno-math-errno -g0``. ``-g0`` (last, over Python's own ``-g``)
leaves out the debug info, which nothing reads at run time: a kernel
module is about 2.3 MB without it, 14 MB with it. Without ``-fno-math-errno`` gcc will not
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

BASE_FLAGS = ["-O3", "-fno-math-errno", "-g0"]
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


# Every compiled extension, once: (module, source, extra compile flags).
#
# The optimizer kernels are built three times from one source: for any
# x86-64, for x86-64-v3 (AVX2 + FMA) and for x86-64-v4 (AVX-512), each
# imported only where the CPU reports its features
# (fastopt/backends/cython_cpu.py). The portable build runs its divisions and
# square roots 4 lanes wide, v3 8 and v4 16. The fastopt.nn kernels (MLP
# forward/backward) call gemm through scipy's cython_blas, so one portable
# build is enough (the time is in BLAS).
_KERNELS = "fastopt/backends/_cython/kernels.pyx"
IMPL = ["fastopt/backends/_cython/kernels_impl.pxi",   # included by every kernels*.pyx
        "fastopt/backends/_cython/pool_impl.pxi",
        "fastopt/backends/_cython/compact_impl.pxi"]
EXTENSIONS = [("fastopt.backends._cython.kernels", _KERNELS, [])]
if platform.machine().lower() in ("x86_64", "amd64"):
    EXTENSIONS += [
        ("fastopt.backends._cython.kernels_v3", _KERNELS.replace(".pyx", "_v3.pyx"),
         ["-march=x86-64-v3"]),
        # 512-bit vectors: without the preference gcc keeps AVX-512 code 256 bits wide
        ("fastopt.backends._cython.kernels_v4", _KERNELS.replace(".pyx", "_v4.pyx"),
         ["-march=x86-64-v4", "-mprefer-vector-width=512"]),
    ]
EXTENSIONS.append(("fastopt.nn._cython.nn_kernels", "fastopt/nn/_cython/nn_kernels.pyx", []))
SIMD_FLAGS = {name: flags for name, _, flags in EXTENSIONS}


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
                ext.extra_compile_args = (BASE_FLAGS + SIMD_FLAGS[ext.name]
                                          + ([OPENMP_FLAG] if openmp else []))
                ext.extra_link_args = [OPENMP_FLAG] if openmp else []
        super().build_extensions()


def extensions():
    from Cython.Build import cythonize

    import numpy

    # numpy's headers: the optimizers' list path reads the arrays' C structs
    exts = [Extension(name, [source],
                      depends=IMPL if source.startswith("fastopt/backends") else [],
                      include_dirs=[numpy.get_include()],
                      define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")])
            for name, source, _ in EXTENSIONS]
    return cythonize(exts, compiler_directives={"language_level": 3})


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
