"""Pruning at initialisation on Fashion-MNIST: accuracy per method and density, and score time.

A small CNN (conv 1->16, conv 16->32, each 3x3 with ReLU and 2x2 max-pooling, then fully
connected 1568 -> 100 -> 10; 162,552 sparsifiable weights) is initialised once. Each pruning
method (``random``, ``magnitude``, ``snip``, ``grasp``, ``synflow`` with its 100 iterative
rounds) prunes that same initialisation globally to each density, then the network trains
briefly with the mask fixed (``st.Static``): SGD with momentum 0.9, cosine learning rate, the
same batches in the same order for every run. A dense run of the same length is the baseline.

The scoring data is the first ``--score-batches`` training batches (SNIP uses all of them,
GraSP draws 10 examples per class from them as its authors do); SynFlow uses no data. The time
of each ``prune_at_init`` call (scoring and selection) is reported next to the dense training
time of one epoch in the same run, since the machine may be shared.

    .venv/bin/python benchmarks/pruning_at_init.py                   # 2 epochs per run
    .venv/bin/python benchmarks/pruning_at_init.py --epochs 1 --train-size 20000
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import shlex
import sys
import time
from pathlib import Path

import torch
from _common import write_result
from torch import nn

import sparsetrain as st
from sparsetrain.data.fashion_mnist import load_fashion_mnist
from sparsetrain.pruning import mask_density


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 7 * 7, 100)
        self.fc2 = nn.Linear(100, 10)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 2000) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    model.train()
    return correct / len(y)


def train(model: nn.Module, masks, density: float, data, args) -> tuple[float, float]:
    """Train with the masks fixed (dense when ``masks`` is None); test accuracy and seconds."""
    x_train, y_train, x_test, y_test = data
    steps_per_epoch = math.ceil(len(y_train) / args.batch_size)
    total = steps_per_epoch * args.epochs
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    stepper = opt
    if masks is not None:
        stepper = st.Static(model, opt, density=density, total_steps=total, masks=masks)
    order = torch.Generator().manual_seed(1)
    start = time.perf_counter()
    for _ in range(args.epochs):
        perm = torch.randperm(len(y_train), generator=order)
        for i in range(0, len(y_train), args.batch_size):
            idx = perm[i:i + args.batch_size]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            stepper.step()
            schedule.step()
    seconds = time.perf_counter() - start
    return accuracy(model, x_test, y_test), seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.02, 0.005])
    parser.add_argument("--methods", nargs="+", default=list(st.PRUNING_METHODS))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--train-size", type=int, default=None,
                        help="train on the first N training images (default: all 60,000)")
    parser.add_argument("--score-batches", type=int, default=4)
    parser.add_argument("--synflow-iterations", type=int, default=100)
    parser.add_argument("--data-dir", default=None, help="folder of the Fashion-MNIST IDX files")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/pruning_at_init.md"))
    args = parser.parse_args(argv)

    kwargs = {} if args.data_dir is None else {"root": args.data_dir}
    x_train, y_train = load_fashion_mnist("train", **kwargs)
    x_test, y_test = load_fashion_mnist("test", **kwargs)
    if args.train_size:
        x_train, y_train = x_train[:args.train_size], y_train[:args.train_size]
    data = (x_train, y_train, x_test, y_test)
    g = torch.Generator().manual_seed(2)
    perm = torch.randperm(len(y_train), generator=g)[:args.score_batches * args.batch_size]
    score_data = [(x_train[idx], y_train[idx]) for idx in perm.split(args.batch_size)]

    torch.manual_seed(0)
    init = SmallCNN().state_dict()
    n_weights = sum(t.numel for t in st.find_targets(SmallCNN()))

    def fresh() -> nn.Module:
        model = SmallCNN()
        model.load_state_dict(init)
        return model

    dense_acc, dense_s = train(fresh(), None, 1.0, data, args)
    epoch_s = dense_s / args.epochs
    print(f"dense: accuracy {dense_acc:.4f}, {epoch_s:.1f} s per epoch", file=sys.stderr)

    results: dict[tuple[str, float], tuple[float, float, float]] = {}
    for method in args.methods:
        options = {"iterations": args.synflow_iterations} if method == "synflow" else {}
        for density in args.densities:
            model = fresh()
            start = time.perf_counter()
            masks = st.prune_at_init(model, method, density, data=score_data, **options)
            score_s = time.perf_counter() - start
            acc, _ = train(model, masks, density, data, args)
            results[method, density] = (acc, score_s, mask_density(masks))
            print(f"{method} d={density}: accuracy {acc:.4f}, prune_at_init {score_s:.2f} s",
                  file=sys.stderr, flush=True)

    command = shlex.join([Path(sys.argv[0]).as_posix(), *(sys.argv[1:] if argv is None else argv)])
    sparsity = [f"{100 * (1 - d):g}%" for d in args.densities]
    lines = [
        "# Pruning at initialisation on Fashion-MNIST",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{dt.datetime.now().astimezone().isoformat(timespec='seconds')}, command: `{command}`",
        "",
        f"Small CNN ({n_weights} sparsifiable weights), one initialisation for every run, "
        f"pruned globally, then {args.epochs} epoch(s) on {len(y_train)} training images with "
        f"the mask fixed (SGD momentum 0.9, lr {args.lr} cosine, batch {args.batch_size}); "
        f"test accuracy on {len(y_test)} images. Scoring data: {len(perm)} training images "
        f"(GraSP: 10 per class of them). SynFlow: {args.synflow_iterations} rounds.",
        "",
        f"Dense baseline: test accuracy {dense_acc:.4f}; one dense training epoch took "
        f"{epoch_s:.1f} s in this run.",
        "",
    ]

    def table(title: str, cell) -> list[str]:
        rows = [title, "", "| method | " + " | ".join(sparsity) + " |",
                "|---|" + "---:|" * len(sparsity)]
        rows += [f"| {m} | " + " | ".join(cell(*results[m, d]) for d in args.densities) + " |"
                 for m in args.methods]
        return rows + [""]

    lines += table("Test accuracy by sparsity:", lambda acc, s, dens: f"{acc:.4f}")
    lines += table(
        "Time of `prune_at_init` (scores and selection), seconds, and as a fraction of one dense "
        "training epoch:",
        lambda acc, s, dens: f"{s:.2f} ({s / epoch_s:.3f})",
    )
    write_result(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
