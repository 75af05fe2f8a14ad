"""Structured sparse training against dense PyTorch: RigL's step time under each structure.

An MLP 4096-4096-4096-10 at batch 256 (SGD with momentum 0.9, cross-entropy on random data):
dense ``nn.Linear`` layers against RigL on ``backend="csr"`` with ``delta_t=100``, uniform
density, under each structure (the 10-output classifier kept dense in every sparse run, as no
block taller than 2 tiles its 10 rows: 40k of its 16.8M weights). As in ``csr_speed.py``, the
first ``--rounds`` steps of dense and sparse are interleaved and their medians compared; the
sparse run then goes on to step 100, where its first RigL update falls, and the update is
amortised: (99 * median step + update step) / 100. Each row gives the speed-up (dense median /
sparse amortised) and its share of the ideal 1 / density. N:M structures hold density N/M
only, so they run at their own densities.

    .venv/bin/python benchmarks/structured_speed.py            # about 10 minutes
    .venv/bin/python benchmarks/structured_speed.py --quick    # density 0.1, fewer structures
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
from pathlib import Path

import torch
from _common import write_result
from csr_speed import WIDTHS, mlp, run_child, step

import sparsetrain as st
from sparsetrain.backends.csr import compiled_kernels

STRUCTURES = ["unstructured", "fan-in", "block:4x4", "block:8x1", "block:16x1", "block:4x1",
              "block:1x4"]
#: N:M structures and the density each holds.
N_M = {"1:8": 0.125, "1:16": 0.0625}
TARGETS = {0.1: 6.0, 0.05: 11.0, 0.02: 20.0}  # the best structure's speed-up


def run(structure: str | None, density: float | None, rounds: int, x, y) -> dict:
    """Dense and one sparse run interleaved; figures in ms."""
    torch.manual_seed(0)
    dense_model = mlp(WIDTHS)
    dense = (dense_model, torch.optim.SGD(dense_model.parameters(), lr=0.01, momentum=0.9), None)
    model = mlp(WIDTHS)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sp = st.RigL(model, opt, density=density, distribution="uniform", total_steps=1000,
                 delta_t=100, t_end=1000, backend="csr", structure=structure,
                 dense_layers=["4.weight"])
    sparse = (model, opt, sp)
    step(*dense, x, y)  # warm-up
    dense_t, sparse_t = [], []
    for _ in range(rounds):
        dense_t.append(step(*dense, x, y))
        sparse_t.append(step(*sparse, x, y))
    while sp.step_count < 100:
        sparse_t.append(step(*sparse, x, y))
    dense_ms = statistics.median(dense_t) * 1000
    plain_ms = statistics.median(sparse_t[:99]) * 1000
    update_ms = sparse_t[99] * 1000
    amortised = (99 * plain_ms + update_ms) / 100
    actual = sp.overall_density()
    return {"structure": structure, "density": density, "actual": actual, "dense_ms": dense_ms,
            "step_ms": plain_ms, "update_ms": update_ms, "amortised_ms": amortised,
            "speedup": dense_ms / amortised, "ideal": dense_ms / amortised * actual,
            "update_share": (update_ms - plain_ms) / 100 / plain_ms}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.05, 0.02])
    parser.add_argument("--structures", nargs="+", default=STRUCTURES)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/structured_speed.md"))
    args = parser.parse_args(argv)
    if args.quick:
        args.densities, args.structures, args.rounds = [0.1], STRUCTURES[:3], 5
    if compiled_kernels() is None:
        print("the compiled kernels are not available; the figures would be of torch's "
              "fallback", file=sys.stderr)
    torch.manual_seed(0)
    x = torch.randn(args.batch, WIDTHS[0])
    y = torch.randint(0, WIDTHS[-1], (args.batch,))
    plan = [(s, d) for d in args.densities for s in args.structures]
    if not args.quick:
        plan += list(N_M.items())
    rows = []
    for structure, density in plan:
        r = run(structure, density, args.rounds, x, y)
        rows.append(r)
        print(f"{structure} at {density}: {r['step_ms']:.1f} ms (dense {r['dense_ms']:.1f}), "
              f"update {r['update_ms']:.0f} ms, {r['speedup']:.2f}x", file=sys.stderr)
    lines = [
        "# Structured sparsity: RigL training step against dense PyTorch", "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, compiled kernels "
        f"{'yes' if compiled_kernels() is not None else 'no'}, "
        f"{dt.datetime.now().astimezone().isoformat(timespec='seconds')}.", "",
        f"MLP {'-'.join(map(str, WIDTHS))}, batch {args.batch}, SGD with momentum; RigL on "
        "`backend=\"csr\"`, uniform density, `delta_t=100`, the classifier dense. Dense: median "
        f"of {args.rounds} steps interleaved with the sparse run's first {args.rounds}. "
        "Amortised: (99 x median sparse step + the RigL update step at step 100) / 100. "
        "'Of ideal': the speed-up times the actual density (1.0 would be a step whose time "
        "falls in proportion to the weights). 'Update': the update's extra time spread over "
        "100 steps, as a share of a step.", "",
        "| structure | density | actual density | dense ms | step ms | update step ms | "
        "amortised ms | speed-up | of ideal | update | target (best structure) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        target = TARGETS.get(r["density"])
        lines.append(
            f"| {r['structure']} | {r['density']} | {r['actual']:.4f} | {r['dense_ms']:.1f} | "
            f"{r['step_ms']:.1f} | {r['update_ms']:.0f} | {r['amortised_ms']:.1f} | "
            f"{r['speedup']:.2f}x | {r['ideal']:.0%} | {r['update_share']:.1%} | "
            f"{f'{target:g}x' if target else '-'} |")
    lines += ["", "## Best structure per density", "",
              "| density | best structure | speed-up | target | met |", "|---:|---|---:|---:|---|"]
    for density in args.densities:
        best = max((r for r in rows if r["density"] == density), key=lambda r: r["speedup"])
        target = TARGETS.get(density)
        lines.append(f"| {density} | {best['structure']} | {best['speedup']:.2f}x | "
                     f"{f'{target:g}x' if target else '-'} | "
                     f"{'-' if not target else ('yes' if best['speedup'] >= target else 'no')} |")
    if not args.quick:
        lines += memory_lines(args.densities, args.batch)
    write_result(lines, args.out)
    return 0


def memory_lines(densities, batch: int) -> list[str]:
    """Peak memory of each structure alone in a child process (``csr_speed.py``'s measure)."""
    config = {"widths": list(WIDTHS), "batch": batch, "steps": 4, "delta_t": 2}
    dense = run_child({**config, "density": None})
    lines = ["", "## Peak memory", "",
             "As in `csr_speed.md`: each run alone in a child process, 4 steps with RigL updates "
             "at steps 2 and 4, the sparse model built on the meta device; peak anonymous "
             "resident memory above the process's level before the model, as a fraction of "
             f"dense ({dense['steady_mb']:.0f} MB training, {dense['anon_peak_mb']:.0f} MB "
             "with updates). The classifier is dense in the structured runs.", "",
             "| structure | density | training, fraction of dense | with updates, fraction "
             "of dense |", "|---|---:|---:|---:|"]
    for density in densities:
        for structure in (None, "fan-in", "block:4x4", "block:8x1"):
            m = run_child({**config, "density": density, "meta": True, "structure": structure})
            lines.append(f"| {structure or 'unstructured'} | {density} | "
                         f"{m['steady_mb'] / dense['steady_mb']:.3f} | "
                         f"{m['anon_peak_mb'] / dense['anon_peak_mb']:.3f} |")
            print(f"memory {structure} {density}: {m['anon_peak_mb']:.0f} MB", file=sys.stderr)
    return lines


if __name__ == "__main__":
    sys.exit(main())
