"""Training-step time of the zoo's GPT: dense against RigL on the masked and the CSR backend, in
float32 and under bfloat16 autocast, eager and ``torch.compile``d.

``gpt-mini`` (4 blocks, 256-byte vocabulary) at embedding 256 and 512 (``width`` 1 and 2), a
batch of ``--batch`` sequences of ``--context`` tokens: with a short context the attention
scores (``context x embed`` per token) are small beside the weight products (``12 embed^2`` per
token), so the products, which density scales, dominate the step. A step is forward,
cross-entropy, backward and AdamW (through the sparsifier's ``step()`` for the sparse runs; RigL
with ``delta_t`` past the end of the run, so no topology update falls in the timed steps).
Sparse runs: density 0.1, uniform across layers, every Linear layer sparse (the four blocks'
qkv, proj, fc and fc_out, and the output layer ``head``), the token embedding ``wte`` dense (a
lookup, whose cost does not depend on its density) and the position embedding dense as always.

For each width, precision and mode (eager or compiled), the three models are built, warmed up
(compiling where asked) and then stepped in turn, one step of each per round, so that a change
of machine load hits all alike; the table gives each run's median step time and its ratio
dense / run (higher = faster than dense).

    .venv/bin/python benchmarks/gpt_step.py            # everything (about 4 minutes)
    .venv/bin/python benchmarks/gpt_step.py --quick    # width 512, eager only
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from _common import write_result
from torch import nn

import sparsetrain as st
from sparsetrain.kernels import compiled_kernels
from sparsetrain.models import build_model

RUNS = ("dense", "masked", "csr")
DENSITY = 0.1


def make(run: str, width: int, context: int):
    """(model to call, sparsifier or optimizer to step) for one run, seeded alike."""
    torch.manual_seed(0)
    model = build_model("gpt-mini", num_classes=256, input_shape=(context,), width=width)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if run == "dense":
        return model, opt
    sp = st.RigL(model, opt, density=DENSITY, distribution="uniform", total_steps=10_000,
                 delta_t=10_000, dense_layers=["wte.weight"], backend=run)
    return model, sp


def step(forward, stepper, x, y, autocast: bool) -> float:
    start = time.perf_counter()
    getattr(stepper, "optimizer", stepper).zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = forward(x)
    nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten()).backward()
    stepper.step()
    return time.perf_counter() - start


def measure(width: int, autocast: bool, compiled: bool, args) -> dict[str, float]:
    """Median step time of each run, in seconds."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (args.batch, args.context), generator=g)
    y = torch.randint(0, 256, (args.batch, args.context), generator=g)
    runs = {}
    for run in RUNS:
        model, stepper = make(run, width, args.context)
        forward = torch.compile(model) if compiled else model
        for _ in range(args.warmup):
            step(forward, stepper, x, y, autocast)
        runs[run] = (forward, stepper)
    times = {run: [] for run in RUNS}
    for _ in range(args.rounds):
        for run, (forward, stepper) in runs.items():
            times[run].append(step(forward, stepper, x, y, autocast))
    torch._dynamo.reset()
    return {run: statistics.median(t) for run, t in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--widths", type=int, nargs="+", default=[1, 2],
                        help="zoo widths: 1 is embedding 256, 2 is 512")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "gpt_step.md")
    args = parser.parse_args()
    if compiled_kernels() is None:
        print("the compiled CSR kernels are not available; the figures would be of torch's "
              "fallback", file=sys.stderr)
    widths = (2,) if args.quick else args.widths
    modes = (False,) if args.quick else (False, True)
    load = os.getloadavg()[0]
    rows = []
    for width in widths:
        for autocast in (False, True):
            for compiled in modes:
                t = measure(width, autocast, compiled, args)
                rows.append((width, autocast, compiled, t))
                print(width, autocast, compiled, {k: f"{v * 1e3:.0f} ms" for k, v in t.items()},
                      file=sys.stderr)
    lines = [
        "# GPT training step: dense against RigL on the masked and CSR backends", "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, compiled kernels "
        f"{'yes' if compiled_kernels() is not None else 'no'}, "
        f"{dt.datetime.now().astimezone().isoformat(timespec='seconds')}; load average "
        f"(1 min) {load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end.", "",
        f"`gpt-mini`, vocabulary 256, batch {args.batch} x context {args.context} = "
        f"{args.batch * args.context} tokens a step; AdamW; sparse runs RigL at density "
        f"{DENSITY}, uniform, every Linear layer sparse (blocks and head), `wte` dense. "
        f"Median of {args.rounds} interleaved rounds after {args.warmup} warm-up steps; "
        "speed-up = dense ms / run ms in the same round set (higher = faster).", "",
        "| embed | precision | mode | dense ms | masked ms | CSR ms | masked speed-up "
        "| CSR speed-up |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for width, autocast, compiled, t in rows:
        lines.append(
            f"| {256 * width} | {'bf16 autocast' if autocast else 'fp32'} | "
            f"{'compiled' if compiled else 'eager'} | {t['dense'] * 1e3:.0f} | "
            f"{t['masked'] * 1e3:.0f} | {t['csr'] * 1e3:.0f} | "
            f"{t['dense'] / t['masked']:.2f}x | {t['dense'] / t['csr']:.2f}x |")
    write_result(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
