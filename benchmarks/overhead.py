"""Wall time per training step of each sparse training method, relative to dense training.

LeNet-5 on random 28x28 batches, SGD (lr 0.01, momentum 0.9, weight decay 5e-4). The dense
baseline calls ``optimizer.step()``; every registered method calls ``sparsifier.step()`` with
``total_steps = --steps``, so the timed run includes the topology updates of the schedule
(with the defaults at steps 100, 200 and 300; ``t_end = 0.75 * steps``; gradual magnitude
pruning takes ``--delta-t`` as its pruning frequency and prunes at 180, 280 and 300, from
``start_step = 0.2 * steps`` to ``end_step = 0.75 * steps``). The sparse methods here keep the
weights dense in memory (masked backend), so the question is how much the masks and the updates
add, not how much sparsity saves.

The machine may be shared and noisy, so the runs are interleaved: each repeat trains dense and
every method from fresh models, by default one step of each in turn (the order rotated every
step), so that a change of load hits all of them alike; ``--interleave run`` times each whole
run in turn instead. Every step is timed on its own (zero_grad, forward, backward, step) and
summed. The table gives the median over repeats of the time per step and the median of the
per-repeat ratios method / dense, and how many of the scheduled topology updates changed a
mask (with the cosine decay the drop fraction is 0 at ``t_end``, so the update there is empty).

    .venv/bin/python benchmarks/overhead.py            # defaults: 400 steps, 3 repeats
    .venv/bin/python benchmarks/overhead.py --steps 800 --repeats 5 --threads 1
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import sparsetrain as st

POOL = 20  # pre-generated batches, cycled through
WARMUP_STEPS = 20


class LeNet5(nn.Module):
    """LeNet-5 for 1x28x28 inputs: conv 1->6 5x5 (pad 2), max-pool, conv 6->16 5x5, max-pool,
    then fully connected 400 -> 120 -> 84 -> 10, ReLU between."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = x.flatten(1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


def make_batches(batch_size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch_size, 1, 28, 28, generator=g),
         torch.randint(0, 10, (batch_size,), generator=g))
        for _ in range(POOL)
    ]


class Run:
    """One training run from a fresh model: dense (``optimizer.step``) or a sparsifier."""

    def __init__(self, method: str, args):
        torch.manual_seed(0)
        self.method = method
        self.model = LeNet5()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9,
                                   weight_decay=5e-4)
        self.sparsifier = None
        if method != "dense":
            self.sparsifier = st.make_sparsifier(method, self.model, self.opt,
                                                 density=args.density, total_steps=args.steps,
                                                 delta_t=args.delta_t, seed=0)
        self.seconds = 0.0
        self.steps = 0
        self.scheduled_updates = 0  # steps on which the schedule calls for an update
        self.effective_updates = 0  # of those, the ones that changed a mask

    def step(self, x, y) -> None:
        """One timed training step; the bookkeeping of updates is outside the timed part."""
        sp = self.sparsifier
        update = sp is not None and sp.is_update_step(self.steps + 1)
        before = {n: m.clone() for n, m in sp.masks.items()} if update else None
        start = time.perf_counter()
        self.opt.zero_grad()
        nn.functional.cross_entropy(self.model(x), y).backward()
        (sp or self.opt).step()
        self.seconds += time.perf_counter() - start
        self.steps += 1
        if update:
            self.scheduled_updates += 1
            self.effective_updates += any(
                not torch.equal(before[n], m) for n, m in sp.masks.items())

    @property
    def ms(self) -> float:
        return 1000.0 * self.seconds / self.steps


def run_repeat(names, batches, args) -> dict[str, Run]:
    """Train every run ``args.steps`` steps from fresh models, interleaved as ``--interleave``."""
    runs = [Run(n, args) for n in names]
    gc.collect()
    if args.interleave == "run":  # each run in turn, start to end
        for run in runs:
            for t in range(args.steps):
                run.step(*batches[t % len(batches)])
    else:  # one step of each run in turn, the order rotated every step
        for t in range(args.steps):
            x, y = batches[t % len(batches)]
            for i in range(len(runs)):
                runs[(t + i) % len(runs)].step(x, y)
    return {r.method: r for r in runs}


def warm_up(batches, args) -> None:
    """Run torch's first-call paths (allocator, kernels, autograd, sorting) before timing.

    Dense steps, then a throw-away RigL run with its own short schedule, so that the topology
    update code has run once too; none of this is timed or reused.
    """
    for method in ("dense", "rigl"):
        torch.manual_seed(0)
        model = LeNet5()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        stepper = opt
        if method != "dense":
            stepper = st.RigL(model, opt, density=args.density, total_steps=WARMUP_STEPS,
                              delta_t=5)
        for t in range(WARMUP_STEPS):
            x, y = batches[t % len(batches)]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            stepper.step()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400, help="timed steps per run")
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--delta-t", type=int, default=100,
                        help="steps between topology updates (GMP: between pruning steps)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's own choice)")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="methods to time (default: every registered one)")
    parser.add_argument("--interleave", choices=("step", "run"), default="step",
                        help="step: within a repeat, one step of each run in turn (default, the "
                        "most robust to drifting load); run: each whole run in turn")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/overhead.md"))
    args = parser.parse_args(argv)
    if args.steps <= 0 or args.repeats <= 0 or args.batch_size <= 0:
        parser.error("--steps, --repeats and --batch-size must be positive")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    methods = args.methods or st.available_methods()

    batches = make_batches(args.batch_size)
    warm_up(batches, args)

    names = ["dense", *methods]
    times: dict[str, list[float]] = {n: [] for n in names}
    ratios: dict[str, list[float]] = {n: [] for n in names}
    last: dict[str, Run] = {}
    for r in range(args.repeats):
        last = run_repeat(names, batches, args)
        for name in names:
            times[name].append(last[name].ms)
            ratios[name].append(last[name].ms / last["dense"].ms)
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(
            f"{n} {last[n].ms:.3f}" for n in names) + " ms/step", file=sys.stderr, flush=True)

    command = shlex.join([Path(sys.argv[0]).as_posix(), *(sys.argv[1:] if argv is None else argv)])
    header = (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{dt.datetime.now().astimezone().isoformat(timespec='seconds')}, command: `{command}`"
    )
    setting = (
        f"LeNet-5, batch {args.batch_size}, {args.steps} timed steps per run, density "
        f"{args.density}, delta_t {args.delta_t}, {args.repeats} repeats, interleaved by "
        f"{args.interleave}; medians over repeats (ratio: median of the per-repeat ratios "
        "method / dense)."
    )
    lines = [
        "| method | ms/step | ratio to dense | topology updates (changed masks of scheduled) |",
        "|---|---:|---:|---:|",
    ]
    for name in names:
        ms = statistics.median(times[name])
        ratio = statistics.median(ratios[name])
        run = last[name]
        updates = "-" if name == "dense" else (
            f"{run.effective_updates} of {run.scheduled_updates}")
        lines.append(f"| {name} | {ms:.3f} | {ratio:.3f} | {updates} |")
    raw = ["", "Per repeat (ms/step):", ""]
    raw += [f"- {n}: " + ", ".join(f"{v:.3f}" for v in times[n]) for n in names]
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(["# Per-step overhead of sparse training", "", header, "",
                                   setting, "", table, *raw, ""]))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
