"""Cannistraci-Hebb training (CHT) and its soft rule with a sigmoid density decay (CHTs, CHTss).

CHT: Zhang, Zhao, Wu, Muscoloni and Cannistraci, "Epitopological learning and Cannistraci-Hebb
network shape intelligence brain-inspired theory for ultra-sparse advantage in deep learning",
ICLR 2024; code biomedical-cybernetics/Cannistraci-Hebb-training (first release, ``sparse.py``
and ``CH_scores_mex.c``). CHTs/CHTss: Zhang et al., "Brain network science modelling of sparse
neural networks enables Transformers and LLMs to perform as fully connected", NeurIPS 2025;
code ``mlp_and_cnn/dst_scheduler.py`` of the same repository and
biomedical-cybernetics/Cannistraci-Hebb-Training-Soft-Rule- (``llm/dst_scheduler.py``).

Each sparse layer is a bipartite graph, rows (outputs) by columns (inputs; a convolution's
columns are its input-channel x kernel taps), its active weights the links. Every ``delta_t``
steps up to ``t_end`` (as for RigL; the drop fraction ``f(t)`` decays from ``alpha = 0.3``, the
code's zeta with ``--adaptive_zeta``, by a cosine), each layer:

1. removes links by weight magnitude, the negative and the positive weights apart (the ICLR
   code, ``sparse.py``; the later ``dst_scheduler.py`` ranks ``|W|`` over both signs): the
   ``floor(f(t) * n_neg)`` negative weights closest to zero and the ``floor(f(t) * n_pos)``
   smallest non-negative ones (ties by the seeded random order);
2. regrows as many links, gradient-free, at the unlinked pairs of the remaining graph with the
   largest CH3-L3 score (:mod:`sparsetrain.sparsity.link_prediction`: over the paths ``r - z2 -
   z1 - c``, the sum of ``1 / sqrt((1 + de(z1)) (1 + de(z2)))``, ``de`` the external degree in
   the pair's local community). A just-removed link may come back, as in the code. Ties,
   and the pairs without a path (score 0), go by the seeded random order. Grown weights start
   at zero with zero optimizer state (the code's default ``update_mode='zero'``);
3. early stop (the code's ``--early_stop``, threshold 0.9): a layer whose regrown links are for
   more than ``early_stop`` of them links it had just removed is marked; once every layer is
   marked the topology stops evolving.

Cost. An exact CH3-L3 of every unlinked pair costs one term per path of length 3, about
``rows * d**3`` (3.5e10 at density 0.05 of a 4096 x 4096 layer; ``l3_paths``). Up to
``exact_paths`` paths (default ``2**28``) every unlinked pair is scored exactly. Beyond, the
candidates are a deterministic sample: the ``candidates * n_grow`` unlinked pairs (default
``candidates = 4``) with the largest L3 index (Kovacs et al. 2019: the same paths weighted by
``1 / sqrt(deg(z1) deg(z2))``, computed on the sparse adjacency in ``rows * nnz``), ties by the
random order; those are scored exactly and the best ``n_grow`` of them grow. On 1024 x 1024
test graphs (random, scale-free and with communities, density 0.01 to 0.1, 5% or 30% of the
links to regrow) this grew 99.2-100% of the links the exact rule grows (at density 0.05: 100%,
``benchmarks/results/cht_update.md``). The link
prediction's work is not counted in ``training_flops`` (``3 f_S`` per step, as for SET);
``benchmarks/cht_update.py`` reports its time against RigL's update.

CHTs (``soft=True``): removal keeps ``n - floor(f(t) n)`` links sampled without replacement
with probability proportional to ``|w|**T``, ``T`` rising linearly from 1 at step 0 to
``temperature`` (default 3, the MLP code's ``1 + 2 t / T_end``) at ``t_end``, and regrowth
samples ``n_grow`` candidates with probability proportional to their CH3-L3 score (pairs
without a path come last, in the random order). Sampling is by Gumbel keys drawn from the
seeded order (the same distribution as sequential multinomial draws).
CHTss (``initial_density``): the density of every layer decays from ``max(initial_density,
d_l)`` to its final ``d_l`` on the authors' normalised sigmoid ``s(p) = (sigma(12 (p - 1/2)) -
sigma(-6)) / (sigma(6) - sigma(-6))`` (their ``s_shape`` with ``k = 6`` per half window), ``p``
the fraction of the updates done (the last update at or before ``t_end`` reaches ``d_l``): each
update first keeps the ``active_count(N_l, d_l(p))`` largest ``|W|`` (the code's magnitude
pruning), then removes and regrows as above. The count then shrinks (``fixed_budget = False``,
backend capability ``variable_count``); early stop is off by default and, when set, stops only
the removal and regrowth.

Where this differs from the authors' code: the topology changes every ``delta_t`` steps up to
``t_end`` as for the library's other methods (the code: every epoch until the end, with early
stop), and an update step also applies the optimizer step (as SET). The counts are exact: the
code grows every pair tied at its threshold, and none of score 0 (fewer than it removed);
here exactly as many grow as were removed, ties and pairs without a path by the random order
(CHTs' code instead adds 1e-5 to every score when too few are positive). A weight of exactly
zero counts as non-negative (the code removes all of them). Scores are computed on the CPU, in
integers (:mod:`~sparsetrain.sparsity.link_prediction`).

Not implemented (the method sees weights only): correlated sparse topological initialisation
(needs input data; pass ``masks=``), sparse weight initialisation (the model's initialisation is
its own; the paper draws ``N(0, 2 / (density * fan_in))``), active neuron percolation (chain
removal across consecutive layers: the method does not know which layer feeds which), the
bipartite receptive-field initialisation of CHTs and its node-based CH2-L3n approximation.
Unstructured sparsity only.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .. import checks
from ..backends.base import VARIABLE_COUNT
from ..flops import sparse_training_flops
from ..sparsity import link_prediction as lp
from ..sparsity.distributions import check_density, densities_for_shapes
from ..sparsity.masks import active_count
from ..sparsity.permutation import DROP, GROW, RandomOrder
from ..sparsity.positions import contains, merge_sorted
from ..sparsity.selection import RunningTopK, top_k
from .dst import DynamicSparsifier
from .registry import register_method
from .scores import finite
from .update import warn_not_finite

#: Pairs whose scores are computed at once.
BLOCK = 1 << 20
#: Slope of the sigmoid density decay over the whole decay window.
STEEPNESS = 12.0


def sigmoid_progress(p: float) -> float:
    """The authors' normalised sigmoid: 0 at ``p = 0``, 1 at ``p = 1``."""
    def s(x):
        return 1.0 / (1.0 + math.exp(-x))

    low, high = s(-STEEPNESS / 2), s(STEEPNESS / 2)
    return (s(STEEPNESS * (min(max(p, 0.0), 1.0) - 0.5)) - low) / (high - low)


@register_method("cht")
class CHT(DynamicSparsifier):
    """Cannistraci-Hebb training; ``soft=True`` for the CHTs rule, ``initial_density`` for the
    CHTss density decay. Options beyond :class:`~sparsetrain.DynamicSparsifier`'s: ``soft``,
    ``initial_density`` (None: a fixed count), ``temperature`` (soft removal's final exponent),
    ``early_stop`` (overlap threshold in (0, 1], False for none; default 0.9 for CHT, none for
    CHTs/CHTss), ``exact_paths`` and ``candidates`` (the cost bound, see the module). A removed
    link may always be regrown by the same update (``allow_regrowth`` is not an option)."""

    updates_topology = True
    structures = frozenset({"unstructured"})

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, density: float,
                 total_steps: int, distribution: str | Mapping[str, float] = "erk",
                 delta_t: int = 100, alpha: float = 0.3, drop_fraction_decay: str = "cosine",
                 t_end: int | None = None, dense_layers: Iterable[str] | str = (),
                 masks: Mapping[str, torch.Tensor] | None = None, seed: int = 0,
                 backend: str = "masked", t_start: int = 0, erk_power_scale: float = 1.0,
                 optimizer_step_on_update: bool | None = None, sparsify_embeddings: bool = False,
                 structure: str | None = None, soft: bool = False,
                 initial_density: float | None = None, temperature: float = 3.0,
                 early_stop: float | bool | None = None, exact_paths: int = 2 ** 28,
                 candidates: float = 4.0):
        if not isinstance(soft, bool):
            raise ValueError(f"soft must be True or False, got {checks.shown(soft)}")
        self.soft = soft
        final = check_density(density)
        self.initial_density = (None if initial_density is None
                                else check_density(initial_density, "initial_density"))
        if self.initial_density is not None and self.initial_density <= final:
            raise ValueError(f"initial_density ({initial_density!r}) must be above density "
                             f"({density!r}): the sigmoid decay goes down to density; pass "
                             "initial_density=None for a fixed number of weights")
        self.temperature = checks.real_in_range(temperature, "temperature", 0.0, math.inf,
                                                low_open=True, meaning="the soft removal's "
                                                "final exponent of |W|")
        if early_stop is None:
            early_stop = 0.9 if not soft and self.initial_density is None else False
        if early_stop is not False:
            early_stop = checks.real_in_range(
                early_stop, "early_stop", 0.0, 1.0, low_open=True,
                meaning="the share of regrown links that were just removed",
                fix="give a threshold such as 0.9, or early_stop=False")
        self.early_stop = early_stop
        self.exact_paths = checks.non_negative_int(exact_paths, "exact_paths")
        self.candidates = checks.real_in_range(candidates, "candidates", 1.0, math.inf,
                                               meaning="candidates scored per grown link")
        if self.initial_density is not None:
            steps = checks.positive_int(total_steps, "total_steps")
            end = int(0.75 * steps) if t_end is None else checks.positive_int(t_end, "t_end")
            first = (checks.non_negative_int(t_start, "t_start")
                     + checks.positive_int(delta_t, "delta_t"))
            if first > end:
                raise ValueError(f"the density decay needs an update at or before t_end ({end}), "
                                 f"but the first comes at step {first}; lower delta_t or t_start")
            self.fixed_budget = False  # the count shrinks on the decay
            self.requires = frozenset({VARIABLE_COUNT})
        super().__init__(model, optimizer, density=density, total_steps=total_steps,
                         distribution=distribution, delta_t=delta_t, alpha=alpha,
                         drop_fraction_decay=drop_fraction_decay, t_end=t_end,
                         dense_layers=dense_layers, masks=masks, seed=seed, backend=backend,
                         t_start=t_start, erk_power_scale=erk_power_scale, allow_regrowth=True,
                         optimizer_step_on_update=optimizer_step_on_update,
                         sparsify_embeddings=sparsify_embeddings, structure=structure)

    # --- counts and state -----------------------------------------------------------------
    def initial_densities(self, final: Mapping[str, float]) -> Mapping[str, float]:
        self._final_density = dict(final)
        start = self.initial_density or 0.0
        self._initial_density = {n: max(start, d) for n, d in final.items()}
        return self._initial_density

    def init_method_state(self) -> None:
        b = self.backend
        self._numels = {n: b.numel(n) for n in b.names}
        if not hasattr(self, "_final_density"):  # built with masks: the distribution's
            shapes = {n: b.shape(n) for n in b.names}
            self._final_density = densities_for_shapes(shapes, self.density, self.distribution,
                                                       erk_power_scale=self.erk_power_scale)
        self._initial_counts = dict(self._start_counts)
        if not hasattr(self, "_initial_density"):  # built with masks: theirs
            self._initial_density = {n: c / self._numels[n]
                                     for n, c in self._initial_counts.items()}
        self._final_counts = {n: min(self._initial_counts[n], active_count(self._numels[n], d))
                              for n, d in self._final_density.items()}
        self._signals = {n: False for n in b.names}
        self._stopped_at = 0

    def _updates(self, t: int) -> tuple[int, int]:
        """(updates done by step ``t``, updates in all)."""
        total = max(0, (self.t_end - self.t_start) // self.delta_t)
        return min(total, max(0, (t - self.t_start) // self.delta_t)), total

    def target_counts(self, t: int) -> dict[str, int]:
        """The active weights of every layer after step ``t`` on the density decay (its
        initial counts without one)."""
        done, total = self._updates(t)
        if self.initial_density is None or done == 0:
            return dict(self._initial_counts)
        left = 1.0 - sigmoid_progress(done / total)
        counts = {}
        for name, final in self._final_density.items():
            density = final + (self._initial_density[name] - final) * left
            count = active_count(self._numels[name], density)
            counts[name] = min(max(count, self._final_counts[name]), self._initial_counts[name])
        return counts

    def scheduled_counts(self, t: int) -> dict[str, int]:
        return self.target_counts(t)

    def allowed_counts(self, t: int) -> dict[str, tuple[int, int]]:
        low = self.target_counts(t)  # an update skipped on non-finite weights keeps more
        return {n: (low[n], self._initial_counts[n]) for n in self.backend.names}

    def is_update_step(self, t: int) -> bool:
        if not super().is_update_step(t):
            return False  # after an early stop only the decay's pruning goes on
        return not self._stopped_at or t <= self._stopped_at or self.initial_density is not None

    def method_state(self) -> dict[str, Any]:
        return {"early_stop_signals": dict(self._signals), "stopped_at": self._stopped_at}

    def check_method_state(self, state: Mapping[str, Any]) -> None:
        signals = state.get("early_stop_signals") if isinstance(state, Mapping) else None
        stopped = state.get("stopped_at") if isinstance(state, Mapping) else None
        if (not isinstance(signals, Mapping) or set(signals) != set(self._signals)
                or not all(isinstance(v, bool) for v in signals.values())):
            raise ValueError("the state_dict's method_state['early_stop_signals'] must map "
                             f"every layer {sorted(self._signals)} to True or False; pass what "
                             "state_dict() returned")
        if not checks.is_int(stopped) or not 0 <= stopped <= self.total_steps:
            raise ValueError("the state_dict's method_state['stopped_at'] must be a step in "
                             f"[0, {self.total_steps}], got {checks.shown(stopped)}; pass what "
                             "state_dict() returned")

    def load_method_state(self, state: Mapping[str, Any]) -> None:
        self._signals = {n: bool(v) for n, v in state["early_stop_signals"].items()}
        self._stopped_at = int(state["stopped_at"])

    def config(self) -> dict[str, Any]:
        return {**super().config(), "soft": self.soft, "initial_density": self.initial_density,
                "temperature": self.temperature, "early_stop": self.early_stop,
                "exact_paths": self.exact_paths, "candidates": self.candidates}

    @classmethod
    def training_flops(cls, f_dense: float, f_sparse: float, *, delta_t: int = 100) -> float:
        """``3 f_S``: the updates read no gradient; the link prediction is not counted."""
        return sparse_training_flops(f_sparse)

    # --- the update -----------------------------------------------------------------------
    def update_topology(self, t: int) -> None:
        fraction = self.drop_fraction(t)
        evolve = not self._stopped_at
        targets = self.target_counts(t)
        for name in self.backend.names:
            overlap = self._update_layer(name, t, fraction, targets[name], evolve)
            if self.early_stop is not False and overlap is not None:
                self._signals[name] |= overlap > self.early_stop
        if evolve and self.early_stop is not False and all(self._signals.values()):
            self._stopped_at = t

    def _uniform_keys(self, name: str, purpose: int, t: int,
                      positions: torch.Tensor) -> torch.Tensor:
        """Gumbel noise of ``positions`` (float64), from the seeded order of ``purpose``."""
        numel = self.backend.numel(name)
        order = RandomOrder(numel, self.seed, purpose, t, self._index[name], 1)
        u = (order.rank(positions).double() + 0.5) / numel
        return -torch.log(-torch.log(u))

    def _update_layer(self, name: str, t: int, fraction: float, target: int,
                      evolve: bool) -> float | None:
        """Prune ``name`` to ``target``, then remove and regrow; the share of the regrown links
        that were active before (None where nothing grew)."""
        b = self.backend
        active, values = b.active_positions(name), b.active_values(name)
        if not finite(values):
            warn_not_finite(self, name, t)
            return None
        order = self.order(name, DROP, t)
        index = torch.arange(active.numel(), device=active.device)
        if target < active.numel():  # the decay's pruning: the largest |W|
            index = index[top_k(values.abs(), target, lambda i: order.rank(active[i]))]
        kept = index
        n_grow = 0
        if evolve:
            kept, n_grow = self._removal(name, active, values, index, fraction, t)
        kept = active[kept]
        grown = self._grow(name, kept, n_grow, t) if n_grow else kept[:0]
        if kept.numel() + grown.numel() != active.numel() or n_grow:
            b.set_active(name, merge_sorted(kept, grown.to(kept.device))[0])
        if not n_grow:
            return None
        return float(contains(active, grown.to(active.device)).sum()) / n_grow

    def _removal(self, name: str, active: torch.Tensor, values: torch.Tensor,
                 index: torch.Tensor, fraction: float, t: int) -> tuple[torch.Tensor, int]:
        """(sorted indices into ``active`` of the links kept among ``index``, links removed)."""
        order = self.order(name, DROP, t)
        v = values[index]
        if self.soft:  # keep n - floor(f n), drawn with probability ~ |w| ** T
            n_drop = math.floor(fraction * index.numel())
            power = 1.0 + (self.temperature - 1.0) * min(1.0, max(0.0, t / self.t_end))
            keys = power * torch.log(v.abs().double())
            keys += self._uniform_keys(name, DROP, t, active[index]).to(keys.device)
            chosen = top_k(keys, index.numel() - n_drop, lambda i: order.rank(active[index[i]]))
            return index[chosen], n_drop
        kept, n_drop = [], 0
        for part in ((v < 0).nonzero().squeeze(1), (v >= 0).nonzero().squeeze(1)):
            drop = math.floor(fraction * part.numel())
            chosen = top_k(v[part].abs(), part.numel() - drop,
                           lambda i, part=part: order.rank(active[index[part[i]]]))
            kept.append(index[part[chosen]])
            n_drop += drop
        return merge_sorted(kept[0], kept[1])[0], n_drop

    def _grow(self, name: str, kept: torch.Tensor, n_grow: int, t: int) -> torch.Tensor:
        """The ``n_grow`` unlinked positions of the graph ``kept`` to grow (sorted, CPU)."""
        kept = kept.cpu()
        numel = self.backend.numel(name)
        graph = lp.bipartite_graph(kept, self.backend.shape(name))
        cc, (g, _) = lp.common_columns(graph), lp.score_table(graph)
        free = numel - kept.numel()
        wanted = min(free, math.ceil(self.candidates * n_grow))
        grow_order = self.order(name, GROW, t)
        step = max(1, BLOCK // graph.cols)
        if wanted >= free or lp.l3_paths(graph) <= self.exact_paths:
            chunks = (self._scored(graph, cc, g, self._free_in(kept, r0, r1, graph.cols))
                      for r0 in range(0, graph.rows, step)
                      for r1 in [min(graph.rows, r0 + step)])
        else:  # the candidates with the largest L3 index, scored exactly
            running = RunningTopK(wanted, grow_order.rank)
            wr, wc = lp.l3_weights(graph)
            for r0, r1, block in lp.l3_rows(graph, wr, wc, step):
                lo, hi = r0 * graph.cols, r1 * graph.cols
                a, z = torch.searchsorted(kept, torch.tensor([lo, hi])).tolist()
                running.offer(block.view(-1).double(), lo, kept[a:z] - lo)
            chunks = [self._scored(graph, cc, g, running.result())]
        return self._best(name, chunks, n_grow, t)

    @staticmethod
    def _free_in(kept: torch.Tensor, r0: int, r1: int, cols: int) -> torch.Tensor:
        """The positions of rows ``r0 .. r1 - 1`` that are not in the sorted ``kept``."""
        lo, hi = r0 * cols, r1 * cols
        a, z = torch.searchsorted(kept, torch.tensor([lo, hi])).tolist()
        free = torch.ones(hi - lo, dtype=torch.bool)
        free[kept[a:z] - lo] = False
        return free.nonzero().squeeze(1) + lo

    @staticmethod
    def _scored(graph, cc, g, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return positions, lp.ch3_l3_pairs(graph, positions, cc, g).double()

    def _best(self, name: str, chunks, k: int, t: int) -> torch.Tensor:
        """The ``k`` best of the (sorted positions, scores) ``chunks``: the largest scores
        (``soft``: Gumbel keys ``log(score) + G``), ties by the random grow order."""
        order = self.order(name, GROW, t)
        held_at, held = torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.float64)
        for positions, scores in chunks:
            if self.soft:
                scores = torch.log(scores) + self._uniform_keys(name, GROW, t, positions)
            held_at, held = torch.cat([held_at, positions]), torch.cat([held, scores])
            if held.numel() >= 2 * k:
                best = top_k(held, k, lambda i, at=held_at: order.rank(at[i]))
                held_at, held = held_at[best], held[best]
        return held_at[top_k(held, k, lambda i: order.rank(held_at[i]))]
