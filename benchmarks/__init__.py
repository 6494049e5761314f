"""fastopt's asv suite: one module per area, a class per feature.

Run it with ``asv run --python=same --quick`` (see docs/benchmarking.md).
"""
