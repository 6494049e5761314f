"""Linux's ``/proc/cpuinfo``, read once per question: the Cython loader's CPU
flags (NumPy before 2.4 lists too few) and the benchmark report's CPU model
(``platform.processor()`` is empty on Linux)."""


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
