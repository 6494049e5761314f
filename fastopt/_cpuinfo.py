"""What the CPU is: Linux's ``/proc/cpuinfo`` for the Cython loader's CPU
flags (NumPy before 2.4 lists too few) and the benchmark report's CPU model
(``platform.processor()`` is empty on Linux), and the names of the Cython
kernels' SIMD builds (known without importing them)."""


#: the Cython kernels' SIMD builds, fastest first, by the x86-64 level each
#: needs (fastopt.backends.cython_cpu loads the fastest the CPU runs)
SIMD_BUILDS = ("x86-64-v4", "x86-64-v3", "baseline")
#: caps the build loaded (``FASTOPT_CYTHON_SIMD=x86-64-v3`` on an AVX-512 CPU
#: loads the AVX2 one): to reproduce or measure another host's build here,
#: as the CI guard's per-build floors do (fastopt/bench/floors.json)
SIMD_CAP_VAR = "FASTOPT_CYTHON_SIMD"


def cpuinfo_field(name):
    """The first processor's ``name`` field ("model name", "flags") as text,
    or None where there is no such file or field (not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return None
