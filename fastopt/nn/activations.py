"""Activation and loss names, their integer ids, and the spec parser.

Every backend implements each activation in one fused kernel parameterised
by the integer id below (never one kernel per activation), so adding an
activation is one branch in each backend's scalar function.

=========== == ============================================ =====================
name        id f(z)                                         f'(z)
=========== == ============================================ =====================
identity    0  z                                            1
relu        1  max(z, 0)                                    1 if z > 0 else 0
leaky_relu  2  z if z > 0 else alpha z                      1 if z > 0 else alpha
tanh        3  tanh z                                       1 - f^2
sigmoid     4  1 / (1 + exp(-z))                            f (1 - f)
gelu        5  z Phi(z) = z (1 + erf(z / sqrt 2)) / 2       Phi(z) + z phi(z)
=========== == ============================================ =====================

``gelu`` is the exact (erf) form, torch's ``approximate="none"``.
"""

from __future__ import annotations

ACTIVATIONS = {"identity": 0, "relu": 1, "leaky_relu": 2, "tanh": 3, "sigmoid": 4,
               "gelu": 5}
LOSSES = ("cross_entropy", "mse")
#: He init for the ReLU family, Xavier for the saturating ones.
DEFAULT_INIT = {"identity": "xavier", "relu": "he", "leaky_relu": "he", "tanh": "xavier",
                "sigmoid": "xavier", "gelu": "he"}


def activation_id(name) -> int:
    if not isinstance(name, str):
        raise TypeError(f"activation must be a string, got {type(name).__name__}")
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, "
                         f"got {name!r}") from None


def parse_layers(spec) -> tuple:
    """Hidden-layer widths from ``"256,256"``, ``"256"``, ``""`` or a sequence of ints.

    Raises ValueError naming the bad item for anything else (``"256,,128"``,
    ``"256,x"``, ``"0"``, ``"-3"``).
    """
    if isinstance(spec, str):
        text = spec.strip()
        if not text:
            return ()
        items = [s.strip() for s in text.split(",")]
        out = []
        for i, s in enumerate(items):
            if not s.isdigit():
                raise ValueError(f"layer spec {spec!r}: item {i} ({s!r}) is not a "
                                 "positive integer; expected e.g. '256,256'")
            out.append(int(s))
        spec = out
    try:
        items = list(spec)
    except TypeError:
        raise TypeError(f"layer spec must be a string like '256,256' or a sequence "
                        f"of ints, got {type(spec).__name__}") from None
    out = []
    for i, s in enumerate(items):
        if isinstance(s, bool) or not hasattr(s, "__index__"):
            raise TypeError(f"layer spec item {i} must be an int, got {s!r}")
        s = int(s)
        if s < 1:
            raise ValueError(f"layer spec item {i} must be >= 1, got {s}")
        out.append(s)
    return tuple(out)
