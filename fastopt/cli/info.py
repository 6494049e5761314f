"""``fastopt info``: version, backends, threading and SIMD builds, and the
thread pools a step shares the cores with."""

HELP = "list the backends, their threading and SIMD builds, and the thread pools"


def add_arguments(parser):
    parser.add_argument("--json", action="store_true",
                        help="print the same facts as one JSON object (for scripts and "
                             "bug reports)")


def collect():
    """What ``fastopt info`` reports, as a dict (``--json`` prints it)."""
    import numpy as np

    import fastopt
    from fastopt.backends import auto_backend, thread_pools
    from fastopt.backends.compact import STATE_DTYPES
    from fastopt.backends.threads import SERIAL_MAX
    from fastopt.nn._cuda_blas import describe

    np.dot(np.ones((64, 64)), np.ones((64, 64)))      # load BLAS's pool so it is listed
    backends = fastopt.backend_info()
    return {"fastopt": fastopt.__version__, "backends": backends,
            "auto_backend": auto_backend(), "nn_cuda_matmul": describe(),
            "threads": thread_pools(), "serial_max_elements": SERIAL_MAX,
            "cython_thread_team": backends.get("cython", {}).get("thread_team"),
            "state_bytes_per_element": {
                label: dict(zip(STATE_DTYPES, (state_bytes(name, kwargs, d)
                                               for d in STATE_DTYPES)))
                for label, name, kwargs in _STATE_ROWS}}


def run(args):
    facts = collect()
    if args.json:
        import json
        print(json.dumps(facts, indent=1, default=str))
        return 0
    print(f"fastopt {facts['fastopt']}")
    for name, info in facts["backends"].items():
        print(f"  {name:<7} {info}")
    print(f"backend='auto' picks {facts['auto_backend']!r} for host arrays (packed, lists, "
          "dicts)")
    print(f"nn matmul on CUDA: {facts['nn_cuda_matmul']}")
    pools = facts["threads"]
    print(f"threads: fastopt {pools['fastopt_threads']}, Numba threading layer "
          f"{pools.get('numba_threading_layer', 'not loaded')}")
    if isinstance(pools["pools"], str):
        print(f"  {pools['pools']}")
    else:
        for p in pools["pools"]:
            print("  " + ", ".join(f"{k}={v}" for k, v in p.items()))
    print(f"serial or threaded: each step table above {facts['serial_max_elements']} "
          "elements times its own steps both ways and keeps the mode whose steps cost less "
          "on average, rare slow ones included (fastopt.backends.threads)")
    team = facts["cython_thread_team"]
    if team:
        print(f"cython's threaded steps: {team['kind']} team"
              + (" (tasks claimed by whichever thread runs; the step never waits for a "
                 f"sleeping worker; workers wait {team['spin_us']} us awake, then sleep)"
                 if team["kind"] == "fastopt" else " (static schedule, closing barrier)"))
    print_state_bytes(facts["state_bytes_per_element"])
    return 0


# optimizers as `fastopt train` and the benchmarks run them (SGD with momentum:
# without it SGD keeps no state)
_STATE_ROWS = (("SGD(momentum=0.9)", "SGD", dict(lr=0.1, momentum=0.9)),
               ("Adam, AdamW", "AdamW", {}), ("Adam(amsgrad=True)", "Adam", dict(amsgrad=True)),
               ("RMSprop", "RMSprop", {}), ("Adagrad", "Adagrad", {}), ("Adamax", "Adamax", {}),
               ("NAdam", "NAdam", {}), ("RAdam", "RAdam", {}), ("Lion", "Lion", {}),
               ("LAMB", "LAMB", {}))


def state_bytes(opt_name, kwargs, state_dtype, n=1 << 16):
    """Optimizer state bytes per float32 param element under ``state_dtype``,
    as ``opt.state_nbytes()`` counts them after one step on ``n`` elements;
    None where the optimizer refuses that state dtype."""
    import numpy as np

    import fastopt

    p = [np.zeros(n, np.float32)]
    try:
        opt = getattr(fastopt, opt_name)(p, state_dtype=state_dtype, **kwargs)
    except ValueError:
        return None
    opt.step([np.ones(n, np.float32)])
    return opt.state_nbytes() / n


def print_state_bytes(table):
    from fastopt.backends.compact import STATE_DTYPES

    print("optimizer state, bytes per float32 param element (opt.state_nbytes() after a "
          f"step), state_dtype {' / '.join(STATE_DTYPES)}:")
    for label, cells in table.items():
        print(f"  {label:<20} " + " / ".join("-" if cells[d] is None else f"{cells[d]:.2f}"
                                             for d in STATE_DTYPES))
