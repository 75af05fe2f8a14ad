"""The base of every sparse training method: binding, the training step, state and statistics.

A :class:`Sparsifier` binds a model, its optimizer and a backend (which stores the sparse
weights, see :mod:`sparsetrain.backends.base`). It decides *when* the topology changes
(``is_update_step``) and runs the step; a method says *how* (``update_topology``) through the
backend protocol alone, so the same method runs on every backend. It owns the step count and
the seed: every random choice is a pure function of (seed, purpose, step, layer, position) (see
:mod:`sparsetrain.sparsity.permutation`), so there is no generator state, and every backend and
data-parallel rank makes the same choices.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn

from .. import checks
from ..backends import get_backend
from ..backends.base import CAPABILITIES, missing_reason
from ..flops import sparse_training_flops
from ..sparsity.coverage import Coverage, check_coverage, coverage
from ..sparsity.distributions import check_density, densities_for_shapes
from ..sparsity.masks import initial_active, validate_masks
from ..sparsity.permutation import RandomOrder
from ..sparsity.structure import Structure, check_conforms, check_structure, parse_structure
from ..sparsity.targets import Target, partition
from . import loop

LOG = logging.getLogger("sparsetrain")


def _check_optimizer(optimizer: Any, targets: list[Target]) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [t.name for t in targets if id(t.param) not in in_optimizer]
    if missing:
        raise ValueError(
            f"the optimizer does not update the sparsified weights {missing}; build the "
            "optimizer from model.parameters() of the same model, or keep those weights dense "
            "with dense_layers"
        )


def distribution_config(distribution: str | Mapping[str, float]) -> str | dict[str, float]:
    """The distribution as a plain value for a state_dict (a custom map as a dict of floats)."""
    if isinstance(distribution, Mapping):
        return {str(k): float(v) for k, v in distribution.items()}
    return distribution


#: The keys of a ``state_dict()``, and of one saved before positions were (bool ``masks``).
STATE_KEYS = ("method", "step_count", "positions", "ever_active", "config", "method_state")
OLD_STATE_KEYS = ("method", "step_count", "masks", "config", "method_state")


def _same(a: Any, b: Any) -> bool:
    """``a == b`` for plain values; False where the comparison is not a plain truth value."""
    try:
        return bool(a == b)
    except (RuntimeError, TypeError, ValueError):
        return False


def _brief(value: Any) -> str:
    if torch.is_tensor(value):
        return f"a tensor of shape {tuple(value.shape)} ({value.dtype})"
    text = repr(value)
    return text if len(text) <= 60 and "\n" not in text else f"a {type(value).__name__}"


class _Masks(Mapping):
    """name -> dense bool mask of each sparsified weight, built on access from its active set
    (O(numel) per access: for a user who asks; the library itself never does)."""

    def __init__(self, backend):
        self._backend = backend

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._backend.names:
            raise KeyError(name)
        return self._backend.dense_mask(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._backend.names)

    def __len__(self) -> int:
        return len(self._backend.names)


class Sparsifier:
    """Base of the sparse training methods; use a method (``st.RigL``, ``st.GMP``, ...).

    Subclasses set their own settings, then call ``Sparsifier.__init__``, and override:

    - ``is_update_step(t)`` and ``update_topology(t)``: when and how the active sets change;
    - ``drop_scores(name)``: which active weights an update drops or prunes (``|W|``);
    - ``observe_gradients()``: called every step with the dense gradients in place, and
      ``after_step()`` at the end of every step;
    - ``training_flops(f_dense, f_sparse, delta_t=...)``: training FLOPs per example and step;
    - ``requires`` (backend capabilities) and ``update_reads_gradient`` (whether an update's
      scores read the dense gradient of its step);
    - what the counts do: ``fixed_budget`` (every layer keeps its count), ``grows`` (whether
      an update may activate a position; ``grows_at_zero``: a grown weight starts at zero, its
      optimizer state always does), ``scheduled_counts(t)`` and ``scheduled_total(t)``
      (the counts the method holds after step ``t``), ``allowed_counts(t)`` and
      ``allowed_total(t)`` (the ranges a loaded state may hold) and ``forward_counts()`` (the
      active weights the forward pass uses, where fewer than the active set).
    """

    method_name = "sparsifier"
    fixed_budget = True  # every layer keeps its number of active weights from start to end
    grows = True  # an update may activate positions (False: it only prunes)
    grows_at_zero = True  # a grown weight starts at zero (False: at a value the method held)
    requires: frozenset[str] = frozenset()
    update_reads_gradient = False
    optimizer_step_on_update = True
    empty_rows_allowed = False  # under fan-in, whether a row may hold no weight (ablation)
    structures: frozenset[str] | None = None  # the structure kinds it runs under (None: all)

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, density: float,
                 total_steps: int, distribution: str | Mapping[str, float] = "erk",
                 dense_layers: Iterable[str] | str = (), masks: Mapping | None = None,
                 seed: int = 0, backend: str = "masked", erk_power_scale: float = 1.0,
                 sparsify_embeddings: bool = False, structure: str | Structure | None = None):
        self.density = check_density(density)
        self.structure: Structure = parse_structure(structure)
        if not self.supports_structure(self.structure):
            raise ValueError(f"{type(self).__name__} runs under structure "
                             f"{' or '.join(sorted(self.structures))}, not {structure!r}")
        self.total_steps = checks.positive_int(total_steps, "total_steps")
        self.seed = checks.integer(seed, "seed")
        self.distribution = distribution
        self.erk_power_scale = float(erk_power_scale)
        self.dense_layers = ((dense_layers,) if isinstance(dense_layers, str)
                             else tuple(dense_layers))
        self.sparsify_embeddings = bool(sparsify_embeddings)
        self.model = model
        self.optimizer = optimizer
        sparse, dense = partition(model, self.dense_layers,
                                  sparsify_embeddings=self.sparsify_embeddings)
        self._dense_names = [t.name for t in dense]
        self.coverage: Coverage = coverage(model, sparse, dense)
        _check_optimizer(optimizer, sparse)
        backend_class = get_backend(backend)
        missing = sorted(self.requires - backend_class.capabilities)
        if missing:
            why = "".join(f" ({r})" for r in (missing_reason(backend_class, c) for c in missing)
                          if r)
            raise ValueError(
                f"{type(self).__name__} is not available on backend={backend!r}: it needs "
                f"{'; '.join(f'{c} ({CAPABILITIES.get(c, c)})' for c in missing)}, which that "
                f"backend does not provide{why}; use a backend that does "
                f"({', '.join(self.supported_backends())})")
        shapes = {t.name: tuple(t.shape) for t in sparse}
        check_structure(self.structure, shapes, self.density)
        if masks is None:
            final = densities_for_shapes(shapes, self.density, distribution,
                                         erk_power_scale=self.erk_power_scale)
            active = initial_active(sparse, self.initial_densities(final), self.seed,
                                    self.structure, self.fixed_budget)
        else:
            active = validate_masks(masks, shapes, self.density)
            check_conforms(self.structure, shapes, active, "masks", self.empty_rows_allowed)
        self.backend = backend_class(sparse, active, optimizer, model=model, seed=self.seed,
                                     structure=self.structure)
        self._index = {name: i for i, name in enumerate(self.backend.names)}
        self._start_counts = self.active_counts()
        self.step_count = 0
        self._updating = False
        self._hooks: list | None = None
        self.init_method_state()
        self._prepare_next_step()
        check_coverage(self.coverage, type(self).__name__)
        LOG.info("%s", self.summary())

    def summary(self) -> str:
        """One line: how many weights are sparsified, on which backend, and which weight
        matrices stay dense and why (``dense_layers``, position embedding, unsupported module
        type; tied weights count once)."""
        structure = ("" if self.structure.kind == "unstructured" else
                     f", structure {self.structure} (density {self.overall_density():.4f} as "
                     "the structure rounds the layers)")
        return (f"{type(self).__name__} ({self.backend.name} backend{structure}) "
                + self.coverage.line(self.density))

    @classmethod
    def supports_structure(cls, structure: str | Structure) -> bool:
        """Whether the method runs under ``structure`` (a value of ``structure=``)."""
        return cls.structures is None or parse_structure(structure).kind in cls.structures

    @classmethod
    def supported_backends(cls) -> list[str]:
        """The backends this method runs on (those providing what it ``requires``)."""
        from ..backends import BACKENDS

        return [n for n, b in BACKENDS.items() if cls.requires <= b.capabilities]

    # --- what the methods override ----------------------------------------------------------
    def drop_scores(self, name: str) -> torch.Tensor:
        """One score per active weight of ``name``, in ``active_positions(name)`` order: the
        lowest are dropped (or pruned). ``|W|`` by default."""
        return self.backend.active_values(name).abs()

    def initial_densities(self, final: Mapping[str, float]) -> Mapping[str, float]:
        """The layer densities to start from, given the distribution's (final) ones."""
        return final

    def init_method_state(self) -> None:
        """Create method-specific state (called at the end of ``__init__``)."""

    def observe_gradients(self) -> None:
        """Called every step with the dense gradients in place, before they are masked."""

    def after_step(self) -> None:
        """Called at the end of every step, after the optimizer step and any update (Top-KAST
        hides the weights its forward pass does not use here)."""

    def is_update_step(self, t: int) -> bool:
        """Whether the ``t``-th call of ``step()`` changes the active sets."""
        return False

    def update_topology(self, t: int) -> None:
        """Change the active sets at update step ``t``."""

    @classmethod
    def training_flops(cls, f_dense: float, f_sparse: float, *, delta_t: int = 100) -> float:
        """Training FLOPs per example of one step, given the forward FLOPs of the dense and of
        the sparse model (RigL paper, Appendix H)."""
        return sparse_training_flops(f_sparse)

    def allowed_counts(self, t: int) -> dict[str, tuple[int, int]]:
        """The fewest and most active weights each layer may hold after step ``t`` (what a
        loaded state must have): a fixed budget's own counts, which never change."""
        return {n: (c, c) for n, c in self._start_counts.items()}

    def allowed_total(self, t: int) -> tuple[int, int] | None:
        """The fewest and most active weights all the layers together may hold after step
        ``t`` (what a loaded state must have, beside ``allowed_counts``), or None where only
        the layers' own ranges apply (the default)."""
        return None

    def forward_counts(self) -> dict[str, int]:
        """The active weights of every layer that the forward pass uses: ``active_counts()``,
        except for a method that updates more weights than its forward pass uses (Top-KAST),
        whose inference FLOPs and final density are of these."""
        return self.active_counts()

    def forward_positions(self, name: str) -> torch.Tensor:
        """The weights of ``name`` that the forward pass uses (sorted flat positions, int64):
        ``active_positions(name)``, except for a method whose forward pass uses fewer
        (Top-KAST). What an exported model holds (:func:`sparsetrain.deploy.export_sparse`)."""
        return self.active_positions(name)

    def scheduled_counts(self, t: int) -> dict[str, int] | None:
        """The active weights of every layer after step ``t``, as the method fixes them (with
        every update run: one skipped on non-finite scores leaves the counts as they were), or
        None where the data decide how they are spread over the layers (then
        ``scheduled_total(t)`` may still fix their sum). A fixed budget's counts at the start."""
        return dict(self._start_counts) if self.fixed_budget else None

    def scheduled_total(self, t: int) -> int | None:
        """The active weights of all the layers together after step ``t``, as the method fixes
        them, or None where it does not: the sum of ``scheduled_counts(t)`` by default."""
        counts = self.scheduled_counts(t)
        return None if counts is None else sum(counts.values())

    def method_state(self) -> dict[str, Any]:
        return {}

    def check_method_state(self, state: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` if ``load_method_state(state)`` would not work (called before
        anything is loaded)."""

    def load_method_state(self, state: Mapping[str, Any]) -> None:
        pass

    def config(self) -> dict[str, Any]:
        """The settings, as plain values (saved in the state_dict and compared on load)."""
        return {"density": self.density, "distribution": distribution_config(self.distribution),
                "total_steps": self.total_steps, "dense_layers": list(self.dense_layers),
                "seed": self.seed, "backend": self.backend.name,
                "erk_power_scale": self.erk_power_scale,
                "sparsify_embeddings": self.sparsify_embeddings,
                "structure": str(self.structure)}

    # --- the training step ----------------------------------------------------------------
    def step(self, closure=None, *, scaler=None):
        """The optimizer step, with the inactive weights kept at zero and the topology updated
        on schedule. Returns what ``optimizer.step`` returns, or ``None`` on an update step
        that replaces it.

        With a ``torch.amp.GradScaler`` pass ``scaler=``: the gradients are unscaled (unless
        they were), and a step the scaler skips for an inf or NaN is not counted and never
        updates the topology. With gradient accumulation call it once per optimizer step,
        after the last micro-batch: the update reads the accumulated gradient."""
        if self._hooks is not None:  # the optimizer's hooks run the sparse step
            return self._optimizer_step(closure, scaler)
        if loop.skipped_by_scaler(scaler, self.optimizer):
            scaler.step(self.optimizer)  # skips, and records it for scaler.update()
            return None
        run = self._begin_step()
        loss = self._optimizer_step(closure, scaler) if run else None
        self._end_step()
        return loss

    def _optimizer_step(self, closure, scaler):
        if scaler is not None and scaler.is_enabled():
            if closure is not None:
                raise ValueError("a closure cannot be used with a GradScaler (torch does not "
                                 "support it); call step(scaler=scaler) without one")
            return scaler.step(self.optimizer)
        return self.optimizer.step() if closure is None else self.optimizer.step(closure)

    def _begin_step(self) -> bool:
        """Count the step, let the method see the gradients, and mask them unless an update
        replaces the optimizer step; returns whether the optimizer step runs."""
        self.step_count += 1
        self.observe_gradients()
        self._updating = self.is_update_step(self.step_count)
        run = not self._updating or self.optimizer_step_on_update
        if run:
            self.backend.mask_gradients()
        return run

    def _end_step(self) -> None:
        self.backend.after_optimizer_step()  # also when an update replaces the optimizer step
        if self._updating:
            with torch.no_grad():
                self.update_topology(self.step_count)
            self._updating = False
        self.after_step()
        self._prepare_next_step()

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, *, scaler=None,
                        parameters: Iterable[torch.Tensor] | None = None,
                        error_if_nonfinite: bool = False) -> torch.Tensor:
        """Clip the gradients by the norm of the *active* ones, as ``clip_grad_norm_`` does;
        returns that norm before clipping. Call it after the backward pass and before
        ``step()``; with a ``GradScaler`` pass ``scaler=`` (it unscales the gradients first).

        ``parameters``: those of the optimizer by default. Every gradient, the dense gradient
        at inactive positions included, is scaled by the same factor, so an update that reads
        gradients chooses as it would unclipped. Do not clip with
        ``torch.nn.utils.clip_grad_norm_``: it counts the inactive gradients too."""
        loop.unscale(scaler, self.optimizer)
        if parameters is None:
            seen: dict[int, torch.Tensor] = {}
            for group in self.optimizer.param_groups:
                seen.update((id(p), p) for p in group["params"])
            params = list(seen.values())
        else:
            params = [parameters] if torch.is_tensor(parameters) else list(parameters)
        return loop.clip_grad_norm(self.backend, params, max_norm, norm_type, error_if_nonfinite)

    def hook_optimizer(self):
        """Make every ``optimizer.step()`` a sparse step, whoever calls it (a training
        framework, a ``GradScaler``): hooks on the optimizer mask the gradients before it and
        keep the inactive weights at zero and update the topology after it. A step the scaler
        skips never reaches the optimizer, so it is not counted. On an update that replaces
        the optimizer step, the hooks clear the gradients so that the optimizer leaves every
        weight as it is. An ``optimizer.step(closure)`` whose closure computes the gradients
        (Lightning, LBFGS) has its closure run first. ``sparsifier.step()`` then only steps the
        optimizer. Returns a handle whose ``remove()`` takes the hooks off."""
        if self._hooks is not None:
            raise RuntimeError(f"{type(self).__name__}.hook_optimizer() was already called")

        def before(optimizer, args, kwargs):
            changed = loop.run_closure_first(args, kwargs)  # the closure makes the gradients
            if not self._begin_step():
                self.backend.mask_gradients()  # keeps the gradient the update reads
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        p.grad = None
            return changed

        def after(optimizer, args, kwargs):
            self._end_step()

        self._hooks = [self.optimizer.register_step_pre_hook(before),
                       self.optimizer.register_step_post_hook(after)]
        sparsifier = self

        class Handle:
            def remove(self):
                for hook in sparsifier._hooks or []:
                    hook.remove()
                sparsifier._hooks = None

        return Handle()

    def _prepare_next_step(self) -> None:
        """Tell the backend whether the coming step's dense gradient feeds an update."""
        self.backend.prepare_step(self.update_reads_gradient
                                  and self.is_update_step(self.step_count + 1))

    def mask_gradients(self) -> None:
        """Zero the gradients of inactive weights now.

        ``step()`` does this itself, and ``clip_grad_norm_`` clips by the active gradients:
        there is no need to call it. Calling it on a step whose update reads the dense
        gradient (RigL) would leave that update nothing but ties to grow by."""
        self.backend.mask_gradients()

    def order(self, name: str, purpose: int, t: int | None = None) -> RandomOrder:
        """The random order of weight ``name``'s positions for ``purpose`` at step ``t`` (the
        current step by default): tie keys, random growth."""
        step = self.step_count if t is None else t
        return RandomOrder(self.backend.numel(name), self.seed, purpose, step, self._index[name])

    # --- what the runner, reports and FLOPs read ------------------------------------------
    @property
    def names(self) -> list[str]:
        """The sparsified weights, as ``model.named_parameters()`` names them."""
        return list(self.backend.names)

    @property
    def masks(self) -> Mapping[str, torch.Tensor]:
        """Parameter name -> dense bool mask of its shape (built on access)."""
        return _Masks(self.backend)

    def numel(self, name: str) -> int:
        """Number of weights (active or not) of sparsified weight ``name``."""
        return self.backend.numel(name)

    def active_counts(self) -> dict[str, int]:
        """Number of active weights of every sparsified weight."""
        return {n: self.backend.n_active(n) for n in self.backend.names}

    def active_positions(self, name: str) -> torch.Tensor:
        """The active set of ``name``: sorted flat positions (int64)."""
        return self.backend.active_positions(name)

    def layer_densities(self) -> dict[str, float]:
        """Current density of every sparsified weight, and 1.0 for those kept dense."""
        b = self.backend
        result = {n: b.n_active(n) / b.numel(n) for n in b.names}
        result.update({n: 1.0 for n in self._dense_names})
        return result

    def overall_density(self) -> float:
        """Active weights over all sparsified weights (not over the whole model: see
        ``summary()`` and ``coverage`` for what is sparsified and what stays dense)."""
        b = self.backend
        return sum(b.n_active(n) for n in b.names) / sum(b.numel(n) for n in b.names)

    def ever_active_fraction(self) -> float:
        """Fraction of the sparsified weights that have been active at some point."""
        b = self.backend
        return sum(b.ever_active_count(n) for n in b.names) / sum(b.numel(n) for n in b.names)

    def training_flops_per_example(self, f_dense: float, f_sparse: float) -> float:
        """Training FLOPs per example of one step of this run (see ``training_flops``)."""
        return self.training_flops(f_dense, f_sparse, delta_t=getattr(self, "delta_t", 100))

    def mask_fingerprint(self) -> torch.Tensor:
        """A cheap summary of every layer's active set (int64, one row ``(count, hash)`` per
        sparsified weight): equal on replicas that hold the same masks, and all but surely
        different where they do not. Under data parallelism compare it across ranks."""
        rows = []
        for name in self.backend.names:
            positions = self.backend.active_positions(name).to(device="cpu", dtype=torch.int64)
            # a sum of a mixing function of each position: order-free, wraps around in int64
            mixed = (positions + 1) * 0x9E3779B1 ^ (positions >> 7) * 0x85EBCA77
            rows.append(torch.stack([torch.tensor(positions.numel()), mixed.sum()]))
        return torch.stack(rows) if rows else torch.zeros(0, 2, dtype=torch.int64)

    # --- checkpointing --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: the step, every weight's active set (sorted
        flat positions) and the positions ever active, the settings and the method's state.

        Holds only tensors, numbers, strings, lists and dicts, so it loads with
        ``torch.load(..., weights_only=True)``; a state saved on one backend loads on another.
        """
        b = self.backend
        return {
            "method": self.method_name,
            "step_count": self.step_count,
            "positions": {n: b.active_positions(n).cpu().clone() for n in b.names},
            "ever_active": {n: b.ever_active_positions(n).cpu().clone() for n in b.names},
            "config": self.config(),
            "method_state": self.method_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a ``state_dict()``; the weights and optimizer state are restored separately.

        Everything is checked before anything changes: a state that does not fit this
        sparsifier (keys, layers, active sets and their counts, step, method state) raises one
        ``ValueError`` naming what is wrong and leaves the sparsifier as it was. Also reads
        states of earlier versions, which held bool ``masks``."""
        step, active, ever, seed, method_state = self._checked_state(state)
        config = self.config()
        saved_config = state["config"]
        changed = sorted(str(k) for k, v in saved_config.items() if not _same(config.get(k), v))
        if changed:
            warnings.warn(f"{type(self).__name__}.load_state_dict: the saved run had other "
                          f"settings for {changed}; continuing with this sparsifier's settings"
                          + (", except the saved seed, which fixes every random choice of the "
                             "run" if "seed" in changed else ""), stacklevel=2)
        self.seed = seed
        for name, positions in active.items():
            self.backend.restore_active(name, positions)
        for name, positions in ever.items():
            self.backend.restore_ever_active(name, positions)
        self.step_count = step
        self.load_method_state(method_state)
        self._prepare_next_step()

    def _checked_state(self, state: Any):
        """``(step, active sets, ever active sets, seed, method state)`` of ``state``, or the
        ``ValueError`` that says what does not fit."""
        if not isinstance(state, Mapping):
            raise ValueError(f"not a sparsetrain sparsifier state_dict: a "
                             f"{type(state).__name__}; pass what state_dict() returned")
        keys = OLD_STATE_KEYS if state.get("masks") is not None else STATE_KEYS
        missing = [k for k in keys if k not in state]
        if missing:
            raise ValueError(f"not a sparsetrain sparsifier state_dict: it lacks {missing} (of "
                             f"the keys {list(keys)}); pass what state_dict() returned")
        if not isinstance(state["method"], str) or state["method"] != self.method_name:
            raise ValueError(f"the state_dict is of method {_brief(state['method'])}, but this "
                             f"sparsifier is {self.method_name!r}; load it into a sparsifier "
                             "of that method")
        step = state["step_count"]
        if not checks.is_int(step) or not 0 <= step <= self.total_steps:
            raise ValueError(f"the state_dict's step_count must be an integer in [0, "
                             f"{self.total_steps}] (total_steps of this sparsifier), got "
                             f"{_brief(step)}; load a state saved by a run of the same length")
        for key in ("masks", "positions", "ever_active", "config", "method_state"):
            if (key in keys or state.get(key) is not None) and not isinstance(state[key],
                                                                             Mapping):
                raise ValueError(f"the state_dict's {key!r} must be a dict, got "
                                 f"{_brief(state[key])}; pass what state_dict() returned")
        b = self.backend
        shapes = {n: b.shape(n) for n in b.names}
        active = validate_masks({**(state.get("masks") or {}), **(state.get("positions") or {})},
                                shapes, None)
        allowed = self.allowed_counts(int(step))
        for name, positions in active.items():
            (low, high), count = allowed[name], positions.numel()
            if not low <= count <= high:
                expected = f"exactly {low}" if low == high else f"between {low} and {high}"
                raise ValueError(
                    f"the state_dict's active set of {name!r} has {count} active weights, but "
                    f"this sparsifier holds {expected} there at step {step}; build the "
                    "sparsifier with the saved run's settings (density, distribution, "
                    "schedule, masks)")
        bounds = self.allowed_total(int(step))
        total = sum(p.numel() for p in active.values())
        if bounds is not None and not bounds[0] <= total <= bounds[1]:
            low, high = bounds
            expected = f"exactly {low}" if low == high else f"between {low} and {high}"
            raise ValueError(
                f"the state_dict's active sets hold {total} weights in all, but this sparsifier "
                f"holds {expected} at step {step}; build the sparsifier with the saved run's "
                "settings (density, distribution, schedule, masks)")
        check_conforms(self.structure, shapes, active, "the state_dict's positions",
                       self.empty_rows_allowed)
        ever = ({} if state.get("ever_active") is None
                else validate_masks(state["ever_active"], shapes, None, "ever_active"))
        seed = state["config"].get("seed", self.seed)
        if not checks.is_int(seed):
            raise ValueError(f"the state_dict's config['seed'] must be an integer, got "
                             f"{_brief(seed)}; pass the config that state_dict() saved")
        self.check_method_state(state["method_state"])
        return int(step), active, ever, int(seed), state["method_state"]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(density={self.density}, distribution="
                f"{self.distribution!r}, layers={len(self.backend.names)}, "
                f"backend={self.backend.name!r}, step={self.step_count}/{self.total_steps})")
