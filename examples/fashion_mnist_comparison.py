"""Compare dense training with Static, SET, SNFS, RigL and GMP on Fashion-MNIST.

Trains LeNet-300-100 (an MLP 784-300-100-10) once per method at the same density and prints a
table of test accuracy, the per-layer densities of the sparse models, and writes the same as a
Markdown report. The data comes from Debian's ``dataset-fashion-mnist``.

    .venv/bin/python examples/fashion_mnist_comparison.py --epochs 10 --density 0.05
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
from pathlib import Path

import torch
from torch import nn

import sparsetrain as st
from sparsetrain.data import FASHION_MNIST_DIR, load_fashion_mnist


def lenet_300_100() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 300), nn.ReLU(),
        nn.Linear(300, 100), nn.ReLU(),
        nn.Linear(100, 10),
    )


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 2000) -> float:
    model.eval()
    correct = sum(
        int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
        for i in range(0, len(x), batch)
    )
    model.train()
    return correct / len(x)


def train(method: str, data, args) -> dict:
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(args.seed)
    model = lenet_300_100()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    steps_per_epoch = len(x_train) // args.batch_size
    total_steps = steps_per_epoch * args.epochs
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total_steps)
    sparsifier = None
    if method != "dense":
        sparsifier = st.make_sparsifier(
            method, model, opt, density=args.density, distribution=args.distribution,
            total_steps=total_steps, delta_t=args.delta_t, seed=args.seed,
        )
    order = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for _ in range(args.epochs):
        perm = torch.randperm(len(x_train), generator=order)
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size : (i + 1) * args.batch_size]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            (sparsifier or opt).step()
            sched.step()
    seconds = time.perf_counter() - start
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    nonzero = sum(int((p != 0).sum()) for p in weights)
    return {
        "method": method,
        "accuracy": accuracy(model, x_test, y_test),
        "density": nonzero / sum(p.numel() for p in weights),
        "nonzero": nonzero,
        "seconds": seconds,
        "layers": sparsifier.layer_densities() if sparsifier else {},
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["dense", "static", "set", "snfs", "rigl", "gmp"])
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--distribution", default="erk", choices=st.DISTRIBUTIONS)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--delta-t", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=FASHION_MNIST_DIR)
    parser.add_argument("--limit", type=int, default=None, help="use only this many training images")
    parser.add_argument("--report", type=Path, default=Path("reports/fashion_mnist/report.md"))
    args = parser.parse_args(argv)
    st.sparsity.distributions.check_density(args.density)
    for method in args.methods:
        if method != "dense":
            st.get_method(method)

    x_train, y_train = load_fashion_mnist("train", args.data)
    x_test, y_test = load_fashion_mnist("test", args.data)
    if args.limit:
        x_train, y_train = x_train[: args.limit], y_train[: args.limit]
    data = (x_train, y_train, x_test, y_test)
    print(f"Fashion-MNIST: {len(x_train)} training, {len(x_test)} test images; LeNet-300-100, "
          f"{args.epochs} epochs, density {args.density} ({args.distribution})")

    results = []
    for method in args.methods:
        result = train(method, data, args)
        results.append(result)
        print(f"  {method:<7} test accuracy {result['accuracy']:.4f}  ({result['seconds']:.1f} s)")

    lines = [
        "| method | test accuracy | weight density | non-zero weights | train time (s) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r['method']} | {r['accuracy']:.4f} | {r['density']:.4f} | {r['nonzero']} | "
        f"{r['seconds']:.1f} |"
        for r in results
    ]
    layer_names = next((list(r["layers"]) for r in results if r["layers"]), [])
    layer_lines = []
    if layer_names:
        layer_lines = [
            "| method | " + " | ".join(layer_names) + " |",
            "| --- |" + " ---: |" * len(layer_names),
        ] + [
            f"| {r['method']} | " + " | ".join(f"{r['layers'][n]:.4f}" for n in layer_names) + " |"
            for r in results
            if r["layers"]
        ]
    table = "\n".join(lines)
    print("\n" + table + "\n\nPer-layer density at the end of training:\n" + "\n".join(layer_lines))

    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(
        "# Sparse training on Fashion-MNIST\n\n"
        f"{dt.datetime.now():%Y-%m-%d %H:%M}; torch {torch.__version__}; LeNet-300-100, "
        f"{args.epochs} epochs of {len(x_train)} images, batch {args.batch_size}, SGD lr "
        f"{args.lr} (cosine), momentum 0.9, weight decay 5e-4; density {args.density} "
        f"({args.distribution}), delta_t {args.delta_t}, seed {args.seed}.\n\n"
        f"{table}\n\n## Per-layer density at the end of training\n\n"
        + "\n".join(layer_lines) + "\n"
    )
    print(f"\nreport written to {args.report}")


if __name__ == "__main__":
    main()
