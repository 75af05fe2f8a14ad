"""Top-KAST (Jayakumar, Pascanu, Rae, Osindero & Elsen, "Top-KAST: Top-K Always Sparse
Training", NeurIPS 2020): the forward pass uses the largest weights, a larger set learns.

The paper keeps the full parameter vector theta. At step t the forward pass uses the set A
(``TopK(theta, D)``: the fraction D, ``density``, of each layer's weights of largest
``|theta|``), every other weight counting as zero; the gradient with respect to those effective
weights is applied to the larger set B (``TopK(theta, D + M)``, ``backward_density``), which
contains A, and the weights outside B keep their values (the paper's sparse backward pass: no
change outside B). So a weight outside B comes back into B, with the value it kept, once its
magnitude is again among the largest. The paper's exploration penalty is ``|theta|`` on A and
``|theta| / D`` on ``B \\ A``, an L2 term (as the neuralmagic/sparseml Top-KAST modifier also
reads it): here the gradient of ``exploration_l2 / 2 * (sum_A theta^2 + sum_(B\\A) theta^2 /
D)`` is added to the loss's, with D the forward ``density`` of the run.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .. import checks
from ..backends.base import DENSE_WEIGHTS
from ..sparsity.distributions import check_density, densities_for_shapes
from ..sparsity.masks import active_count
from ..sparsity.permutation import DROP
from ..sparsity.positions import check_positions, contains
from ..sparsity.selection import order_keys, top_k
from ..sparsity.targets import partition
from .base import Sparsifier
from .registry import register_method
from .update import warn_not_finite


def _get(tensor: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    if tensor.is_contiguous():
        return tensor.view(-1)[positions]
    return tensor[torch.unravel_index(positions, tensor.shape)]


def _put(tensor: torch.Tensor, positions: torch.Tensor, values) -> None:
    if tensor.is_contiguous():
        tensor.view(-1)[positions] = values
    else:
        tensor[torch.unravel_index(positions, tensor.shape)] = values


@register_method("topkast")
class TopKAST(Sparsifier):
    """Top-KAST: forward with the top-``density`` weights, learn the top-``backward_density``.

    Each sparsified weight l has a forward count ``active_count(N_l, D_l)``, ``D_l`` from
    ``distribution`` at ``density`` (the budget of the other methods: the trained model holds
    exactly these weights), and a backward count from ``distribution`` at ``backward_density``
    (a custom dict distribution: ``min(1, D_l * backward_density / density)``). The backend's
    active set (``masks``, ``active_positions``, ``active_counts()``) is B, the weights the
    optimizer updates; ``forward_positions(name)`` and ``forward_counts()`` give A, and
    ``layer_densities()`` and ``overall_density()`` report A, the density of the model that is
    evaluated.

    - Start: B and A are the largest ``|W|`` of the model's dense initialisation, as in the
      paper (theta^0 is dense); the rest of the initialisation is held, not lost.
    - Every step: before the optimizer step the weights of ``B \\ A`` are put back (between
      steps they are held by the sparsifier and zero in the model, so the forward pass and
      evaluation see A only); the gradient, taken w.r.t. the effective weights at every
      position, gets the penalty ``exploration_l2 * W`` on A and ``exploration_l2 * W / D``
      on ``B \\ A``; the optimizer updates B (its state is kept for all of B); then ``B \\ A``
      goes back into the held values.
    - Every ``delta_t`` steps (after the optimizer step): B and A are chosen again as the
      largest ``|theta|`` over the whole layer, held weights included (ties by the seeded
      random order); a weight entering B comes in with its held value and zero optimizer
      state, one leaving B keeps its value in the held store and loses its state.

    Arguments (keywords) as for the other methods (``density``, ``total_steps``,
    ``distribution``, ``dense_layers``, ``seed``, ``backend``, ``erk_power_scale``,
    ``sparsify_embeddings``), and: ``backward_density`` in [``density``, 1]; ``exploration_l2``
    >= 0, the penalty's coefficient (added to the gradient after ``clip_grad_norm_``, so not
    clipped); ``delta_t`` steps between choices of the sets. Defaults: ``backward_density =
    min(1, 2 * density)``, the paper's ImageNet pairing of 90% forward with 80% backward
    sparsity (which neuralmagic/sparseml reproduced, pull request 1674); ``exploration_l2 =
    1e-4``, the default of sparseml's Top-KAST modifier (``active_weight_decay``; tune it per
    task); ``delta_t = 100``: the paper chooses the sets at every step, and its authors found
    every 100 steps as good (sparseml's modifier notes; ``delta_t=1`` is the per-step rule);
    ``distribution="erk"``, as the other methods here. Unstructured only.

    Requires a backend with ``"dense_weights"`` (the masked one): it reads and writes each
    weight's dense storage (``backend.dense_weight(name)``) and keeps a dense tensor per layer
    of the held values, which the compact CSR backend has no room for; that backend is refused.

    Training FLOPs per example and step (``training_flops_per_example``): the forward pass and
    the input gradient with A, the weight gradient at the positions of B, ``2 f_A + f_B``.
    ``f_A`` is the runner's ``f_sparse`` (the forward FLOPs of ``forward_counts()``, as the
    runner counts inference FLOPs); ``f_B = f_A + (f_D - f_A) (n_B - n_A) / (N - n_A)`` over
    the counts of all layers (the same FLOPs per weight throughout; exact when every layer has
    the same densities). The selection every ``delta_t`` steps is not
    counted (comparisons, no multiply-adds).
    """

    requires = frozenset({DENSE_WEIGHTS})
    grows_at_zero = False  # a weight entering B comes back with the value it held
    structures = frozenset({"unstructured"})

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, density: float,
                 total_steps: int, backward_density: float | None = None,
                 exploration_l2: float = 1e-4, delta_t: int = 100,
                 distribution: str | Mapping[str, float] = "erk",
                 dense_layers: Iterable[str] | str = (), seed: int = 0,
                 backend: str = "masked", erk_power_scale: float = 1.0,
                 sparsify_embeddings: bool = False, structure: str | None = None):
        density = check_density(density)
        self.backward_density = (min(1.0, 2 * density) if backward_density is None
                                 else check_density(backward_density, "backward_density"))
        if self.backward_density < density:
            raise ValueError(f"backward_density ({backward_density!r}) must be at least density "
                             f"({density!r}): the set B that learns contains the forward set "
                             "A; give a larger backward_density, or leave it out for 2 * density")
        self.exploration_l2 = checks.real_in_range(
            exploration_l2, "exploration_l2", 0.0, meaning="the coefficient of the exploration "
            "penalty", fix="give exploration_l2 a number >= 0, e.g. 1e-4 (the default)")
        self.delta_t = checks.positive_int(delta_t, "delta_t")
        dense = (dense_layers,) if isinstance(dense_layers, str) else tuple(dense_layers)
        sparse, _ = partition(model, dense, sparsify_embeddings=bool(sparsify_embeddings))
        # theta^0: the dense initialisation, from which the first A and B are chosen
        self._theta0 = {t.name: t.param.detach().clone() for t in sparse}
        super().__init__(model, optimizer, density=density, total_steps=total_steps,
                         distribution=distribution, dense_layers=dense, seed=seed,
                         backend=backend, erk_power_scale=erk_power_scale,
                         sparsify_embeddings=sparsify_embeddings, structure=structure)

    # --- the sets -------------------------------------------------------------------------
    def initial_densities(self, final: Mapping[str, float]) -> Mapping[str, float]:
        """B's densities (the base builds a placeholder B of these counts, which
        ``init_method_state`` replaces by the largest weights); A's are ``final``."""
        numels = {n: w.numel() for n, w in self._theta0.items()}
        self._forward_counts = {n: active_count(numels[n], d) for n, d in final.items()}
        if isinstance(self.distribution, Mapping):
            ratio = self.backward_density / self.density
            back = {n: min(1.0, d * ratio) for n, d in final.items()}
        else:
            back = densities_for_shapes({n: tuple(w.shape) for n, w in self._theta0.items()},
                                        self.backward_density, self.distribution,
                                        erk_power_scale=self.erk_power_scale)
        return {n: max(back[n], final[n]) for n in final}

    def init_method_state(self) -> None:
        self._forward: dict[str, torch.Tensor] = {}
        self._held: dict[str, torch.Tensor] = {}
        self._explore: dict[str, torch.Tensor] = {}
        for name in self.backend.names:
            weight, theta = self._weight(name), self._theta0.pop(name)
            if not bool(torch.isfinite(theta).all()):
                raise ValueError(f"the initial weights of {name!r} are not all finite; "
                                 "initialise the model before building the sparsifier")
            back, forward = self._top(name, theta, 0)
            with torch.no_grad():
                weight.copy_(theta)
                self.backend.restore_active(name, back)  # keeps B's values, zeroes the rest
                self.backend.restore_ever_active(name, back)
                held = theta.contiguous()
                _put(held, back, 0)
            self._set(name, forward, held)
        self._stash()

    def _weight(self, name: str) -> torch.Tensor:
        """The weight's dense storage (a backend with ``dense_weights`` gives its own)."""
        return self.backend.dense_weight(name)

    def _top(self, name: str, theta: torch.Tensor, t: int):
        """(B, A) of ``name`` for the dense ``theta``: its largest ``|theta|``, sorted."""
        scores = theta.detach().abs().reshape(-1)
        keys = self.order(name, DROP, t)
        back = top_k(scores, self.backend.n_active(name), order_keys(keys))
        inner = top_k(scores[back], self._forward_counts[name], order_keys(keys, back))
        return back, back[inner]

    def _set(self, name: str, forward: torch.Tensor, held: torch.Tensor) -> None:
        back = self.backend.active_positions(name)
        self._forward[name], self._held[name] = forward, held
        self._explore[name] = back[~contains(forward, back)]

    @torch.no_grad()
    def _stash(self) -> None:
        """Move the weights of ``B \\ A`` out of the model into the held values."""
        for name, explore in self._explore.items():
            weight = self._weight(name)
            _put(self._held[name], explore, _get(weight, explore))
            _put(weight, explore, 0)

    # --- the step -------------------------------------------------------------------------
    @torch.no_grad()
    def observe_gradients(self) -> None:
        """Put ``B \\ A`` back for the optimizer step and add the penalty's gradient."""
        for name, explore in self._explore.items():
            weight, held = self._weight(name), self._held[name]
            _put(weight, explore, _get(held, explore))
            _put(held, explore, 0)
            param = self.backend.gradient_parameter(name)
            if param.grad is None or self.exploration_l2 == 0:
                continue
            if param.grad.is_sparse:
                param.grad = param.grad.to_dense()
            grad, forward = param.grad, self._forward[name]
            for where, scale in ((forward, self.exploration_l2),
                                 (explore, self.exploration_l2 / self.density)):
                _put(grad, where, _get(grad, where) + scale * _get(weight, where))

    def after_step(self) -> None:
        self._stash()  # between steps the model holds A only

    def is_update_step(self, t: int) -> bool:
        return t % self.delta_t == 0

    def update_topology(self, t: int) -> None:
        """Choose B and A again from ``|theta|``, the model's B and the held values."""
        for name in self.backend.names:
            weight = self._weight(name)
            theta = weight + self._held[name]  # disjoint: B in the model, the rest held
            if not bool(torch.isfinite(theta).all()):
                warn_not_finite(self, name, t)
                continue
            back, forward = self._top(name, theta, t)
            if not torch.equal(back, self.backend.active_positions(name)):
                self.backend.set_active(name, back)  # grown: zero state; dropped: zeroed
                _put(weight, back, _get(theta, back))  # grown weights come back with theta
            held = self._held[name]
            held.copy_(theta)
            _put(held, back, 0)
            self._set(name, forward, held)

    # --- what the model holds, and FLOPs ----------------------------------------------------
    def forward_positions(self, name: str) -> torch.Tensor:
        """The forward set A of ``name``: sorted flat positions (int64)."""
        return self._forward[name]

    def forward_counts(self) -> dict[str, int]:
        """Number of weights of every sparsified weight that the forward pass uses (A)."""
        return dict(self._forward_counts)

    def layer_densities(self) -> dict[str, float]:
        """Density of the forward set A of every sparsified weight (1.0 for those kept
        dense): what the model holds between steps and is evaluated with."""
        result = super().layer_densities()
        result.update({n: c / self.backend.numel(n) for n, c in self._forward_counts.items()})
        return result

    def overall_density(self) -> float:
        """Weights of the forward sets over all sparsified weights."""
        b = self.backend
        return sum(self._forward_counts.values()) / sum(b.numel(n) for n in b.names)

    @classmethod
    def training_flops(cls, f_dense: float, f_sparse: float, *, delta_t: int = 100) -> float:
        """``4 f_S`` for ``f_S`` the forward FLOPs of A (the sparse model's, as for every
        method): ``2 f_A + f_B`` with ``f_B = 2 f_A``, as at the default ``backward_density =
        2 * density`` (density <= 0.5) where the FLOPs are those of the weights (an
        approximation: a run counts its own sets, see ``training_flops_per_example``)."""
        return 4 * f_sparse

    def training_flops_per_example(self, f_dense: float, f_sparse: float) -> float:
        """``2 f_A + f_B`` for this run's sets, ``f_sparse`` being the forward FLOPs of A (the
        runner counts ``forward_counts()``); ``f_B`` interpolated in the number of weights
        between A's FLOPs and dense (see the class docstring)."""
        n_b = sum(self.backend.n_active(n) for n in self.backend.names)
        n_a = sum(self._forward_counts.values())
        total = sum(self.backend.numel(n) for n in self.backend.names)
        f_b = (f_sparse + (f_dense - f_sparse) * (n_b - n_a) / (total - n_a)
               if n_a < total else f_dense)
        return 2 * f_sparse + f_b

    # --- state ----------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {**super().config(), "backward_density": self.backward_density,
                "exploration_l2": self.exploration_l2, "delta_t": self.delta_t}

    def method_state(self) -> dict[str, Any]:
        """A of every layer and the held values (theta outside A: ``B \\ A`` and the weights
        outside B), as dense tensors of the weight's shape."""
        return {"forward": {n: a.cpu().clone() for n, a in self._forward.items()},
                "held": {n: h.detach().cpu().clone() for n, h in self._held.items()}}

    def check_method_state(self, state: Mapping[str, Any]) -> None:
        names = list(self.backend.names)
        for key in ("forward", "held"):
            value = state.get(key)
            if not isinstance(value, Mapping) or sorted(map(repr, value)) != sorted(
                    map(repr, names)) or not all(isinstance(n, str) for n in value):
                raise ValueError(f"method_state[{key!r}] must be a dict with a tensor for each "
                                 f"sparsified weight ({names}); pass what state_dict() returned")
        for name in names:
            what = f"method_state['forward'][{name!r}]"
            forward = state["forward"][name]
            if (not torch.is_tensor(forward) or forward.layout != torch.strided
                    or forward.is_meta):
                raise ValueError(f"{what} must be a 1-D int64 tensor of sorted flat positions")
            check_positions(forward, self.backend.numel(name), what)
            if forward.numel() != self._forward_counts[name]:
                raise ValueError(f"{what} has {forward.numel()} positions, but this sparsifier's "
                                 f"forward set holds {self._forward_counts[name]}; build it with "
                                 "the saved run's density and distribution")
            held, shape = state["held"][name], self.backend.shape(name)
            if (not torch.is_tensor(held) or held.layout != torch.strided or held.is_meta
                    or not held.is_floating_point() or tuple(held.shape) != shape):
                raise ValueError(f"method_state['held'][{name!r}] must be a floating tensor of "
                                 f"the weight's shape {shape}; pass what state_dict() returned")

    def _checked_state(self, state: Any):
        checked = super()._checked_state(state)
        active, forward = checked[1], checked[4]["forward"]
        for name, positions in active.items():
            if not bool(contains(positions, forward[name].to(positions.device)).all()):
                raise ValueError(f"method_state['forward'][{name!r}] is not within the saved "
                                 "active set (the backward set B holds the forward set A); "
                                 "pass what state_dict() returned")
        return checked

    def load_method_state(self, state: Mapping[str, Any]) -> None:
        for name in self.backend.names:
            weight = self._weight(name)
            forward = state["forward"][name].to(weight.device)
            held = state["held"][name].to(device=weight.device, dtype=weight.dtype,
                                          memory_format=torch.contiguous_format, copy=True)
            _put(held, forward, 0)
            self._set(name, forward, held)
