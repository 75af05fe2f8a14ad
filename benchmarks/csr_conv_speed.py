"""Can a CSR convolution beat dense? im2col plus the CSR kernel against torch's Conv2d.

A 3x3 convolution, 256 -> 256 channels on 16x16 maps at batch 32 (a ResNet stage), forward
only: dense ``F.conv2d`` (oneDNN) against ``F.unfold`` (im2col) into the features x positions
layout, the compiled CSR product with the weight as a (256, 2304) CSR matrix, and the reshape
back. Interleaved rounds, medians; the speed-up is dense / CSR. The backward pass would add two
more products of the same kind (and a col2im), so the forward shows whether it can pay off.

    .venv/bin/python benchmarks/csr_conv_speed.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import write_result

from sparsetrain.backends.csr import CSRLinear, compiled_kernels


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.05, 0.02, 0.01])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/csr_conv_speed.md"))
    args = parser.parse_args(argv)
    if compiled_kernels() is None:
        print("the compiled CSR kernels are not available here", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    c, s, b = args.channels, args.size, args.batch
    x = torch.randn(b, c, s, s)
    weight = torch.randn(c, c, 3, 3) / 48

    @torch.no_grad()
    def csr_conv(layer):
        cols = F.unfold(x, 3, padding=1)                      # (b, c*9, s*s)
        rows = cols.transpose(1, 2).reshape(b * s * s, c * 9)  # positions x features
        out = layer(rows)                                     # the layer's compiled product
        return out.view(b, s, s, c).permute(0, 3, 1, 2)

    rows = []
    for density in args.densities:
        mask = torch.rand(c, c * 9) < density
        layer = CSRLinear(weight.reshape(c, -1), mask)
        masked = (weight.reshape(c, -1) * mask).view_as(weight)
        torch.testing.assert_close(csr_conv(layer), F.conv2d(x, masked, padding=1),
                                   atol=1e-4, rtol=1e-4)
        runs = {"dense": lambda: F.conv2d(x, weight, padding=1),
                "csr": lambda layer=layer: csr_conv(layer)}
        times = {n: [] for n in runs}
        for r in range(args.rounds + 1):
            for name, f in runs.items():
                start = time.perf_counter()
                f()
                if r:
                    times[name].append(time.perf_counter() - start)
        dense_ms = statistics.median(times["dense"]) * 1000
        csr_ms = statistics.median(times["csr"]) * 1000
        rows.append((density, dense_ms, csr_ms))
        print(f"density {density}: dense {dense_ms:.2f} ms, CSR {csr_ms:.2f} ms",
              file=sys.stderr)
    lines = [
        "# CSR convolution (im2col + CSR product) against dense Conv2d, forward", "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{dt.datetime.now().astimezone().isoformat(timespec='seconds')}; 3x3 conv, "
        f"{c} -> {c} channels, {s}x{s}, batch {b}, {args.rounds} interleaved rounds, medians.",
        "", "| density | dense ms | CSR ms | speed-up |", "|---:|---:|---:|---:|",
    ]
    for density, dense_ms, csr_ms in rows:
        lines.append(f"| {density} | {dense_ms:.2f} | {csr_ms:.2f} | {dense_ms / csr_ms:.2f}x |")
    write_result(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
