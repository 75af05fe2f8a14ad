"""Cannistraci-Hebb training's topology update against RigL's, on one large layer.

One ``nn.Linear(4096, 4096)`` at uniform density 0.05 (839k links), SGD with momentum,
cross-entropy on random data at batch 256 (the batch of RigL's dense gradient). RigL and CHT
(default options) each train from the same initial weights with ``delta_t=2``, ``t_end=1000``,
so their updates drop the same fraction (about 0.3) and regrow as many links; the two step in
turn, so that their updates run next to each other, and the time of each ``update_topology``
call is taken (for RigL on ``backend="csr"`` it includes computing the dense gradient from the
recorded activations). The ratio CHT / RigL is of medians in the same run.
CHT's update is split into its parts: the graph (CSR and transposed structure, the common-column
table), the L3 index of every unlinked pair (the first stage, which picks the candidates), the
exact CH3-L3 of the candidates (the second stage), and the rest (removal, selection, set_active).
A last check, on 1024 x 1024 layers at density 0.05 (random, scale-free and community
graphs) where the exact CH3-L3 of every pair is affordable, counts how many of the links the
two-stage update grows are those the exact rule grows.

    .venv/bin/python benchmarks/cht_update.py          # about 2 minutes
    .venv/bin/python benchmarks/cht_update.py --quick  # masked backend only
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import statistics
import time
from pathlib import Path

import torch
from _common import write_result
from torch import nn

import sparsetrain as st
from sparsetrain.kernels import compiled_kernels
from sparsetrain.sparsity import link_prediction as lp

SIZE = 4096
DENSITY = 0.05
PARTS = ("graph", "l3 index", "exact CH3-L3")


class Timer:
    """Seconds spent in CHT's parts, from wrappers of the link-prediction functions."""

    def __init__(self):
        self.seconds = {p: 0.0 for p in PARTS}
        self.originals = {}
        self.paths = None  # the path terms of the graph the update scored

    def wrap(self, name: str, part: str, generator: bool = False):
        original = getattr(lp, name)
        self.originals[name] = original

        def timed(*args, **kwargs):
            start = time.perf_counter()
            result = original(*args, **kwargs)
            self.seconds[part] += time.perf_counter() - start
            return result

        def timed_blocks(*args, **kwargs):
            blocks = original(*args, **kwargs)
            while True:
                start = time.perf_counter()
                block = next(blocks, None)
                self.seconds[part] += time.perf_counter() - start
                if block is None:
                    return
                yield block

        setattr(lp, name, timed_blocks if generator else timed)

    def __enter__(self):
        for name in ("bipartite_graph", "common_columns", "score_table"):
            self.wrap(name, "graph")
        self.wrap("l3_rows", "l3 index", generator=True)
        self.wrap("ch3_l3_pairs", "exact CH3-L3")
        paths = lp.l3_paths
        self.originals["l3_paths"] = paths

        def counted(graph):
            self.paths = paths(graph)
            return self.paths

        lp.l3_paths = counted
        return self

    def __exit__(self, *exc):
        for name, original in self.originals.items():
            setattr(lp, name, original)


class Run:
    """One method on the layer, its ``update_topology`` timed (CHT's parts too)."""

    def __init__(self, method: str, backend: str):
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(SIZE, SIZE))  # a child: the CSR backend takes it
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        make = st.RigL if method == "rigl" else st.get_method("cht")
        self.sp = make(self.model, self.opt, density=DENSITY, distribution="uniform",
                       total_steps=1000, delta_t=2, t_end=1000, backend=backend)
        self.times, self.parts, self.grown, self.steps = [], [], [], []
        inner = self.sp.update_topology

        def timed(t):
            before = self.sp.active_positions("0.weight").clone()
            with Timer() as timer:
                start = time.perf_counter()
                inner(t)
                self.times.append(time.perf_counter() - start)
            self.parts.append({**timer.seconds, "paths": timer.paths})
            after = self.sp.active_positions("0.weight")
            self.grown.append(int((~torch.isin(after, before)).sum()))

        self.sp.update_topology = timed

    def step(self, x, y):
        start, updates = time.perf_counter(), len(self.times)
        self.opt.zero_grad()
        nn.functional.cross_entropy(self.model(x), y).backward()
        self.sp.step()
        if len(self.times) == updates:  # a step without an update
            self.steps.append(time.perf_counter() - start)


def race(backend: str, n_updates: int, batch: int) -> tuple[Run, Run]:
    """RigL and CHT stepped in turn, so that each of their updates falls next to the other's
    (the machine's load then weighs on both alike)."""
    rigl, cht = Run("rigl", backend), Run("cht", backend)
    g = torch.Generator().manual_seed(1)
    while len(cht.times) < n_updates:
        x = torch.randn(batch, SIZE, generator=g)
        y = torch.randint(0, SIZE, (batch,), generator=g)
        rigl.step(x, y)
        cht.step(x, y)
    return rigl, cht


def test_graph(kind: str, size: int, density: float, g: torch.Generator) -> torch.Tensor:
    """Sorted positions of a random graph: uniform, scale-free (heavy-tailed degrees on both
    sides) or with 8 communities (ten times denser inside)."""
    weights = torch.ones(size, size)
    if kind != "random":
        exponent = 0.7 if kind == "scale-free" else 0.5
        rows, cols = torch.rand(size, generator=g), torch.rand(size, generator=g)
        weights = rows[:, None] ** -exponent * cols[None, :] ** -exponent
    if kind == "communities":
        a, b = torch.randint(0, 8, (size,), generator=g), torch.randint(0, 8, (size,), generator=g)
        weights = weights * (1 + 9 * (a[:, None] == b[None, :]))
    n = round(density * size * size)
    return torch.sort(torch.multinomial(weights.view(-1), n, generator=g)).values


def quality(kind: str, removed: float, size: int = 1024, density: float = DENSITY):
    """(share of the two-stage choice that the exact rule also makes, links grown, L3 paths)
    for one update: a share ``removed`` of the links of a test graph taken away at random."""
    g = torch.Generator().manual_seed(2)
    positions = test_graph(kind, size, density, g)
    order = torch.randperm(positions.numel(), generator=g)
    n_grow = math.floor(removed * positions.numel())
    kept = torch.sort(positions[order[n_grow:]]).values
    chosen = {}
    for exact in (True, False):
        model = nn.Linear(size, size)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        sp = st.get_method("cht")(model, opt, density=density, total_steps=100, delta_t=1,
                                  masks={"weight": positions},
                                  exact_paths=2 ** 62 if exact else 0)
        chosen[exact] = sp._grow("weight", kept, n_grow, 1)
    paths = lp.l3_paths(lp.bipartite_graph(kept, (size, size)))
    same = int(torch.isin(chosen[False], chosen[True]).sum())
    return same / n_grow, n_grow, paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cht_update.md"))
    args = parser.parse_args(argv)
    kernels = compiled_kernels()
    if kernels is None or not hasattr(kernels, "ch3_l3_pairs"):
        print("the compiled kernels are not available: CHT would run on torch's operations")
    backends = ["masked"] if args.quick else ["masked", "csr"]
    load_before = os.getloadavg()[0]
    rows = []
    started = time.perf_counter()
    for backend in backends:
        rigl, cht = race(backend, args.updates, args.batch)
        rigl_ms = statistics.median(rigl.times) * 1000
        cht_ms = statistics.median(cht.times) * 1000
        ratios = [c / r for c, r in zip(cht.times, rigl.times)]
        first = dict(cht.parts[0])
        paths = first.pop("paths")
        rest = cht.times[0] - sum(first.values())
        step_ms = statistics.median(cht.steps) * 1000
        rows.append(f"| {backend} | {step_ms:.0f} | {rigl_ms:.0f} | {cht_ms:.0f} | "
                    f"{cht_ms / rigl_ms:.1f}x | {min(ratios):.1f}x-{max(ratios):.1f}x | "
                    f"{cht_ms / (100 * step_ms):.0%} | "
                    + " | ".join(f"{first[p] * 1000:.0f}" for p in PARTS)
                    + f" | {rest * 1000:.0f} | {rigl.grown[0]} | {cht.grown[0]} |")
        print(rows[-1], flush=True)
        links = cht.sp.active_counts()["0.weight"]
    checks = [(kind, removed, *quality(kind, removed))
              for kind in ("random", "scale-free", "communities") for removed in (0.3, 0.05)]
    elapsed = time.perf_counter() - started
    load_after = os.getloadavg()[0]
    lines = [
        "# CHT's topology update against RigL's",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, compiled kernels "
        f"{'yes' if kernels is not None else 'no'}, "
        f"{dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}; the whole run took "
        f"{elapsed:.0f} s.",
        "",
        f"One `nn.Linear({SIZE}, {SIZE})` (in an `nn.Sequential`) at uniform density {DENSITY} "
        f"({links} links), SGD with momentum, cross-entropy on random "
        f"data at batch {args.batch}; `delta_t=2`, `t_end=1000` (drop fraction about 0.3 at "
        f"the first update). RigL and CHT (default options: sign-split magnitude removal, "
        f"CH3-L3 regrowth) step in turn, so that each CHT update runs next to a RigL update; "
        f"times of `update_topology` in ms, medians of {args.updates} updates each (RigL's "
        f"includes its dense gradient on `backend=\"csr\"`), the ratio of the medians and "
        f"the range of the ratios of neighbouring updates, and the parts of CHT's first "
        f"update. 'Step ms': the median training step without an update (CHT's run); 'CHT per "
        f"step at delta_t=100': the update spread over the 100 steps of the default period, "
        f"as a share of a step.",
        "",
        "| backend | step ms | RigL update ms | CHT update ms | CHT / RigL | range "
        "| CHT per step at delta_t=100 | graph ms | L3 index ms | exact CH3-L3 ms | rest ms "
        "| RigL grown | CHT grown |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"The exact CH3-L3 of every unlinked pair of the graph CHT scored (its links after the "
        f"removal) would sum {paths:.3g} path terms (`l3_paths`), far beyond the default "
        f"`exact_paths = 2**28`; CHT therefore scores "
        f"exactly the `candidates = 4` x (links to grow) unlinked pairs with the largest L3 "
        f"index (the 'L3 index' column: one pass over the sparse adjacency, rows x nnz "
        f"operations), and grows the best of them ('exact CH3-L3').",
        "",
        f"Sample quality: on 1024 x 1024 layers at density {DENSITY} (random test graphs, a "
        f"share of their links removed at random; every pair is then scored exactly as well, "
        f"which is affordable here), the share of the links the two-stage update grows that "
        f"the exact rule also grows:",
        "",
        "| graph | removed | links to grow | path terms (exact) | same links |",
        "|---|---:|---:|---:|---:|",
        *[f"| {kind} | {removed:.0%} | {n} | {paths:.3g} | {share:.1%} |"
          for kind, removed, share, n, paths in checks],
        "",
        f"Notes: the machine is shared with other jobs that use its CPUs at the same time (load "
        f"average {load_before:.1f} when this run began, {load_after:.1f} when it ended, on "
        f"{os.cpu_count()} logical CPUs), so absolute times move from run to run; RigL's and "
        f"CHT's updates ran next to each other in one process, and their ratio is the figure "
        f"to read. The link "
        "prediction's work is not part of the training FLOPs (`training_flops` is 3 f_S per "
        "step for CHT, as for SET); it is this table's 'CHT update' column.",
    ]
    write_result(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
