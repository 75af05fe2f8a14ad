"""Training-step time of one 4096x4096 Linear layer with block-structured weights, against dense.

Forward, backward and an SGD step (momentum 0.9) of a 4096 -> 4096 layer at batch 256: dense
``nn.Linear``, unstructured ``CSRLinear`` (compiled kernels), and ``CSRLinear`` with its weights
in aligned R x C blocks (``set_block_shape``, the block kernels), at the same densities. The
runs are interleaved (one step of each in turn, repeated) so that a change of machine load hits
all alike; the table gives median times, the median per-round ratio dense / sparse (higher =
sparse faster) and that ratio as a share of the ideal 1 / density.

    .venv/bin/python benchmarks/structured_layer_speed.py
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

BLOCKS = ["4x4", "8x1", "4x1", "16x1", "1x4"]


def timed_step(module, opt, x) -> float:
    start = time.perf_counter()
    opt.zero_grad()
    module(x).square().mean().backward()
    opt.step()
    return time.perf_counter() - start


def block_mask(features: int, density: float, r: int, c: int) -> torch.Tensor:
    """Aligned r x c blocks, each active with probability ``density``."""
    blocks = torch.rand(features // r, features // c) < density
    return blocks.repeat_interleave(r, 0).repeat_interleave(c, 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.05, 0.02, 0.01])
    parser.add_argument("--blocks", nargs="+", default=BLOCKS)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/structured_layer_speed.md"))
    args = parser.parse_args(argv)
    if kernels_module.compiled_kernels() is None:
        print("the compiled kernels cannot be built here", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.features)
    names = ["unstructured", *args.blocks]
    rows = []
    for density in args.densities:
        dense = nn.Linear(args.features, args.features)
        runs = {"dense": dense,
                "unstructured": CSRLinear.from_linear(
                    dense, torch.rand(args.features, args.features) < density)}
        for spec in args.blocks:
            r, c = (int(v) for v in spec.split("x"))
            layer = CSRLinear.from_linear(dense, block_mask(args.features, density, r, c))
            layer.set_block_shape((r, c))
            runs[spec] = layer
        opts = {n: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
                for n, m in runs.items()}
        times = {n: [] for n in runs}
        for rnd in range(args.rounds + 1):
            for name, module in runs.items():
                t = timed_step(module, opts[name], x)
                if rnd:  # the first round warms up
                    times[name].append(t)
        medians = {n: statistics.median(v) * 1000 for n, v in times.items()}
        ratios = {n: statistics.median(d / s for d, s in zip(times["dense"], times[n]))
                  for n in names}
        actual = {n: runs[n].nnz / args.features ** 2 for n in names}
        rows.append((density, medians, ratios, actual))
        print(f"density {density}: " + ", ".join(f"{n} {m:.1f} ms ({ratios.get(n, 1):.1f}x)"
                                                 for n, m in medians.items()), file=sys.stderr)
    lines = [
        "# Block-structured Linear layer: training-step time against dense", "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{dt.datetime.now().astimezone().isoformat(timespec='seconds')}; "
        f"{args.features}x{args.features} layer, batch {args.batch}, forward + backward + SGD "
        f"step (momentum 0.9), {args.rounds} interleaved rounds, medians. Unstructured: CSRLinear "
        "with the compiled CSR kernels; RxC: CSRLinear with `set_block_shape((R, C))` on "
        "aligned R x C blocks (R outputs x C inputs), each kept with probability = density.", "",
        "Speed-up: median per-round ratio dense / sparse step time; % ideal: speed-up x density "
        "(100% = the ideal 1 / density, with the layer's actual density).", "",
        "| density | dense ms | " + " | ".join(f"{n} ms" for n in names) + " |",
        "|---:|---:|" + "---:|" * len(names),
    ]
    for density, m, _, _ in rows:
        lines.append(f"| {density} | {m['dense']:.1f} | "
                     + " | ".join(f"{m[n]:.2f}" for n in names) + " |")
    lines += ["", "| density | " + " | ".join(f"{n} speed-up (% ideal)" for n in names) + " |",
              "|---:|" + "---:|" * len(names)]
    for density, _, r, a in rows:
        lines.append(f"| {density} | " + " | ".join(
            f"{r[n]:.2f}x ({100 * r[n] * a[n]:.0f}%)" for n in names) + " |")
    write_result(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
