"""Learning-rate schedules: evaluating one (closed form, on the host), and
what a schedule adds to a small step compared with a fixed lr and with
torch's stateful scheduler objects."""

import numpy as np

import fastopt
from fastopt import schedules
from fastopt.bench import machine, timing

from . import common

TOTAL = 10_000


def _schedule(name):
    return {
        "constant": lambda: schedules.constant(1e-3),
        "warmup_cosine": lambda: schedules.warmup_cosine(1e-3, 500, TOTAL, alpha=0.1),
        "step_decay": lambda: schedules.step_decay(1e-3, 0.1, milestones=[3000, 6000, 9000]),
        "one_cycle": lambda: schedules.one_cycle(1e-3, TOTAL),
    }[name]()


class ScheduleValue:
    """lr = schedule(step): the cost paid once per optimizer step."""

    params = ["constant", "warmup_cosine", "step_decay", "one_cycle"]
    param_names = ["schedule"]

    def setup(self, name):
        self.schedule = _schedule(name)

    def time_value(self, name):
        self.schedule(7_321)


class ScheduledAdamWStep:
    """One AdamW step over a small model (10 tensors x 1k), lr fixed or from
    warmup-cosine: the schedule's share of a latency-bound step."""

    params = (["fixed", "warmup_cosine"], common.FASTOPT_BACKENDS + ["torch-fused"])
    param_names = ["lr", "impl"]

    def setup(self, lr, impl):
        shapes = [(1000,)] * 10
        rng = np.random.default_rng(0)
        if impl == "torch-fused":
            torch = machine.torch_or_none()
            if torch is None:
                raise NotImplementedError("torch not installed")
            tps = [torch.from_numpy(rng.standard_normal(s, dtype=np.float32)) for s in shapes]
            for tp in tps:
                tp.grad = torch.ones_like(tp)
            opt = torch.optim.AdamW(tps, lr=1e-3, fused=True)
            if lr == "fixed":
                self.step = opt.step
            else:
                sched = _schedule("warmup_cosine")
                lam = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: sched(t) / 1e-3)

                def step():
                    opt.step()
                    lam.step()
                self.step = step
        else:
            common.require_backend(impl)
            params = fastopt.pack([rng.standard_normal(s, dtype=np.float32) for s in shapes])
            grads = params.zeros_like()
            grads.data[:] = 1.0
            opt = fastopt.AdamW(params, backend=impl,
                                lr=1e-3 if lr == "fixed" else _schedule("warmup_cosine"))
            self.step = lambda: opt.step(grads)
        timing.warm_up(self.step)

    def time_step(self, lr, impl):
        self.step()
