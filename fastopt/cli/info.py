"""``fastopt info``: version, backends, threading and SIMD builds, and the
thread pools a step shares the cores with."""

HELP = "list the backends, their threading and SIMD builds, and the thread pools"


def add_arguments(parser):
    pass


def run(args):
    import numpy as np

    import fastopt
    from fastopt.backends import auto_backend, thread_pools
    from fastopt.backends.threads import SERIAL_MAX

    print(f"fastopt {fastopt.__version__}")
    for name, info in fastopt.backend_info().items():
        print(f"  {name:<7} {info}")
    print(f"backend='auto' picks {auto_backend()!r} for host arrays (packed, lists, dicts)")
    from fastopt.nn._cuda_blas import describe
    print(f"nn matmul on CUDA: {describe()}")
    np.dot(np.ones((64, 64)), np.ones((64, 64)))      # load BLAS's pool so it is listed
    pools = thread_pools()
    print(f"threads: fastopt {pools['fastopt_threads']}, Numba threading layer "
          f"{pools.get('numba_threading_layer', 'not loaded')}")
    if isinstance(pools["pools"], str):
        print(f"  {pools['pools']}")
    else:
        for p in pools["pools"]:
            print("  " + ", ".join(f"{k}={v}" for k, v in p.items()))
    print(f"serial or threaded: each step table above {SERIAL_MAX} elements times its own "
          "steps both ways and keeps the faster (fastopt.backends.threads)")
    return 0
