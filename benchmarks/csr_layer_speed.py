"""Training-step time of one 4096x4096 Linear layer stored as CSR, relative to dense.

A first measurement for the CSR backend: forward, backward and an SGD step (momentum 0.9) of a
4096 -> 4096 layer at batch 256, dense ``nn.Linear`` against ``CSRLinear`` with the compiled
OpenMP kernels and with torch's own sparse operations. The runs are interleaved (one step of
each in turn, repeated) so a change of machine load hits all alike; the table gives median
times and median per-round ratios dense / CSR (higher = CSR faster).

    .venv/bin/python benchmarks/csr_layer_speed.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from pathlib import Path

import torch
from _common import write_result
from torch import nn

import sparsetrain.kernels as kernels_module
from sparsetrain.backends.csr import CSRLinear


def timed_step(module, opt, x, use_kernels: bool) -> float:
    saved = kernels_module._KERNELS
    if not use_kernels:
        kernels_module._KERNELS = False
    try:
        start = time.perf_counter()
        opt.zero_grad()
        module(x).square().mean().backward()
        opt.step()
        return time.perf_counter() - start
    finally:
        kernels_module._KERNELS = saved


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.05, 0.02, 0.01])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/csr_layer_speed.md"))
    args = parser.parse_args(argv)
    kernels = kernels_module.compiled_kernels() is not None
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.features)
    rows = []
    for density in args.densities:
        dense = nn.Linear(args.features, args.features)
        mask = torch.rand(args.features, args.features) < density
        runs = {"dense": (dense, True), "csr-compiled": (CSRLinear.from_linear(dense, mask), True),
                "csr-torch": (CSRLinear.from_linear(dense, mask), False)}
        if not kernels:
            del runs["csr-compiled"]
        opts = {n: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
                for n, (m, _) in runs.items()}
        times = {n: [] for n in runs}
        for r in range(args.rounds + 1):
            for name, (module, use) in runs.items():
                t = timed_step(module, opts[name], x, use)
                if r:  # the first round warms up
                    times[name].append(t)
        medians = {n: statistics.median(v) * 1000 for n, v in times.items()}
        ratios = {n: statistics.median(d / c for d, c in zip(times["dense"], times[n]))
                  for n in runs if n != "dense"}
        rows.append((density, medians, ratios))
        print(f"density {density}: " + ", ".join(f"{n} {m:.1f} ms" for n, m in medians.items()),
              file=sys.stderr)
    lines = [
        "# CSR Linear layer: training-step time against dense", "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{dt.datetime.now().astimezone().isoformat(timespec='seconds')}; "
        f"{args.features}x{args.features} layer, batch {args.batch}, forward + backward + SGD "
        f"step, {args.rounds} interleaved rounds, medians.", "",
        "| density | dense ms | CSR compiled ms | CSR torch ops ms | speed-up compiled | "
        "speed-up torch ops |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for density, m, r in rows:
        nan = float("nan")
        lines.append(f"| {density} | {m['dense']:.1f} | {m.get('csr-compiled', nan):.1f} | "
                     f"{m['csr-torch']:.1f} | {r.get('csr-compiled', nan):.2f}x | "
                     f"{r['csr-torch']:.2f}x |")
    write_result(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
