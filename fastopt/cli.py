"""``fastopt`` command line.

Each subcommand lives in its own module, which exposes ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. The module is imported only
when its command runs, so ``fastopt info`` does not pay for matplotlib or torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> module implementing it (see the module docstring for the protocol)
COMMANDS = {
    "bench": "fastopt._cmd_bench",
    "check-perf": "fastopt._cmd_check_perf",
    "examples": "fastopt._cmd_examples",
    "info": "fastopt._cmd_info",
    "plot-schedule": "fastopt._cmd_plot_schedule",
    "train": "fastopt._cmd_train",
}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fastopt", description="fastopt: fused optimizer steps for NumPy code")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module_name in COMMANDS.items():
        # Command modules keep heavy imports inside run(), so this is cheap.
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
