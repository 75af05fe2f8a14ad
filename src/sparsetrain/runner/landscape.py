"""The loss along straight lines between the weights of finished runs (``sparsetrain
analyze``), as in section 5 of the RigL paper.

For every model and density, the runs of the lowest seed that all methods share: the line from
each run's initial weights (``initial.pt``, written at step 0) to its final weights, and the
line from the Static run's solution to each other sparse method's solution (same seed; the
masks differ, so points between them are denser than either end). Each point is the mean loss
over the first ``EXAMPLES`` training examples, unaugmented, in eval mode. The *barrier* of a
line is the largest excess of its loss over the straight line between its two end losses:
0 when the loss is convex along it, large when a ridge separates the two ends. With them, the
norm of each run's gradient at its initial weights over their active positions (GraSP's
gradient flow).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from ..analysis import gradient_norms, loss_along_line
from ..sparsity.targets import find_targets
from ..backends import dense_state_dict, to_masked
from .config import DENSE_METHODS, make_config
from .folder import load_initial
from .results import method_rank, run_key

EXAMPLES = 2048
BATCH = 256
ALPHAS = [i / 10 for i in range(11)]


def barrier(losses: list[float]) -> float:
    """Largest ``loss(a) - ((1 - a) * loss(0) + a * loss(1))`` over the points of a line."""
    n = len(losses) - 1
    return max(v - ((1 - i / n) * losses[0] + i / n * losses[-1]) for i, v in enumerate(losses))


def _rebuild(run: dict[str, Any]):
    """(model holding dense weights, training batches, initial state, final state) of a
    finished run, or ``None`` without initial weights."""
    from .train import Trainer  # the trainer rebuilds the model, its data and final state

    initial = load_initial(run["folder"])
    if initial is None:
        return None
    config = make_config(run["summary"]["config"])
    trainer = Trainer(config, run["folder"], resume=True, log=lambda message: None)
    try:
        model, data = trainer.model, trainer.data
        final = {k: v.cpu() for k, v in dense_state_dict(model).items()}
        to_masked(model)  # CSR layers back to nn.Linear: the dense states load into it
        model.to("cpu")
    finally:
        trainer.close()
    n = min(EXAMPLES, len(data.train_y))
    batches = [(data.prepare(data.train_x[i:i + BATCH], train=False),
                data.prepare_targets(data.train_y[i:i + BATCH])) for i in range(0, n, BATCH)]
    return model, batches, initial, final


def _first_seed(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs of the lowest seed of each (model, density) group, one per label."""
    seeds = [r["summary"]["config"].get("seed", 0) for r in runs]
    return [r for r, s in zip(runs, seeds) if s == min(seeds)]


def lines(runs: list[dict[str, Any]], labels: dict[Path, str]) -> dict[tuple[str, float], dict]:
    """(model, density) -> {"init": {label: [losses]}, "static": {label: [losses]}}: the loss
    at ``ALPHAS`` from initialisation to solution, and from Static's solution to each other
    sparse method's, for the lowest seed."""
    groups: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for run in runs:
        model, method, _, density = run_key(run["summary"])
        if method != "dense":
            groups[(model, density)].append(run)
    result = {}
    for key, items in groups.items():
        chosen = sorted(_first_seed(items), key=lambda r: (
            method_rank(r["summary"]["method"]), labels[r["folder"]]))
        built = {labels[r["folder"]]: (r["summary"]["method"], _rebuild(r)) for r in chosen}
        built = {k: v for k, v in built.items() if v[1] is not None}
        if not built:
            continue
        init = {label: [p.loss for p in loss_along_line(m, i, f, b, alphas=ALPHAS)]
                for label, (_, (m, b, i, f)) in built.items()}
        at_init = {label: gradient_at_init(m, i, b) for label, (_, (m, b, i, _)) in built.items()}
        static = {}
        base = [label for label, (method, _) in built.items() if method == "static"]
        if base:
            model, batches, _, anchor = built[base[0]][1]
            for label, (method, (_, _, _, final)) in built.items():
                if label != base[0] and method not in DENSE_METHODS and _same_shapes(anchor, final):
                    static[label] = [p.loss for p in loss_along_line(
                        model, anchor, final, batches, alphas=ALPHAS)]
        result[key] = {"init": init, "static": static, "gradient_at_init": at_init,
                       "static_label": base[0] if base else None}
    return result


def gradient_at_init(model: torch.nn.Module, initial: dict[str, torch.Tensor],
                     batches: list) -> float:
    """The norm of the gradient at the initial weights, over their active positions (those
    not zero), in training mode: the gradient flow that GraSP sets out to preserve."""
    own = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        model.load_state_dict(initial)
        model.train()
        masks = {t.name: initial[t.name] != 0 for t in find_targets(model)
                 if t.name in initial}
        return gradient_norms(model, batches, masks=masks)["overall"]
    finally:
        model.load_state_dict(own)


def _same_shapes(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)


def markdown(result: dict[tuple[str, float], dict]) -> list[str]:
    """The barrier table of every (model, density)."""
    lines = []
    for (model, density), found in sorted(result.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        static = found["static_label"]
        lines += [f"### {model} at density {density:.3g}", "",
                  f"Training loss on {EXAMPLES} training examples at the two ends and the "
                  f"barrier of each line (the most the loss rises above the straight line "
                  f"between its end losses); lowest seed.", "",
                  "| run | gradient norm at init | loss at init | loss at the end | "
                  f"barrier init -> end | barrier from the {static or 'Static'} solution |",
                  "|---|---:|---:|---:|---:|---:|"]
        for label, losses in found["init"].items():
            other = found["static"].get(label)
            lines.append(f"| {label} | {found['gradient_at_init'][label]:.4g} | "
                         f"{losses[0]:.4f} | {losses[-1]:.4f} | "
                         f"{barrier(losses):.4f} | "
                         f"{'-' if other is None else f'{barrier(other):.4f}'} |")
        lines.append("")
    return lines


def plot(result: dict[tuple[str, float], dict], path: Path) -> bool:
    """One row per (model, density): the lines from initialisation, and from Static."""
    from .plots import _pyplot, _save

    if not result:
        return False
    keys = sorted(result, key=lambda k: (k[0], -k[1]))
    plt = _pyplot()
    fig, axes = plt.subplots(len(keys), 2, figsize=(15, 3.6 * len(keys)), squeeze=False)
    for row, key in zip(axes, keys):
        found = result[key]
        if max(len(found["init"]), len(found["static"])) > 10:  # more lines than colours
            for ax in row:
                ax.set_prop_cycle(color=plt.cm.tab20.colors)
        for label, losses in found["init"].items():
            row[0].plot(ALPHAS, losses, marker=".", label=label)
        for label, losses in found["static"].items():
            row[1].plot(ALPHAS, losses, marker=".", label=label)
        row[0].set_title(f"{key[0]} at {key[1]:.3g}: initialisation (0) to solution (1)",
                         fontsize=9)
        row[1].set_title(f"{found['static_label'] or 'Static'} solution (0) to another "
                         "solution (1)", fontsize=9)
        for ax in row:
            ax.set_xlabel("alpha")
            ax.set_ylabel("training loss")
            ax.set_yscale("log")
            ax.grid(True, alpha=0.3)
            handles = ax.get_legend_handles_labels()[0]
            if handles:
                ax.legend(fontsize=5 if len(handles) > 8 else 7, ncol=2 if len(handles) > 8
                          else 1, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return _save(fig, path)
