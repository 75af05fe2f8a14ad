"""Cost of sparse training on the masked backend, relative to dense training in the same run.

Two parts. ``lenet5``: every method's step time on a small model. ``mlp``: RigL on a model
whose weights dominate, an MLP 4096-4096-4096-10 at batch 256 (SGD with momentum 0.9, density
0.05, ERK, ``delta_t=100``): the steady step against dense, the update step against a steady
step, and the peak memory against dense (each configuration alone in a child process, through
an update; anonymous resident memory above what the process held before building the model).
In the MLP part dense and RigL steps alternate, so that a change of load hits both alike.

LeNet-5 part: LeNet-5 on random 28x28 batches, SGD (lr 0.01, momentum 0.9, weight decay 5e-4). The dense
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

    .venv/bin/python benchmarks/overhead.py            # both parts (about 6 minutes)
    .venv/bin/python benchmarks/overhead.py --parts lenet5 --steps 800 --repeats 5
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from _common import AnonymousPeak
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


MLP_WIDTHS = (4096, 4096, 4096, 10)


def mlp(widths) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(widths) - 2 else [])
    return nn.Sequential(*layers)


def mlp_run(config: dict):
    """(model, optimizer, sparsifier or None, batch) of the MLP part."""
    torch.manual_seed(0)
    model = mlp(config["widths"])
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sp = None
    if config["method"] != "dense":
        sp = st.make_sparsifier(config["method"], model, opt, density=config["density"],
                                total_steps=config["total_steps"], delta_t=config["delta_t"])
    x = torch.randn(config["batch"], config["widths"][0])
    y = torch.randint(0, config["widths"][-1], (config["batch"],))
    return model, opt, sp, (x, y)


def timed_step(model, opt, sp, batch) -> float:
    start = time.perf_counter()
    opt.zero_grad()
    nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
    (sp or opt).step()
    return time.perf_counter() - start


def memory_child(config: dict) -> dict:
    """Peak memory of one configuration, through ``config["steps"]`` steps."""
    warm = mlp_run({**config, "widths": (64, 64, 4), "batch": 8})  # first-use allocations
    for _ in range(3):
        timed_step(*warm)
    del warm
    gc.collect()
    anon = AnonymousPeak()
    run = mlp_run(config)
    for _ in range(config["steps"]):
        timed_step(*run)
    updates = 0 if run[2] is None else sum(run[2].is_update_step(t)
                                           for t in range(1, config["steps"] + 1))
    return {"peak_mb": anon.stop(), "updates": updates}


def peak_memory(config: dict) -> dict:
    # a fixed mmap threshold: freed blocks go back to the system at once, so the resident
    # figure measures live memory and not what glibc's heap keeps after temporaries are freed
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, __file__, "--memory-child", json.dumps(config)],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def mlp_part(args) -> list[str]:
    """Steady step, update step and peak memory of RigL (masked) against dense on the MLP."""
    base = {"widths": tuple(args.mlp_widths), "batch": args.mlp_batch, "density": 0.05,
            "delta_t": args.mlp_delta_t, "total_steps": 10 * args.mlp_delta_t}
    dense, rigl = mlp_run({**base, "method": "dense"}), mlp_run({**base, "method": "rigl"})
    for _ in range(2):
        timed_step(*dense)
    # rigl's first update falls at delta_t: step on to just past the second, dense alongside
    dense_t, steady_t, update_t = [], [], []
    while rigl[2].step_count < 2 * args.mlp_delta_t + 3:
        dense_t.append(timed_step(*dense))
        update = rigl[2].is_update_step(rigl[2].step_count + 1)
        (update_t if update else steady_t).append(timed_step(*rigl))
    dense_ms = 1000 * statistics.median(dense_t)
    steady_ms = 1000 * statistics.median(steady_t)
    update_ms = 1000 * statistics.median(update_t)
    memory = {m: peak_memory({**base, "method": m, "delta_t": 3, "steps": 5})
              for m in ("dense", "rigl")}
    ratio = memory["rigl"]["peak_mb"] / memory["dense"]["peak_mb"]
    widths = "-".join(map(str, base["widths"]))
    print(f"MLP: dense {dense_ms:.0f} ms, RigL steady {steady_ms:.0f} ms, update "
          f"{update_ms:.0f} ms, memory {ratio:.2f}x", file=sys.stderr)
    return [
        f"MLP {widths}, batch {base['batch']}, SGD momentum 0.9, RigL (masked) at density "
        f"0.05, ERK, delta_t {base['delta_t']}; {len(dense_t)} dense and RigL steps "
        f"alternating ({len(update_t)} of them RigL updates); medians. Peak memory: each "
        "alone in a child process through 5 steps with an update (delta_t 3), anonymous "
        "resident memory above the level before the model was built.",
        "",
        "| figure | RigL (masked) | dense | ratio | target |",
        "|---|---:|---:|---:|---:|",
        f"| steady step | {steady_ms:.1f} ms | {dense_ms:.1f} ms | {steady_ms / dense_ms:.3f}x "
        "| <= 1.10x dense |",
        f"| update step | {update_ms:.1f} ms | {steady_ms:.1f} ms (steady) | "
        f"{update_ms / steady_ms:.2f}x | <= 3x a steady step |",
        f"| peak memory | {memory['rigl']['peak_mb']:.0f} MB | "
        f"{memory['dense']['peak_mb']:.0f} MB | {ratio:.3f}x | <= 1.3x dense |",
        "",
        "Steps (ms): dense " + ", ".join(f"{1000 * t:.0f}" for t in dense_t)
        + "; RigL updates " + ", ".join(f"{1000 * t:.0f}" for t in update_t),
    ]


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
    parser.add_argument("--parts", nargs="+", choices=("lenet5", "mlp"),
                        default=["lenet5", "mlp"])
    parser.add_argument("--mlp-widths", type=int, nargs="+", default=list(MLP_WIDTHS))
    parser.add_argument("--mlp-batch", type=int, default=256)
    parser.add_argument("--mlp-delta-t", type=int, default=100)
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/overhead.md"))
    args = parser.parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return 0
    if args.steps <= 0 or args.repeats <= 0 or args.batch_size <= 0:
        parser.error("--steps, --repeats and --batch-size must be positive")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    command = shlex.join([Path(sys.argv[0]).as_posix(), *(sys.argv[1:] if argv is None else argv)])
    lines = ["# Cost of sparse training on the masked backend", "",
             f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
             f"{dt.datetime.now().astimezone().isoformat(timespec='seconds')}, command: "
             f"`{command}`", ""]
    if "mlp" in args.parts:
        lines += ["## RigL on an MLP whose weights dominate", "", *mlp_part(args), ""]
    if "lenet5" in args.parts:
        lines += ["## Every method on LeNet-5", "", *lenet5_part(args), ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def lenet5_part(args) -> list[str]:
    """Every method's step time on LeNet-5 against dense, interleaved."""
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
    setting = (
        f"LeNet-5, batch {args.batch_size}, {args.steps} timed steps per run, density "
        f"{args.density}, delta_t {args.delta_t}, {args.repeats} repeats, interleaved by "
        f"{args.interleave}; medians over repeats (ratio: median of the per-repeat ratios "
        "method / dense; target for RigL: <= 1.05x)."
    )
    lines = [
        setting, "",
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
    lines += ["", "Per repeat (ms/step):", ""]
    lines += [f"- {n}: " + ", ".join(f"{v:.3f}" for v in times[n]) for n in names]
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
