"""``fastopt info``: version, backends, threading and SIMD builds."""

HELP = "list the backends with their threading and SIMD builds"


def add_arguments(parser):
    pass


def run(args):
    import fastopt

    print(f"fastopt {fastopt.__version__}")
    for name, info in fastopt.backend_info().items():
        print(f"  {name:<7} {info}")
    return 0
