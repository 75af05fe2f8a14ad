"""Training on the CSR backend against dense PyTorch: step time, peak memory and Big-Sparse.

1. Step time. An MLP 4096-4096-4096-10 at batch 256 (SGD with momentum 0.9, cross-entropy on
   random data), dense ``nn.Linear`` layers against RigL on ``backend="csr"`` with
   ``delta_t=100`` at uniform densities. The first ``--rounds`` steps of the two are interleaved
   (one dense step, one CSR step) and their medians compared; the CSR run then goes on to step
   100, where its first RigL update falls, and the mean over steps 1..100 is the CSR time with
   the update amortised: (99 * median step + update step) / 100. The speed-up is dense median /
   CSR amortised.
2. Peak memory. Each configuration runs alone in a child process (a few steps, with a RigL update
   for CSR); the figure is the child's peak resident memory above what it used before building
   the model (torch and the kernels loaded).
3. Big-Sparse. An MLP 4096-100000-100000-10 (10^10 potential connections in the hidden layer)
   built on the meta device, so its dense weights never exist, trained with RigL on
   ``backend="csr"``: step time, update time and peak memory. Its dense twin would need 40 GB
   for the hidden weight alone, 160 GB with gradient and momentum; this machine has 24 GiB.

    .venv/bin/python benchmarks/csr_speed.py            # everything (about 10 minutes)
    .venv/bin/python benchmarks/csr_speed.py --quick    # one density, no Big-Sparse
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from _common import AnonymousPeak, rss_mb, write_result
from torch import nn

import sparsetrain as st
from sparsetrain.backends.csr import compiled_kernels

WIDTHS = (4096, 4096, 4096, 10)
BIG_WIDTHS = (4096, 100_000, 100_000, 10)


def mlp(widths, device=None) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b, device=device))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def make_run(widths, density: float | None, total_steps: int, delta_t: int, device=None,
             distribution="uniform", structure=None):
    """(model, optimizer, sparsifier or None) for dense (``density`` None) or CSR RigL (under
    ``structure``, with the classifier dense)."""
    model = mlp(widths, device=device)
    if structure is not None:  # the classifier stays dense, so it must exist
        model[-1] = nn.Linear(widths[-2], widths[-1])
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sp = None
    if density is not None:
        extra = {} if structure is None else {
            "structure": structure, "dense_layers": [f"{2 * (len(widths) - 2)}.weight"]}
        sp = st.RigL(model, opt, density=density, distribution=distribution,
                     total_steps=total_steps, delta_t=delta_t, t_end=total_steps,
                     backend="csr", **extra)
    return model, opt, sp


def step(model, opt, sp, x, y) -> float:
    start = time.perf_counter()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    (sp or opt).step()
    return time.perf_counter() - start


def child(config: dict) -> dict:
    """Run one configuration alone and report its step times and peak memory."""
    compiled_kernels()
    # first use of the optimizer, autograd and the CSR update code imports and initialises
    # libraries (tens of MB, the same for every configuration): do it before the baseline
    warm = make_run((64, 64, 4), 0.5, 10, 1, device="meta")
    step(*warm, torch.randn(8, 64), torch.randint(0, 4, (8,)))
    del warm
    torch.manual_seed(0)
    x = torch.randn(config["batch"], config["widths"][0])
    y = torch.randint(0, config["widths"][-1], (config["batch"],))
    base = rss_mb()
    anon = AnonymousPeak()
    density = config["density"]
    dist = config.get("distribution", "uniform")
    device = "meta" if config.get("meta") else None
    start = time.perf_counter()
    model, opt, sp = make_run(config["widths"], density, 1000, config["delta_t"], device, dist,
                              config.get("structure"))
    build_s = time.perf_counter() - start
    times = [step(model, opt, sp, x, y)]
    steady = anon.peak - anon.base  # before any topology update (delta_t >= 2)
    times += [step(model, opt, sp, x, y) for _ in range(config["steps"] - 1)]
    update_steps = [t for t in range(1, config["steps"] + 1)
                    if sp is not None and sp.is_update_step(t)]
    result = {"peak_mb": rss_mb() - base, "anon_peak_mb": anon.stop(), "steady_mb": steady,
              "build_s": build_s,
              "times": times,
              "update_steps": update_steps}
    if sp is not None:
        result["nnz"] = sum(sp.active_counts().values())
        result["connections"] = sum(sp.numel(n) for n in sp.names)
        result["layer_densities"] = sp.layer_densities()
    return result


def run_child(config: dict) -> dict:
    # a fixed mmap threshold: freed blocks go back to the system at once, so the resident
    # figure measures live memory and not what glibc's heap keeps after temporaries are freed
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(config)],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def speed(densities, rounds: int, batch: int) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(batch, WIDTHS[0])
    y = torch.randint(0, WIDTHS[-1], (batch,))
    rows = []
    for density in densities:
        dense = make_run(WIDTHS, None, 1000, 100)
        csr = make_run(WIDTHS, density, 1000, 100)
        step(*dense, x, y)  # warm-up (not counted: the CSR run's step 1 is counted below)
        dense_t, csr_t = [], []
        for _ in range(rounds):
            dense_t.append(step(*dense, x, y))
            csr_t.append(step(*csr, x, y))
        while csr[2].step_count < 100:  # on to the first RigL update at step 100
            csr_t.append(step(*csr, x, y))
        dense_ms = statistics.median(dense_t) * 1000
        plain_ms = statistics.median(csr_t[:99]) * 1000
        # one update per delta_t = 100 steps; medians, as the machine's noise comes in bursts
        amortised_ms = (99 * plain_ms + csr_t[99] * 1000) / 100
        rows.append({"density": density, "dense_ms": dense_ms, "csr_ms": plain_ms,
                     "update_ms": csr_t[99] * 1000, "amortised_ms": amortised_ms,
                     "speedup": dense_ms / amortised_ms,
                     "round_ratio": statistics.median(d / c for d, c in zip(dense_t, csr_t))})
        print(f"density {density}: dense {dense_ms:.1f} ms, CSR {plain_ms:.1f} ms, update "
              f"{csr_t[99] * 1000:.0f} ms, amortised {amortised_ms:.1f} ms, "
              f"{dense_ms / amortised_ms:.2f}x", file=sys.stderr)
    return rows


def profile(density: float, batch: int) -> list[str]:
    """Where a CSR step's time goes (torch.profiler, self CPU time of the top operations)."""
    torch.manual_seed(0)
    x = torch.randn(batch, WIDTHS[0])
    y = torch.randint(0, WIDTHS[-1], (batch,))
    run = make_run(WIDTHS, density, 1000, 100)
    for _ in range(3):
        step(*run, x, y)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            step(*run, x, y)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    lines = [f"| {e.key} | {e.self_cpu_time_total / 5 / 1000:.1f} | "
             f"{100 * e.self_cpu_time_total / total:.0f}% |" for e in events[:8]]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.05, 0.02, 0.01])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--big-batch", type=int, default=128)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/csr_speed.md"))
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if compiled_kernels() is None:
        print("the compiled CSR kernels are not available; the figures would be of torch's "
              "fallback", file=sys.stderr)
    if args.quick:
        args.densities, args.rounds = args.densities[:1], 5
    rows = speed(args.densities, args.rounds, args.batch)

    memory = {}
    for density in [None] + args.densities:  # the CSR model built on the meta device
        memory[density] = run_child({"widths": WIDTHS, "density": density, "batch": args.batch,
                                     "steps": 4, "delta_t": 2, "meta": density is not None})
        print(f"memory {density}: {memory[density]['anon_peak_mb']:.0f} MB", file=sys.stderr)
    prof = profile(args.densities[0], args.batch)

    lines = [
        "# CSR backend: training an MLP against dense PyTorch", "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, compiled kernels "
        f"{'yes' if compiled_kernels() is not None else 'no'}, "
        f"{dt.datetime.now().astimezone().isoformat(timespec='seconds')}.", "",
        f"## Step time: MLP {'-'.join(map(str, WIDTHS))}, batch {args.batch}", "",
        "SGD with momentum; RigL on `backend=\"csr\"`, uniform density, `delta_t=100`. Dense: "
        f"median of {args.rounds} steps interleaved with the CSR run's first {args.rounds}. "
        "CSR amortised: (99 x median CSR step + the RigL update step at step 100) / 100.", "",
        "| density | dense ms | CSR step ms (median) | RigL update step ms | CSR amortised ms "
        "| speed-up (amortised) | per-round ratio | issue's target |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    targets = {0.1: "4x", 0.05: "8x", 0.02: "15x", 0.01: "25x"}
    for r in rows:
        lines.append(f"| {r['density']} | {r['dense_ms']:.1f} | {r['csr_ms']:.1f} | "
                     f"{r['update_ms']:.0f} | {r['amortised_ms']:.1f} | {r['speedup']:.2f}x | "
                     f"{r['round_ratio']:.2f}x | {targets.get(r['density'], '-')} |")
    dense_peak = memory[None]["anon_peak_mb"]
    lines += ["", "## Peak memory", "",
              "Each run alone in a child process: 4 steps, with RigL updates at steps 2 and 4; "
              "the CSR model built on the meta device, so its dense weights never exist. Peak "
              "anonymous resident memory (the process's own data, sampled every millisecond) "
              "above its level once torch, the kernels and the optimizer code were loaded, "
              "with `MALLOC_MMAP_THRESHOLD_=131072` so that freed temporaries are returned "
              "to the system. 'Training' is the peak over the first step (building the model "
              "included), 'with updates' over all four. Activations (batch x width) are the "
              "same for both and do not shrink with density.", "",
              "| run | training, MB | fraction of dense | with updates, MB | fraction of dense |",
              "|---|---:|---:|---:|---:|"]
    dense_steady = memory[None]["steady_mb"]
    for density in [None] + args.densities:
        m = memory[density]
        label = "dense" if density is None else f"CSR, density {density}"
        lines.append(f"| {label} | {m['steady_mb']:.0f} | {m['steady_mb'] / dense_steady:.3f} "
                     f"| {m['anon_peak_mb']:.0f} | {m['anon_peak_mb'] / dense_peak:.3f} |")
    lines += ["", f"## Profile of a CSR step at density {args.densities[0]} "
              "(torch.profiler, self CPU time per step)", "",
              "| operation | ms | share |", "|---|---:|---:|", *prof]
    if not args.quick:
        big = run_child({"widths": BIG_WIDTHS, "density": 0.001, "batch": args.big_batch,
                         "steps": 5, "delta_t": 2, "meta": True, "distribution": "erk"})
        plain = [t for i, t in enumerate(big["times"], 1) if i not in big["update_steps"]]
        updates = [t for i, t in enumerate(big["times"], 1) if i in big["update_steps"]]
        lines += [
            "", f"## Big-Sparse: MLP {'-'.join(map(str, BIG_WIDTHS))}, batch {args.big_batch}",
            "",
            "Built on the meta device; RigL on `backend=\"csr\"` at density 0.001 with the ERK "
            "distribution, `delta_t=2` so that the 5 steps hold 2 updates. Layer densities: "
            + ", ".join(f"{n} {d:.2g}" for n, d in big["layer_densities"].items()) + ".", "",
            f"- potential connections: {big['connections']:.3g}; active: {big['nnz']:.3g} "
            f"(overall density {big['nnz'] / big['connections']:.2g})",
            f"- building and materialising the sparse model: {big['build_s']:.1f} s",
            f"- plain step: {statistics.median(plain):.2f} s (median of {len(plain)})",
            f"- step with a RigL update (blockwise dense gradient of 1e10 entries and top-k): "
            f"{statistics.median(updates):.1f} s",
            f"- peak memory (anonymous resident, as above): {big['anon_peak_mb'] / 1024:.2f} GiB",
            "- the dense twin's hidden weight alone: 40 GB (float32), 120 GB with its gradient "
            "and momentum: it cannot be allocated on this 24 GiB machine.",
        ]
        print(f"big-sparse: {big}", file=sys.stderr)
    write_result(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
