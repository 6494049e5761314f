"""Build the Cython kernels, with OpenMP when the compiler has it.

Flags: ``-O3 -fno-math-errno``. Without ``-fno-math-errno`` gcc will not
vectorise ``sqrtf`` (it must keep errno for negative input); unlike
``-ffast-math`` it keeps NaN/inf semantics. No ``-march=native``: the wheel
must run on any x86-64 that imports it. If the compiler cannot build an
OpenMP program the extension is built serial, and
``fastopt.backend_info()`` reports it.
"""

import os
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
                ext.extra_compile_args = BASE_FLAGS + ([OPENMP_FLAG] if openmp else [])
                ext.extra_link_args = [OPENMP_FLAG] if openmp else []
        super().build_extensions()


def extensions():
    from Cython.Build import cythonize

    ext = Extension(
        "fastopt.backends._cython.kernels",
        ["fastopt/backends/_cython/kernels.pyx"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
    return cythonize([ext], compiler_directives={"language_level": 3})


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
