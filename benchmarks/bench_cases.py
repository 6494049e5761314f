"""fastopt against NumPy, PyTorch and the memory roofline, case by case:
the dashboard's first rows (this module's name sorts first in asv's list).

The cases are ``fastopt bench``'s, by name (``fastopt.bench.cases.workloads``):
every optimizer on one 16M float32 array and on a plain list of 1000
arrays of 1000 (``fastopt.bench.cases.family_rows``), and the smaller
plain-list AdamW cases of the standard matrix. A case is defined there once; the table,
these benchmarks and the CI guard's floors mean the same thing by its name.

Read at one commit (docs/benchmarking.md, "Reading the dashboard"):
``Ratios`` gives each case's comparison as a number, already divided, with
the case and the fastopt backend as its parameters; ``Step`` times every
implementation of a case (graph it with the x-axis set to ``impl``).
"""

from fastopt.bench import cases

from . import common

# every optimizer's two workloads, then the standard matrix's other plain
# lists (new gradient arrays every step) up to 1M elements
CASES = {r.case: r for kind in cases.KINDS for r in cases.family_rows(kind)}
CASES.update((r.case, r) for r in cases.plan()
             if r.layout == "list" and not r.clip and r.case not in CASES
             and r.elements <= 1 << 20)
# fastopt's backends, the baselines, and the streaming kernel that moves the
# step's bytes (its time is the memory-bound limit)
IMPLS = [*common.CPU_IMPLS, "roofline"]


class Ratios(common._RatioTracks):
    """Same-run ratios of every case, for each fastopt backend: all
    implementations of a case timed interleaved in one process, once per
    asv run (``setup_cache``). ``track_speedup_vs_torch_best`` is n/a for an
    optimizer torch lacks (Lion, LAMB): read ``track_speedup_vs_numpy`` there."""

    params = (list(CASES), common.FASTOPT_BACKENDS)
    param_names = ["case", "backend"]

    def setup_cache(self):
        return common.ratio_matrix(CASES, common.FASTOPT_BACKENDS)

    setup_cache.timeout = common.CACHE_TIMEOUT

    def case_key(self, case):
        return case


class Step:
    """Seconds per step of every implementation of a case (lists: a new
    list of new gradient arrays every step; the baselines always take
    separate arrays)."""

    params = (list(CASES), IMPLS)
    param_names = ["case", "impl"]

    def setup(self, case, impl):
        row = CASES[case]
        self.step = common.build_step(impl, row.kind, row.shapes, row.dtype, row.clip,
                                      row.layout)

    def time_step(self, case, impl):
        self.step()
