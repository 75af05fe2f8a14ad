"""Training throughput on 2 CPU processes (torch.distributed, gloo) against 1, same total batch.

`sparsetrain train` runs the same configuration (RigL on the masked backend, total batch 256)
on one process with all the machine's cores as threads and, through `--nproc 2`, on two
processes with half the cores each. The throughput is the training examples per second of the
training loop (summary.json's `steps * batch_size / wall_time_s`: start-up, data loading and
evaluation excluded). The two are run alternately, `--repeats` times each, and the medians
compared; the ratio > 1 means 2 processes train faster.

    .venv/bin/python benchmarks/ddp_throughput.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from _common import write_result

from sparsetrain.runner.folder import read_summary

CASES = {
    "lenet300 on fashion-mnist": ["--model", "lenet300", "--data", "fashion-mnist"],
    "lenet5 on fashion-mnist": ["--model", "lenet5", "--data", "fashion-mnist"],
}


def run(case: list[str], nproc: int, args, folder: Path) -> float:
    cores = os.cpu_count() or 1
    command = [sys.executable, "-m", "sparsetrain", "train", *case, "--method", "rigl",
               "--density", "0.1", "--epochs", "1", "--train-size", str(args.train_size),
               "--batch-size", str(args.batch), "--no-progress", "--checkpoint-every", "0",
               "--out", str(folder), "--nproc", str(nproc)]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, cores // nproc)))
    subprocess.run(command, check=True, env=env, capture_output=True, text=True)
    summary = read_summary(folder)
    return summary["steps"] * args.batch / summary["wall_time_s"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--train-size", type=int, default=15360)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/ddp_throughput.md"))
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, case in CASES.items():
            speeds: dict[int, list[float]] = {1: [], 2: []}
            for r in range(args.repeats):
                for nproc in (1, 2):
                    folder = Path(tmp) / f"{name.split()[0]}-{nproc}-{r}"
                    speeds[nproc].append(run(case, nproc, args, folder))
                    print(f"{name}, {nproc} process(es): {speeds[nproc][-1]:.0f} examples/s",
                          file=sys.stderr)
            one, two = statistics.median(speeds[1]), statistics.median(speeds[2])
            rows.append((name, one, two))
    lines = [
        "# Data-parallel training: 2 processes against 1, same total batch", "",
        f"torch {torch.__version__}, {os.cpu_count()} cores, "
        f"{dt.datetime.now().astimezone().isoformat(timespec='seconds')}; RigL (masked), "
        f"density 0.1, total batch {args.batch}, {args.train_size} training examples (one "
        f"epoch), medians of {args.repeats} alternating runs. One process uses all cores as "
        "threads; each of the two processes half of them.", "",
        "| model and data | 1 process, examples/s | 2 processes, examples/s | ratio |",
        "|---|---:|---:|---:|",
    ]
    for name, one, two in rows:
        lines.append(f"| {name} | {one:.0f} | {two:.0f} | {two / one:.2f} |")
    write_result(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
