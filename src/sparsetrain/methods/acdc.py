"""AC/DC: alternating compressed and decompressed training (Peste, Iofinova, Vladu & Alistarh,
"AC/DC: Alternating Compressed/DeCompressed Training of Deep Neural Networks", NeurIPS 2021).

Training starts dense; after a dense warm-up it alternates compressed phases, which train a
fixed support of the largest weights (iterative hard thresholding), with decompressed phases,
which train every weight again, and it ends with a longer compressed phase that fine-tunes the
final support. It yields a sparse model and, from the end of the last decompressed phase, a
dense one. The schedule and its defaults are those of the authors' code
(github.com/IST-DASLab/ACDC, ``configs/neurips``); jaxpruner (``projects/extensions/acdc.py``)
and sparseml (``ACDCPruningModifier``) implement the same cycle.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .. import checks
from ..backends.base import DENSE_WEIGHTS, VARIABLE_COUNT
from ..flops import sparse_training_flops
from ..sparsity.distributions import check_density
from ..sparsity.masks import active_count
from ..sparsity.selection import select_global
from ..sparsity.structure import fixed_count, parse_structure
from . import scores as checked
from .base import Sparsifier
from .registry import register_method
from .structured import keep_within
from .update import keep_largest, warn_not_finite

#: The optimizer's momentum buffers, zeroed when a decompressed phase starts (SGD, Adam/AdamW).
MOMENTUM_KEYS = ("momentum_buffer", "exp_avg")


@register_method("acdc")
class ACDC(Sparsifier):
    """AC/DC (Peste et al., NeurIPS 2021), used like the other sparsifiers::

        sparsifier = st.ACDC(model, opt, density=0.1, total_steps=len(loader) * epochs)
        ...                                   # train, calling sparsifier.step()
        dense = sparsifier.dense_state_dict()  # the dense model of the pair, or None

    With T = ``total_steps``, W = ``max(1, round(warmup_fraction * T))``, P =
    ``max(1, round(phase_fraction * T))`` and F = ``T - max(1, round(final_fraction * T))``:
    steps 1..W train dense (the warm-up); compressed phases start at steps W, W + 2P, W + 4P, ...
    and decompressed ones at W + P, W + 3P, ..., each only where a decompressed phase still
    starts before F, so that the last phase before F is decompressed (it lasts up to 2P steps;
    with W + P >= F there is no alternation and the warm-up lasts until F); the final compressed
    phase starts at F and lasts to the end. A phase "starts at step t": the switch is made after
    the optimizer step of step t, and ``is_update_step(t)`` is True exactly at these switches.
    With the defaults on 100 epochs this is the authors' ImageNet schedule exactly: dense for
    epochs 0-10, compressed 10-15, dense 15-20, ..., compressed 70-75, dense 75-85, compressed
    85-100 (their CIFAR-100 one is 10 / 20 / 30 of 200 epochs).

    At a compressed switch the weights of largest ``|W|`` are kept, ties broken by the seeded
    random order, and the rest are zeroed with their optimizer state. ``selection="global"``
    keeps the ``active_count(N, density)`` largest over all sparsified weights (N of them in
    all) at once, so the data decide each layer's count (at least one each; see
    ``select_global``, which holds all N scores at once in float64): the paper's main results.
    ``"layer"`` keeps ``active_count(N_l, d_l)`` in each layer, d_l from ``distribution`` (the
    paper's "uniform sparsity" runs), within the structure under ``structure=``. The default
    (``None``) is global without a structure and per layer under one (the authors prune 2:4 per
    layer). At a decompressed switch every weight becomes active again: the pruned ones restart
    at zero with zero optimizer state, as in the authors' ``RestoreWeights`` ("reintroduced as
    zeros"), and with ``reset_momentum`` the momentum buffers of every parameter the optimizer
    holds are zeroed (``momentum_buffer`` of SGD, ``exp_avg`` of Adam and AdamW; the authors
    pass ``--reset_momentum_after_recycling`` in every script, sparseml's
    ``momentum_buffer_reset`` defaults to True).

    With ``keep_dense`` the model's tensors (parameters and buffers, as ``model.state_dict()``
    names them) are copied at each compressed switch, i.e. at the end of each dense phase,
    before pruning: ``dense_state_dict()`` returns the copy of the last one, which at the end
    of training is the dense model of the pair (the authors' code takes its dense model from
    the decompressed phases: it checkpoints the model while one trains). It costs one copy of
    the model's tensors on their device, and it is saved in ``state_dict()``.

    Arguments (keywords) as for the other methods (``density`` the fraction of the sparsified
    weights a compressed phase keeps, ``total_steps``, ``distribution`` (default
    ``"uniform"``, read by ``selection="layer"`` only), ``dense_layers``, ``seed``,
    ``backend``, ``erk_power_scale``, ``sparsify_embeddings``, ``structure``) and:
    ``warmup_fraction`` (default 0.1: 10 of the 100 ImageNet epochs), ``phase_fraction`` (0.05:
    phases of 5 epochs) and ``final_fraction`` (0.15: the last 15 epochs compressed), each in
    (0, 1); ``selection``; ``reset_momentum`` (True); ``keep_dense`` (True). ``delta_t`` is
    accepted, so that code that passes it to every method works, and does not change the
    schedule, which is set by the fractions.

    AC/DC ``requires`` ``dense_weights`` (a dense phase holds every weight active) and
    ``variable_count`` (the count changes at every switch): the ``masked`` backend. The CSR
    backend has no dense place for the inactive weights: it stores only the active ones in a
    compact format whose kernels pay off at low density, so a dense phase would hold the whole
    layer in that format, slower and larger than dense; it refuses AC/DC.
    """

    fixed_budget = False
    grows = True
    requires = frozenset({VARIABLE_COUNT, DENSE_WEIGHTS})

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, density: float,
                 total_steps: int, distribution: str | Mapping[str, float] = "uniform",
                 dense_layers: Iterable[str] | str = (), seed: int = 0,
                 backend: str = "masked", warmup_fraction: float = 0.1,
                 phase_fraction: float = 0.05, final_fraction: float = 0.15,
                 selection: str | None = None, reset_momentum: bool = True,
                 keep_dense: bool = True, erk_power_scale: float = 1.0,
                 delta_t: int | None = None, sparsify_embeddings: bool = False,
                 structure: str | None = None):
        check_density(density)
        steps = checks.positive_int(total_steps, "total_steps")
        fractions = {}
        for name, value in (("warmup_fraction", warmup_fraction),
                            ("phase_fraction", phase_fraction),
                            ("final_fraction", final_fraction)):
            fractions[name] = checks.fraction(value, name, one=False,
                                              meaning="a fraction of total_steps")
        self.warmup_fraction = fractions["warmup_fraction"]
        self.phase_fraction = fractions["phase_fraction"]
        self.final_fraction = fractions["final_fraction"]
        if delta_t is not None:
            checks.positive_int(delta_t, "delta_t")
        kind = parse_structure(structure).kind
        if selection is None:
            selection = "global" if kind == "unstructured" else "layer"
        self.selection = checks.choice(selection, "selection", ("global", "layer"))
        if self.selection == "global" and kind != "unstructured":
            raise ValueError(f"selection='global' keeps the largest weights over all layers "
                             f"without a structure; under structure={structure!r} use "
                             "selection='layer'")
        self.reset_momentum = checks.boolean(reset_momentum, "reset_momentum")
        self.keep_dense = checks.boolean(keep_dense, "keep_dense")
        self.warmup_steps = max(1, round(self.warmup_fraction * steps))
        self.phase_steps = max(1, round(self.phase_fraction * steps))
        self.final_start = steps - max(1, round(self.final_fraction * steps))
        if self.warmup_steps > self.final_start:
            raise ValueError(
                f"the dense warm-up ({self.warmup_steps} steps) and the final compressed phase "
                f"({steps - self.final_start} steps) do not fit in total_steps={steps}; lower "
                "warmup_fraction or final_fraction, or train for more steps")
        span = self.final_start - self.warmup_steps
        alternations = -(-span // self.phase_steps)  # phases of P steps starting before F
        self._alternations = alternations - alternations % 2  # the last one is decompressed
        super().__init__(model, optimizer, density=density, total_steps=total_steps,
                         distribution=distribution, dense_layers=dense_layers, seed=seed,
                         backend=backend, erk_power_scale=erk_power_scale,
                         sparsify_embeddings=sparsify_embeddings, structure=structure)

    def initial_densities(self, final: Mapping[str, float]) -> Mapping[str, float]:
        self._final_density = dict(final)
        return {name: 1.0 for name in final}  # training starts dense

    def init_method_state(self) -> None:
        b = self.backend
        self._numels = {n: b.numel(n) for n in b.names}
        self._budget = {n: fixed_count(self.structure, b.shape(n),
                                       active_count(self._numels[n], self._final_density[n]))
                        for n in b.names}
        self._budget_total = active_count(sum(self._numels.values()), self.density)
        if self.selection == "global" and self._budget_total < len(b.names):
            raise ValueError(
                f"density={self.density} keeps {self._budget_total} weights, fewer than the "
                f"{len(b.names)} sparsified layers (at least one each); raise density, or keep "
                "some layers dense with dense_layers")
        self._dense: dict[str, torch.Tensor] = {}
        self._dense_step = 0

    # --- the schedule ---------------------------------------------------------------------
    def compressed(self, t: int) -> bool:
        """Whether the masks are compressed after step ``t`` (False: every weight active)."""
        if t >= self.final_start:
            return True
        if t < self.warmup_steps:
            return False
        phase = min((t - self.warmup_steps) // self.phase_steps, self._alternations - 1)
        return phase >= 0 and phase % 2 == 0

    def is_update_step(self, t: int) -> bool:
        """Whether step ``t`` switches between a compressed and a decompressed phase."""
        if t == self.final_start:
            return True
        if not self.warmup_steps <= t < self.final_start:
            return False
        phase, offset = divmod(t - self.warmup_steps, self.phase_steps)
        return offset == 0 and phase < self._alternations

    def scheduled_counts(self, t: int) -> dict[str, int] | None:
        """Every weight in a dense phase; in a compressed one each layer's budget, or None
        under global selection (the data decide)."""
        if not self.compressed(t):
            return dict(self._numels)
        return dict(self._budget) if self.selection == "layer" else None

    def scheduled_total(self, t: int) -> int:
        if not self.compressed(t):
            return sum(self._numels.values())
        if self.selection == "layer":
            return sum(self._budget.values())
        return self._budget_total

    def allowed_counts(self, t: int) -> dict[str, tuple[int, int]]:
        """A dense phase holds every weight; a compressed one from its budget (one weight under
        global selection) up to every weight (a pruning skipped on non-finite weights)."""
        if not self.compressed(t):
            return {n: (c, c) for n, c in self._numels.items()}
        return {n: (self._budget[n] if self.selection == "layer" else 1, c)
                for n, c in self._numels.items()}

    # --- training -------------------------------------------------------------------------
    def update_topology(self, t: int) -> None:
        if self.compressed(t):
            if self.keep_dense:
                self._keep_dense_copy(t)
            self._compress(t)
        else:
            self._decompress()

    def _compress(self, t: int) -> None:
        b = self.backend
        if self.selection == "layer":
            for name in b.names:
                n_active = b.n_active(name)
                n_keep = min(n_active, self._budget[name])
                if n_keep == n_active:
                    continue
                kept = (keep_largest(self, name, n_keep, t) if self.structure.kind ==
                        "unstructured" else keep_within(self, name, n_keep, t))
                if kept is None:
                    warn_not_finite(self, name, t)
                    continue
                b.set_active(name, kept)
            return
        active = {n: b.active_positions(n) for n in b.names}
        scores = {}
        for name, positions in active.items():
            scores[name] = checked.drop_scores(self, name, positions.numel())
            if scores[name] is None:
                warn_not_finite(self, name, t)  # the whole pruning is skipped
                return
        n_keep = min(self._budget_total, sum(p.numel() for p in active.values()))
        keep = select_global(scores, n_keep, self.seed, t, stacklevel=5)
        for name, positions in active.items():
            mask = keep[name].to(positions.device)
            if not bool(mask.all()):
                b.set_active(name, positions[mask])

    def _decompress(self) -> None:
        b = self.backend
        for name in b.names:
            if b.n_active(name) < b.numel(name):
                device = b.active_positions(name).device
                b.set_active(name, torch.arange(b.numel(name), device=device))
        if self.reset_momentum:
            for group in self.optimizer.param_groups:
                for param in group["params"]:
                    state = self.optimizer.state.get(param, {})
                    for key in MOMENTUM_KEYS:
                        if torch.is_tensor(state.get(key)):
                            state[key].zero_()

    @classmethod
    def training_flops(cls, f_dense: float, f_sparse: float, *, delta_t: int = 100) -> float:
        """``3 f_S`` with ``f_S`` the forward FLOPs of the current counts: ``3 f_D`` in a dense
        phase (every weight active), ``3 f_S`` in a compressed one; a switch's magnitude
        selection is not counted (RigL paper, Appendix H)."""
        return sparse_training_flops(f_sparse)

    # --- the dense model ------------------------------------------------------------------
    def _tensor_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.model.state_dict().items() if torch.is_tensor(v)}

    def _keep_dense_copy(self, t: int) -> None:
        self._dense = {}  # the previous copy goes before the new one is made
        self._dense = {k: v.detach().clone() for k, v in self._tensor_state().items()}
        self._dense_step = t

    def dense_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The model's tensors (parameters and buffers) at the end of the last dense phase
        (the warm-up or a decompressed phase), or None if none has ended (or without
        ``keep_dense``). Load it with ``model.load_state_dict(sparsifier.dense_state_dict())``,
        best into a copy of the model (``copy.deepcopy``): the sparsifier keeps the sparse
        model's masks. The tensors are the sparsifier's own; do not change them in place."""
        return dict(self._dense) if self._dense else None

    @property
    def dense_step(self) -> int:
        """The step whose end the dense copy holds (0 if there is none)."""
        return self._dense_step

    def method_state(self) -> dict[str, Any]:
        return {"dense": {k: v.detach().cpu().clone() for k, v in self._dense.items()},
                "dense_step": self._dense_step}

    def check_method_state(self, state: Mapping[str, Any]) -> None:
        unknown = sorted(str(k) for k in state if k not in ("dense", "dense_step"))
        dense, step = state.get("dense", {}), state.get("dense_step", 0)
        if unknown:
            raise ValueError(f"method_state has the unknown keys {unknown} (AC/DC saves "
                             "'dense' and 'dense_step'); pass what state_dict() returned")
        if not isinstance(dense, Mapping):
            raise ValueError(f"method_state['dense'] must be a dict name -> tensor, got a "
                             f"{type(dense).__name__}; pass what state_dict() returned")
        if not checks.is_int(step) or not 0 <= step <= self.total_steps or (
                (step == 0) != (len(dense) == 0)) or (step and not (
                self.is_update_step(step) and self.compressed(step))):
            raise ValueError(f"method_state['dense_step'] must be the step that ended the last "
                             f"dense phase (0 with no dense copy), got {checks.shown(step)}; "
                             "pass what state_dict() returned")
        reference = self._tensor_state()
        if dense and set(dense) != set(reference):
            differ = sorted(str(k) for k in set(dense) ^ set(reference))
            raise ValueError(f"method_state['dense'] must name the model's tensors, as "
                             f"model.state_dict() does; these differ: {differ[:5]}")
        for key, value in dense.items():
            ref = reference[key]
            if not torch.is_tensor(value) or value.layout != torch.strided or value.is_meta or (
                    value.shape != ref.shape or value.dtype != ref.dtype):
                got = (f"{value.dtype} of shape {tuple(value.shape)}" if torch.is_tensor(value)
                       else f"a {type(value).__name__}")
                raise ValueError(f"method_state['dense'][{key!r}] must be a {ref.dtype} tensor "
                                 f"of shape {tuple(ref.shape)}, got {got}")

    def load_method_state(self, state: Mapping[str, Any]) -> None:
        reference, dense = self._tensor_state(), state.get("dense", {})
        self._dense = {k: torch.empty_like(reference[k]).copy_(v)
                       for k, v in dense.items()} if self.keep_dense else {}
        self._dense_step = int(state.get("dense_step", 0)) if self._dense else 0

    def config(self) -> dict[str, Any]:
        return {**super().config(), "warmup_fraction": self.warmup_fraction,
                "phase_fraction": self.phase_fraction, "final_fraction": self.final_fraction,
                "selection": self.selection, "reset_momentum": self.reset_momentum,
                "keep_dense": self.keep_dense}
