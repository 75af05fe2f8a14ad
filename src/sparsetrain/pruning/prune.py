"""Pruning at initialisation: masks from saliency scores, one shot or in rounds.

``shared/spec/algorithms.md``, "Pruning at initialisation". The kept weights are those with the
highest scores (``pruning_scores``), over all sparsified weights at once (``scope="global"``,
the default of SNIP, GraSP and SynFlow) or layer by layer with the densities of a distribution
(``scope="layer"``). With ``iterations=E > 1`` the model is pruned in ``E`` rounds to the
densities ``d ** (e / E)``, rescoring the surviving network each round (SynFlow's iterative
pruning, also offered for the others); weights pruned in a round stay pruned.

The result is a masks dict to give to a sparsifier::

    masks = st.prune_at_init(model, "grasp", density=0.02, data=batches)
    sparsifier = st.Static(model, opt, density=0.02, total_steps=T, masks=masks)
"""

from __future__ import annotations

import math
import numbers
from typing import Iterable, Mapping

import torch
from torch import nn

from ..sparsity.distributions import check_density, densities_for_shapes
from ..sparsity.masks import active_count
from ..sparsity.permutation import PRUNE, RandomOrder
from ..sparsity.selection import order_keys, select_global, top_k_mask
from ..sparsity.structure import (Structure, check_fits, fixed_count, parse_structure,
                                  structured_top_k)
from ..sparsity.targets import partition
from .scores import LossFn, _batches, check_pruning_method, pruning_scores

SCOPES = ("global", "layer")


def prune_at_init(
    model: nn.Module,
    method: str,
    density: float,
    data: Iterable | None = None,
    *,
    scope: str = "global",
    iterations: int = 1,
    distribution: str | Mapping[str, float] | None = None,
    dense_layers: Iterable[str] | str = (),
    loss_fn: LossFn | None = None,
    seed: int = 0,
    sparsify_embeddings: bool = False,
    structure: str | None = None,
    **options,
) -> dict[str, torch.Tensor]:
    """Masks (name -> bool tensor) keeping the best-scored weights of ``model``.

    ``method``: ``"random"``, ``"magnitude"``, ``"snip"``, ``"grasp"`` or ``"synflow"`` (see
    ``pruning_scores``, which also takes the ``options``). ``density`` in (0, 1]: the fraction
    of the sparsified weights kept. ``scope="global"`` keeps exactly ``round(density * total)``
    weights over all sparsified weights (each layer at least one); ``scope="layer"`` keeps
    exactly ``round(d_l * N_l)`` in every layer, ``d_l`` from ``distribution`` (``"uniform"``
    by default, or ``"er"``, ``"erk"``, a dict name -> density). ``iterations`` rounds prune to
    ``d ** (e / iterations)`` (per layer ``d_l ** (e / iterations)``). Weights matched by
    ``dense_layers`` (and position embeddings, unless ``sparsify_embeddings``) are neither
    scored against the others nor in the result: pass the same settings to the sparsifier.
    Ties are broken at random with ``seed``. The model is left unchanged; apply the masks by
    giving them to a sparsifier (``masks=``).

    ``structure`` (``"N:M"``, ``"fan-in"``, ``"block:RxC"``; see
    ``st.sparsity.structure``): each round first decides how many weights every layer keeps
    as above, rounds that to what the structure can hold (N/M of the layer; a multiple of its
    rows, at least one a row; whole blocks), then keeps the best-scored weights within the
    structure (summed over a block). The total can then differ a little from
    ``round(density * total)``: ``mask_density`` gives it. N:M needs ``density`` = N/M.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    key = check_pruning_method(method)
    density = check_density(density)
    if scope not in SCOPES:
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, numbers.Integral) or (
        iterations <= 0
    ):
        raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if scope == "global" and distribution is not None:
        raise ValueError(
            "distribution applies to scope='layer' only; with scope='global' the scores decide "
            "how many weights each layer keeps"
        )
    if "masks" in options:
        raise ValueError("prune_at_init makes the masks; it takes no masks option")
    sparse, _ = partition(model, dense_layers, sparsify_embeddings=sparsify_embeddings)
    layout = structured(structure, sparse, density)
    shapes = {t.name: tuple(t.shape) for t in sparse}
    final = densities_for_shapes(shapes, density, distribution or "uniform")
    if data is not None and key in ("snip", "grasp"):
        data = _batches(data, key)  # read once: every round scores the same examples
    if key == "random":
        options["seed"] = int(seed)
    total = sum(t.numel for t in sparse)

    masks: dict[str, torch.Tensor] | None = None
    for e in range(1, int(iterations) + 1):
        power = e / iterations
        all_scores = pruning_scores(model, key, data, loss_fn=loss_fn, masks=masks, **options)
        scores = {}
        for t in sparse:
            score = all_scores[t.name].detach()
            if masks is not None:  # pruned in an earlier round: never kept again
                score = score.to(torch.float64).masked_fill(~masks[t.name], -math.inf)
            scores[t.name] = score
        if scope == "global":
            n_keep = max(len(sparse), round(density**power * total))
            masks = select_global(scores, n_keep, int(seed), e, stacklevel=3)
        else:
            masks = {
                t.name: top_k_mask(scores[t.name], active_count(t.numel, final[t.name] ** power),
                                   order_keys(RandomOrder(t.numel, PRUNE, int(seed), e, i)))
                for i, t in enumerate(sparse)
            }
        if layout is not None:
            masks = _within(layout, masks, scores, sparse, int(seed), e)
    return {t.name: masks[t.name].to(t.param.device) for t in sparse}


def structured(structure: str | None, sparse, density: float) -> Structure | None:
    """The parsed ``structure`` (``None`` when unstructured), checked against every sparsified
    weight of ``sparse`` (``ValueError`` naming the layer and what would fit)."""
    s = parse_structure(structure)
    if s.kind == "unstructured":
        return None
    for t in sparse:
        check_fits(s, tuple(t.shape), t.name, density if s.kind == "n:m" else None)
    return s


def _within(s: Structure, masks: Mapping[str, torch.Tensor], scores: Mapping[str, torch.Tensor],
            sparse, seed: int, e: int) -> dict[str, torch.Tensor]:
    """Each layer's mask remade within structure ``s``: as many weights as the structure can
    hold nearest the unstructured count, the best-scored within it."""
    out = {}
    for i, t in enumerate(sparse):
        score = scores[t.name].to(torch.float64)
        count = fixed_count(s, tuple(t.shape), int(masks[t.name].sum()))
        keys = order_keys(RandomOrder(t.numel, PRUNE, seed, e, i))
        mask = torch.zeros(t.numel, dtype=torch.bool, device=score.device)
        mask[structured_top_k(s, score, count, keys)] = True
        out[t.name] = mask.view(t.shape)
    return out


def mask_density(masks: Mapping[str, torch.Tensor]) -> float:
    """Fraction of active entries over all masks."""
    return sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())

