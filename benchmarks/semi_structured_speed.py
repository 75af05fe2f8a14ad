"""Inference time of 2:4 Linear layers in torch's semi-structured sparse format, against dense.

On a CUDA GPU (compute capability >= 8.0), in float16 under ``torch.inference_mode()``: the MLP
4096-4096-4096-10 (Linear/ReLU) with 2:4 masks keeping the 2 largest of every 4 weights, and
single 4096x4096 and 8192x8192 layers, at batch 256 and 4096. Dense is the masked model in
``nn.Linear`` layers; 2:4 is its copy from ``to_semi_structured`` (the 10-output layer stays
dense: too few rows for the format). Each timing is ``--reps`` forward passes between two
``torch.cuda.synchronize()``; dense and 2:4 alternate (one timing of each in turn, repeated) so
a change of clock or load hits both alike; the table gives median times, median per-round ratios
dense / 2:4 (higher = 2:4 faster) and the largest output difference. Under a minute on an H200.
Without a CUDA GPU it exits with status 2.

    .venv/bin/python benchmarks/semi_structured_speed.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from _common import write_result
from torch import nn

from sparsetrain.backends.semi_structured import (require_sparse_gpu, semi_structured_class,
                                                  to_semi_structured)


def two_four_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Name -> mask keeping the 2 largest |w| of every 4 consecutive inputs of each Linear."""
    masks = {}
    for name, p in model.named_parameters():
        if name.endswith("weight"):
            groups = p.detach().abs().reshape(-1, 4)
            keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(
                1, groups.topk(2, dim=1).indices, True)
            masks[name] = keep.view(p.shape)
    return masks


def timed(module: nn.Module, x: torch.Tensor, reps: int) -> float:
    """Seconds per forward pass, over ``reps`` passes."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        module(x)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


def compare(model: nn.Module, batches: list[int], rounds: int, reps: int) -> list[tuple]:
    """(batch, dense ms, 2:4 ms, median ratio, max |difference|, converted) for each batch."""
    model = model.to("cuda")  # masks chosen in float32, on the GPU (fast at 8192x8192)
    masks = two_four_masks(model)
    with torch.no_grad():
        for name, mask in masks.items():
            model.get_parameter(name).mul_(mask)
    dense = model.to(dtype=torch.float16).eval()
    sparse, converted, _ = to_semi_structured(dense, masks)
    rows = []
    for batch in batches:
        x = torch.randn(batch, dense[0].in_features, device="cuda", dtype=torch.float16)
        runs = {"dense": dense, "2:4": sparse}
        times = {n: [] for n in runs}
        with torch.inference_mode():
            diff = (dense(x) - sparse(x)).abs().max().item()
            for r in range(rounds + 1):
                for name, module in runs.items():
                    t = timed(module, x, reps)
                    if r:  # the first round warms up
                        times[name].append(t)
        medians = {n: statistics.median(v) * 1000 for n, v in times.items()}
        ratio = statistics.median(d / s for d, s in zip(times["dense"], times["2:4"]))
        rows.append((batch, medians["dense"], medians["2:4"], ratio, diff, converted))
        print(f"batch {batch}: dense {medians['dense']:.3f} ms, 2:4 {medians['2:4']:.3f} ms, "
              f"{ratio:.2f}x", file=sys.stderr)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 4096])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/semi_structured_speed.md"))
    args = parser.parse_args(argv)
    try:
        device = require_sparse_gpu("cuda")
    except RuntimeError as error:
        print(f"semi_structured_speed: {error}", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", message="The PyTorch API of SparseSemiStructuredTensor")
    torch.manual_seed(0)
    cases = {
        "MLP 4096-4096-4096-10": lambda: nn.Sequential(
            nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
            nn.Linear(4096, 10)),
        "Linear 4096x4096": lambda: nn.Sequential(nn.Linear(4096, 4096)),
        "Linear 8192x8192": lambda: nn.Sequential(nn.Linear(8192, 8192)),
    }
    results = {}
    for case, build in cases.items():
        print(case, file=sys.stderr)
        results[case] = compare(build(), args.batches, args.rounds, args.reps)
    major, minor = torch.cuda.get_device_capability(device)
    backend = semi_structured_class().BACKEND
    if backend == "cusparselt":
        backend = f"cuSPARSELt {torch.backends.cusparselt.version()}"
    lines = [
        "# 2:4 semi-structured Linear layers: inference time against dense", "",
        f"torch {torch.__version__}, {torch.cuda.get_device_name(device)} (compute capability "
        f"{major}.{minor}), {backend}, "
        f"{dt.datetime.now().astimezone().isoformat(timespec='seconds')}; float16, "
        f"inference_mode, forward only, {args.rounds} interleaved rounds of {args.reps} passes, "
        "medians. 2:4 masks keep the 2 largest of every 4 weights along the inputs; dense is "
        "the same masked model in nn.Linear layers.", "",
        "| model | 2:4 layers | batch | dense ms | 2:4 ms | speed-up | max abs diff |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for case, rows in results.items():
        for batch, d, s, ratio, diff, converted in rows:
            lines.append(f"| {case} | {len(converted)} | {batch} | {d:.3f} | {s:.3f} | "
                         f"{ratio:.2f}x | {diff:.2g} |")
    write_result(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
