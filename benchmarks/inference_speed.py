"""Inference of exported sparse models against dense: latency at batch 1, throughput at 64, 256.

Two models, every ``nn.Linear`` weight sparse (uniform random masks at the given density, the
last layer included): the MLP 4096-4096-4096-10 (ReLU between) and LeNet-300-100
(``build_model("lenet300")``, 28x28 inputs). Each sparse model is built as a user gets it:
``export_sparse(model, masks, path)`` then ``load_sparse(path, model=<fresh dense module>)``,
which gives an eval-mode module of ``CSRLinear`` layers (ReLUs fused where they are modules)
with no gradients. Its dense twin is the same weights in plain ``nn.Linear`` layers (zeros
where pruned), in eval mode. Both run under ``torch.inference_mode()``.

Latency: the median time of single-example forwards. Throughput: examples per second of
forwards at batch 64 and 256 (median time a forward). Dense and sparse are measured in turn,
``--rounds`` times, and each figure is the median over rounds (a ratio: the median of the
per-round ratios, dense time / sparse time, higher = sparse faster), so that a change of load
on the machine hits both alike.

    .venv/bin/python benchmarks/inference_speed.py            # the full run
    .venv/bin/python benchmarks/inference_speed.py --quick    # a smoke run (fewer repeats)
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import write_result
from torch import nn

from sparsetrain.backends.csr import CSRLinear, compiled_kernels
from sparsetrain.backends.csr_infer import SPMV_MAX_BATCH
from sparsetrain.deploy import export_sparse, load_sparse
from sparsetrain.models import build_model

BATCHES = (64, 256)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
                         nn.Linear(4096, 10))


def lenet300() -> nn.Module:
    return build_model("lenet300", num_classes=10, input_shape=(1, 28, 28))


MODELS = {"mlp-4096": (mlp, (4096,)), "lenet300": (lenet300, (1, 28, 28))}


def sparse_pair(build, density: float, seed: int, folder: Path) -> tuple[nn.Module, nn.Module]:
    """(dense model, sparse model loaded from its export) with the same weights."""
    torch.manual_seed(seed)
    dense = build()
    masks = {}
    with torch.no_grad():
        for name, module in dense.named_modules():
            if isinstance(module, nn.Linear):
                mask = torch.rand(module.weight.shape) < density
                module.weight.mul_(mask)
                masks[f"{name}.weight"] = mask
    path = export_sparse(dense, masks, folder / f"model-{seed}-{density}.safetensors")
    sparse = load_sparse(path, model=build())
    assert sum(isinstance(m, CSRLinear) for m in sparse.modules()) == len(masks)
    assert not any(p.requires_grad for p in sparse.parameters())
    return dense.eval().requires_grad_(False), sparse


def median_seconds(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(dense: nn.Module, sparse: nn.Module, shape, rounds: int, repeats: dict[int, int]
            ) -> dict[int, dict[str, float]]:
    """batch -> dense and sparse median seconds a forward, and the median per-round ratio."""
    g = torch.Generator().manual_seed(0)
    inputs = {b: torch.randn(b, *shape, generator=g) for b in repeats}
    times = {b: {"dense": [], "sparse": []} for b in repeats}
    with torch.inference_mode():
        torch.testing.assert_close(sparse(inputs[1]), dense(inputs[1]), rtol=1e-3, atol=1e-3)
        for model in (dense, sparse):  # warm up
            for x in inputs.values():
                model(x)
        for _ in range(rounds):
            for b, x in inputs.items():
                for name, model in (("dense", dense), ("sparse", sparse)):
                    times[b][name].append(median_seconds(model, x, repeats[b]))
    return {b: {"dense": statistics.median(t["dense"]), "sparse": statistics.median(t["sparse"]),
                "ratio": statistics.median(d / s for d, s in zip(t["dense"], t["sparse"]))}
            for b, t in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.05, 0.02])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--latency-repeats", type=int, default=200)
    parser.add_argument("--batch-repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 rounds, few repeats")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/inference_speed.md"))
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.latency_repeats, args.batch_repeats = 2, 20, 3
    repeats = {1: args.latency_repeats, **{b: args.batch_repeats for b in BATCHES}}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_name in args.models:
            build, shape = MODELS[model_name]
            for density in args.densities:
                dense, sparse = sparse_pair(build, density, 0, Path(tmp))
                r = measure(dense, sparse, shape, args.rounds, repeats)
                rows.append((model_name, density, r))
                print(f"{model_name} density {density}: latency {r[1]['dense'] * 1e3:.3f} / "
                      f"{r[1]['sparse'] * 1e3:.3f} ms, "
                      + ", ".join(f"batch {b} x{r[b]['ratio']:.2f}" for b in BATCHES),
                      file=sys.stderr)
                del dense, sparse
    lines = [
        "# Sparse inference against dense: latency and throughput", "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, compiled kernels "
        f"{'on' if compiled_kernels() is not None else 'OFF (torch sparse ops)'}, "
        f"{dt.datetime.now().astimezone().isoformat(timespec='seconds')}"
        f"{' (--quick: smoke run, not figures to quote)' if args.quick else ''}. "
        "Every Linear layer sparse (uniform random masks, the last one included); sparse model "
        "= export_sparse + load_sparse (CSRLinear, eval, no gradients; csr_spmv up to batch "
        f"{SPMV_MAX_BATCH}, the tile kernels above); dense = the same weights in nn.Linear, "
        f"eval. torch.inference_mode(). {args.rounds} interleaved rounds; latency: median of "
        f"{args.latency_repeats} single-example forwards a round, throughput: median of "
        f"{args.batch_repeats} forwards a round; figures are medians over rounds, speed-ups "
        "the median per-round ratio dense time / sparse time.", "",
        "| model | density | dense latency ms | sparse latency ms | latency speed-up | "
        + " | ".join(f"dense ex/s @{b} | sparse ex/s @{b} | speed-up @{b}" for b in BATCHES)
        + " |",
        "|---|---:|---:|---:|---:|" + "---:|---:|---:|" * len(BATCHES),
    ]
    for model_name, density, r in rows:
        cells = [model_name, f"{density}", f"{r[1]['dense'] * 1e3:.3f}",
                 f"{r[1]['sparse'] * 1e3:.3f}", f"{r[1]['ratio']:.2f}x"]
        for b in BATCHES:
            cells += [f"{b / r[b]['dense']:.0f}", f"{b / r[b]['sparse']:.0f}",
                      f"{r[b]['ratio']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    write_result(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
