"""What a measurement leaves: the table printed by ``fastopt bench``, its
JSON report, the chart (PNG), and the training-loop case's table."""

from __future__ import annotations

import json
import os

from .._files import write_atomically
from .._plotting import save_figure

from .cases import CPU_BACKENDS, KIND, SWEEP_CASE, TORCH_PATHS, step_bytes


#: a baseline row's spread (median round / fastest) past which the ratios
#: against it are marked as not to be quoted
NOISY_SPREAD = 1.5


def format_table(report) -> str:
    """The table ``fastopt bench`` prints: a line per case and
    implementation, then what the columns mean, the machine and its load."""
    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    def t(s):
        if s is None:
            return "-"
        return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms"

    def spread_of(r):
        med = r.get("median_seconds")
        return med / r["seconds"] if med and r.get("seconds") else None

    # a baseline whose rounds spread widely was slowed by something else
    # (torch's threads against another process on 2 cores: its fused step
    # 9x its own time in the row above): the ratio against it is marked
    noisy = {(r["case"], r["impl"]) for r in report["results"]
             if r["impl"] in TORCH_PATHS and (spread_of(r) or 0) > NOISY_SPREAD}
    marked = False

    def against(value, case, impl):
        nonlocal marked
        if value is None or (case, impl) not in noisy:
            return f(value, ".2f")
        marked = True
        return f"{value:.2f}?"

    width = max([26] + [len(r["case"]) for r in report["results"]])
    head = (f"{'case':<{width}} {'impl':<13} {'elements':>10} {'time':>10} {'spread':>6} "
            f"{'GB/s':>7} {'%roof':>6} {'vs numpy':>9} {'vs torch':>9} {'vs best':>8}  note")
    lines = [head, "-" * len(head)]
    for r in report["results"]:
        roof = r["vs_roofline"]
        best = r.get("vs_torch_best")
        note = r["note"]
        if r["impl"] not in TORCH_PATHS and r["seconds"]:
            spec = KIND.get(r.get("kind"))
            peer = (f"best torch: {r.get('vs_torch_best_impl')}" if best is not None else
                    f"no torch {spec.optimizer}: its baseline is numpy"
                    if spec and not spec.in_torch and r["impl"] in CPU_BACKENDS else "")
            note = "; ".join(x for x in (peer, note) if x)
        spread = spread_of(r)
        lines.append(
            f"{r['case']:<{width}} {r['impl']:<13} {r['elements']:>10} {t(r['seconds']):>10} "
            f"{f(spread, '.2f'):>6} {f(r['gbps'], '.1f'):>7} {f(roof and 100 * roof, '.0f'):>6} "
            f"{f(r['vs_numpy'], '.2f'):>9} {against(r['vs_torch'], r['case'], 'torch-fused'):>9} "
            f"{against(best, r['case'], r.get('vs_torch_best_impl')):>8}  {note}")
    lines.append("")
    if marked:
        lines.append(f"? = against a torch row whose spread is over {NOISY_SPREAD}: its rounds "
                     "differed that much (something else used the CPUs), so the ratio is "
                     "not to be quoted; run again on an idle machine")
    lines.append("%roof = streaming kernel moving the same bytes / this time; "
                 "vs numpy = the naive NumPy step's time / this time; "
                 "vs torch = torch.optim.<opt>(fused=True) time / this time; "
                 "vs best = torch's fastest path in the same case (fused, foreach or "
                 "for-loop) / this time; 'list' cases: separate arrays and new gradient "
                 "arrays every step; time = the fastest round's mean, spread = median round "
                 "/ fastest round")
    kinds = [k for k in KIND if any(r.get("kind") == k for r in report["results"])]
    lines.append("bytes per element and step (what GB/s and the roofline count): " + ", ".join(
        f"{k} {step_bytes(k, 1, 'float32')}" for k in kinds) + " (float32; +4 with clipping)")
    states = sorted({r["case"].split()[1] for r in report["results"]
                     if " state 1 x " in r["case"]} - {"float32"})     # cases.state_rows
    if states:
        lines.append("'<state> state' rows: fastopt and the roofline move the compact state's "
                     "bytes (" + ", ".join(f"{s} {step_bytes('adamw', 1, 'float32', state=s):.0f}"
                                          for s in states)
                     + " per element), torch and NumPy float32 state's (28, their GB/s); "
                     "%roof is against the roofline of the compact bytes for all")
    for be, c in report.get("cold_start", {}).items():
        cold, warm = c["cold"]["to_first_step"], c["warm"]["to_first_step"]
        lines.append(f"cold start ({be}): first AdamW step done {cold:.2f} s after start "
                     f"with Numba's cache cold, {warm:.2f} s warm" if be == "numba" else
                     f"cold start ({be}): first AdamW step done {warm:.2f} s after start "
                     "(compiled ahead of time)")
    m = report["machine"]
    lines.append(f"machine: {m['processor'] or m['platform']}, {m['cpus']} CPUs, "
                 f"torch {m['torch']}, GPU: {m['gpu']}; threads: fastopt "
                 f"{m.get('fastopt_threads')}, torch {m.get('torch_threads')}")
    load = report.get("load")
    if load:
        other = load["other_processes"]
        lines.append(f"load average {_loads(load['loadavg_before'], 1)} before, "
                     f"{_loads(load['loadavg_after'], 1)} after; {other['note']}")
        if other.get("other_cpu_fraction", 0) >= 0.02:
            lines.append("WARNING: another process used the CPUs during this run; threaded "
                         "steps (fastopt's and torch's) wait for descheduled threads, so "
                         "these ratios are not those of an idle machine: rerun when idle")
    return "\n".join(lines)


#: the layout of bench.json (docs/benchmarking.md, "bench.json"): raised
#: when a key changes meaning or goes; new keys keep it
SCHEMA = 1


def save(report, path):
    """The report as JSON (its ``"schema"`` first), written beside ``path``
    and renamed into it (an interrupted save leaves the previous file or none)."""
    report = {"schema": SCHEMA, **{k: v for k, v in report.items() if k != "schema"}}
    write_atomically(path, json.dumps(report, indent=1).encode())


def write(report, out, written=None):
    """bench.json and (with matplotlib) bench.png in the folder ``out``;
    the paths written, also appended to ``written`` as each is done (what
    an interrupted call had written)."""
    written = [] if written is None else written
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "bench.json")
    save(report, path)
    written.append(path)
    chart = os.path.join(out, "bench.png")
    if plot(report, chart):
        written.append(chart)
    elif os.path.isfile(chart):
        # an earlier run's (no matplotlib now): beside this bench.json it
        # would be read as this run's chart
        os.remove(chart)
    return written


IMPL_STYLE = {   # colour, marker: fastopt solid, baselines dashed
    "numba": ("C0", "o", "-"), "cython": ("C1", "s", "-"),
    "numpy": ("C2", "^", "--"), "torch-fused": ("C3", "v", "--"),
    "torch-foreach": ("C4", "<", "--"), "torch-forloop": ("C5", ">", "--"),
}


def _plot_cases(ax, report):
    """The headline cases (everything but the sweep): each fastopt backend's
    speedup over torch's fastest path in that case (over NumPy for an
    optimizer torch lacks, said in the label), as horizontal bars."""
    cases = list(dict.fromkeys(r["case"] for r in report["results"]
                               if r["case"] != SWEEP_CASE))
    by = {(r["case"], r["impl"]): r for r in report["results"]}
    no_torch = {r["case"] for r in report["results"]
                if r.get("kind") in KIND and not KIND[r["kind"]].in_torch}
    backends = [b for b in CPU_BACKENDS if any((c, b) in by for c in cases)]
    height = 0.8 / max(len(backends), 1)
    for k, be in enumerate(backends):
        vals = [(by.get((c, be)) or {}).get("vs_numpy" if c in no_torch else "vs_torch_best")
                or 0.0 for c in cases]
        c, _, _ = IMPL_STYLE.get(be, ("C7", "x", "-"))
        ys = [i + k * height for i in range(len(cases))]
        ax.barh(ys, vals, height=height, color=c, label=be)
        for y, v in zip(ys, vals):
            if v:
                ax.text(v, y, f" {v:.1f}x", va="center", fontsize=7)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(cases))])
    ax.set_yticklabels([f"{c} (vs numpy)" if c in no_torch else c for c in cases],
                       fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("speedup over torch's fastest path (same run)")
    ax.set_title("headline cases ('list': new gradient arrays every step)")
    if cases:
        ax.legend(fontsize=8, loc="best")


def plot(report, path):
    """Throughput and time per step vs size, per implementation, with the
    same-run roofline drawn. Needs matplotlib; returns False without it."""
    from .._plotting import agg_pyplot
    plt = agg_pyplot()
    if plt is None:
        return False
    rows = [r for r in report["results"] if r["case"] == SWEEP_CASE and r["seconds"]]
    if not rows:       # no size sweep (--optimizers): the cases alone
        n_cases = len({r["case"] for r in report["results"]})
        fig, ax_cases = plt.subplots(figsize=(9, 1.5 + 0.35 * n_cases))
        _plot_cases(ax_cases, report)
        return _save_figure(fig, report, path)
    fig, (ax_bw, ax_t, ax_cases) = plt.subplots(1, 3, figsize=(18, 4.8),
                                                gridspec_kw={"width_ratios": [1, 1, 1.2]})
    _plot_cases(ax_cases, report)
    series = {}
    for r in rows:
        series.setdefault(r["impl"], []).append((r["elements"], r["gbps"], r["seconds"]))
    for impl, pts in series.items():
        pts.sort()
        x = [p[0] for p in pts]
        if impl == "roofline":
            kw = dict(color="black", linestyle=":", linewidth=2.2,
                      label="roofline (streaming kernel, same bytes)")
        else:
            c, mk, ls = IMPL_STYLE.get(impl, ("C7", "x", "-"))
            kw = dict(color=c, marker=mk, linestyle=ls, label=impl)
        ax_bw.plot(x, [p[1] for p in pts], **kw)
        ax_t.plot(x, [p[2] * 1e6 for p in pts], **kw)
    for ax in (ax_bw, ax_t):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("parameters (float32, one tensor)")
        ax.grid(True, which="both", alpha=0.3)
    ax_bw.set_ylabel("effective GB/s (28 bytes per element)")
    ax_bw.set_title("AdamW step throughput")
    ax_t.set_yscale("log")
    ax_t.set_ylabel("time per step (us)")
    ax_t.set_title("AdamW step latency")
    ax_t.legend(fontsize=8)
    return _save_figure(fig, report, path)


def _save_figure(fig, report, path):
    m = report["machine"]
    fig.suptitle(("INTERRUPTED (the cases that finished only): " if report.get("interrupted")
                  else "")
                 + f"fastopt {m.get('fastopt', '')} on {m['cpus']} CPUs "
                 f"({m['processor'] or m['platform']}); torch {m['torch']}; "
                 f"GPU: {m['gpu']}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    return True


def format_in_loop(report) -> str:
    """A small table of :func:`fastopt.bench.in_loop.in_loop_case`'s report."""
    def t(s):
        if s is None:
            return "-"
        return f"{s * 1e6:.0f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms"

    def x(r):
        return "-" if r is None else f"{r:.2f}"

    def vs(row, key, which):
        return x(row[key][which]) if row.get(key) else "-"

    head = (f"{'impl':<15} {'step in loop':>12} {'train step':>11} {'step hot':>9} "
            f"{'loop/hot':>8} {'vs numpy':>9} {'vs torch':>9} {'vs torch alone':>14} "
            f"{'train vs numpy':>14} {'train vs torch':>14}  note")
    lines = [report["case"] + f" ({report['params']} params); medians of "
             f"{report['rounds']} rounds x {report['steps']} steps", head, "-" * len(head)]
    for impl, r in report["results"].items():
        lines.append(
            f"{impl:<15} {t(r['step_in_loop_s']):>12} {t(r['train_step_s']):>11} "
            f"{t(r['step_hot_s']):>9} {x(r['in_loop_vs_hot']):>8} "
            f"{vs(r, 'vs_numpy', 'step_in_loop'):>9} "
            f"{vs(r, 'vs_torch_fused', 'step_in_loop'):>9} "
            f"{vs(r, 'vs_torch_alone', 'step_in_loop'):>14} "
            f"{vs(r, 'vs_numpy', 'train_step'):>14} "
            f"{vs(r, 'vs_torch_fused', 'train_step'):>14}  {r['note']}")
    lines.append("")
    lines.append("step in loop: the optimizer step alone, right after the forward/backward "
                 "matmuls; train step: forward + backward + step; step hot: the step back "
                 "to back on the same grads; vs numpy / vs torch: naive NumPy Adam's / "
                 "torch fused Adam's time / this one's (step in loop, or train step), "
                 "same run; vs torch alone: against torch fused in a process of its own "
                 "that imports torch first (its own OpenMP runtime and defaults, as torch "
                 "users run it)")
    roof, over = report.get("roofline_in_loop_vs_hot"), report.get("in_loop_vs_hot_over_roofline")
    if roof:
        lines.append(f"roofline: the same bytes on one thread took {roof:.2f}x as long in the "
                     "loop as hot (where the forward/backward pass leaves them); each step's "
                     "loop/hot over that: "
                     + ", ".join(f"{impl} {x:.2f}" for impl, x in (over or {}).items()))
    for impl, r in report["results"].items():
        if r.get("thread_choice"):
            lines.append(f"{impl} in the loop chose {r['thread_choice']}")
    env = report["environment"]
    for p in env["thread_pools"] or []:
        lines.append(
            f"{p.get('user_api', '?')}: {p.get('internal_api', '?')} {p.get('version') or ''} "
            f"({p.get('file')}), {p.get('num_threads')} threads"
            + (f", {p['threading_layer']}" if p.get("threading_layer") else "")
            + (f", kernel {p['architecture']}" if p.get("architecture") else ""))
    te = env["threads_env"]
    lines.append(f"threads: fastopt {env['fastopt_threads']}, torch "
                 f"{env['torch_threads'] if env['torch_threads'] is not None else '-'}; "
                 f"OPENBLAS_NUM_THREADS={te.get('OPENBLAS_NUM_THREADS', 'unset')}"
                 + "".join(f", {k}={v}" for k, v in te.items()
                           if k != "OPENBLAS_NUM_THREADS"))
    lb, la = env["loadavg_before"], env["loadavg_after"]
    lines.append(f"load average {_loads(lb)} before, {_loads(la)} after ({env['cpus']} CPUs); "
                 f"{env['other_processes']['note']}")
    lines.append(f"run took {report['wall_s']:.1f} s")
    for k, v in report["notes"].items():
        if k not in report["results"]:
            lines.append(f"note ({k}): {v}")
    return "\n".join(lines)


def _loads(averages, n=3):
    """The first ``n`` load averages, or "n/a" where the OS gives none."""
    return "n/a" if averages is None else " ".join(f"{x:.2f}" for x in averages[:n])
