"""SRigL (Lasby et al., ICLR 2024, "Dynamic Sparse Training with Structured Sparsity"): RigL
with a constant fan-in and dynamic neuron ablation.

Every output unit (row) of a sparse layer holds the same number of active weights. An update
drops the ``floor(f(t) * n_active)`` active weights of smallest magnitude over the layer and
regrows every row to the constant fan-in by ``|dense gradient|`` (the fan-in structure's rule,
:mod:`.structured`). Before that, neurons with too few *salient* weights are ablated, as in the
authors' code (calgaryml/condensed-sparsity): a weight is salient when it is among the
``n_active - n_drop`` largest ``|W|`` or among the ``n_drop`` largest ``|grad|`` of the layer;
a neuron with fewer than ``max(1, int(gamma_sal * k))`` salient weights (``k`` the layer's
constant fan-in at the start, ``gamma_sal = 0.3`` as for the paper's CNNs) is ablated: its
weights are dropped and it grows none. The threshold is lowered where it would leave fewer
neurons than the budget can fill (``ceil(budget / dense fan-in)``), and the last sparsified layer
(the classifier) is never ablated. The remaining neurons share the layer's budget ``B``: the fan-in
becomes ``B // A`` for ``A`` active neurons, so a layer holds between ``B - A + 1`` and ``B``
weights, and an ablated neuron comes back when its weights become salient again.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import checks
from ..backends.base import VARIABLE_COUNT
from ..sparsity.groups import group_counts, group_of, matrix_shape, top_per_group
from ..sparsity.permutation import DROP
from ..sparsity.positions import merge_sorted, union_sorted
from .dst import RigL
from .registry import register_method
from .structured import refill_groups
from .update import grow_largest, keep_largest, warn_if_blind, warn_not_finite


@register_method("srigl")
class SRigL(RigL):
    """RigL with constant fan-in and neuron ablation (SRigL); ``gamma_sal`` the fraction of the
    constant fan-in a neuron must keep salient (0 turns ablation off: then it is
    ``RigL(structure="fan-in")``, which also runs on ``backend="csr"``)."""

    empty_rows_allowed = True  # ablated neurons hold no weight
    structures = frozenset({"fan-in"})  # use st.RigL(structure=...) for the others
    requires = frozenset({VARIABLE_COUNT})  # with ablation (gamma_sal > 0)

    def __init__(self, model, optimizer, *, gamma_sal: float = 0.3, structure: str = "fan-in",
                 **kwargs):
        self.gamma_sal = checks.real_in_range(gamma_sal, "gamma_sal", 0.0, 1.0,
                                              meaning="the salient fraction a neuron keeps")
        # ablation changes a layer's count a little (B // A weights in each of A rows)
        if self.gamma_sal == 0:
            self.requires = frozenset()
        super().__init__(model, optimizer, structure=structure, **kwargs)

    def init_method_state(self) -> None:
        self.budget = {n: self.backend.n_active(n) for n in self.backend.names}

    def allowed_counts(self, t: int) -> dict[str, tuple[int, int]]:
        rows = {n: self.backend.shape(n)[0] for n in self.backend.names}
        return {n: (max(1, b - rows[n] + 1), b) for n, b in self.budget.items()}

    def scheduled_counts(self, t: int) -> dict[str, int] | None:
        """The budget where nothing is ablated; else None (B // A weights in each of A rows)."""
        return dict(self.budget) if self.gamma_sal == 0 else None

    def config(self) -> dict[str, Any]:
        return {**super().config(), "gamma_sal": self.gamma_sal}

    # --- the update -----------------------------------------------------------------------
    def ablated_neurons(self, name: str, kept: torch.Tensor, n_grow: int,
                        t: int) -> torch.Tensor | None:
        """Bool per row of ``name``: the neurons to ablate at this update, given the kept set;
        None where a score is not finite."""
        shape = self.backend.shape(name)
        rows, per_row = matrix_shape(shape)
        ablated = torch.zeros(rows, dtype=torch.bool)
        if self.gamma_sal == 0 or self._index[name] == len(self.backend.names) - 1:
            return ablated
        top_grad, _ = grow_largest(self, name, n_grow, kept.new_empty(0), t)
        if top_grad is None:
            return None
        salient = union_sorted(kept, top_grad.to(kept.device))
        counts = group_counts(self.structure, shape, salient).cpu()  # fan-in: per row
        threshold = max(1, int(self.gamma_sal * (self.budget[name] // rows)))
        keep_at_least = min(rows, math.ceil(self.budget[name] / per_row))
        # the keep_at_least-th most salient neuron is never ablated
        floor = int(torch.kthvalue(counts, rows - keep_at_least + 1).values)
        return counts < min(threshold, floor)

    def _update_layer(self, name: str, fraction: float, t: int):
        b = self.backend
        active = b.active_positions(name)
        rows, per_row = matrix_shape(b.shape(name))
        n_drop = math.floor(fraction * active.numel())
        if n_drop == 0:
            return None
        kept = keep_largest(self, name, active.numel() - n_drop, t, active)
        ablated = None if kept is None else self.ablated_neurons(name, kept, n_drop, t)
        if ablated is None:
            warn_not_finite(self, name, t)
            return None
        fan_in = min(per_row, self.budget[name] // int(rows - ablated.sum()))
        kept = self._within_rows(name, kept, ablated, fan_in, t)
        grown, best = refill_groups(self, name, kept, fan_in, kept, active, t, ablated)
        if grown is None:
            warn_not_finite(self, name, t)
            return None
        b.set_active(name, merge_sorted(kept, grown.to(kept.device))[0])
        return best

    def _within_rows(self, name: str, kept: torch.Tensor, ablated: torch.Tensor, fan_in: int,
                     t: int) -> torch.Tensor:
        """``kept`` without the ablated rows' weights, and at most ``fan_in`` (the largest drop
        scores) in every other row."""
        rows, _ = matrix_shape(self.backend.shape(name))
        row = group_of(self.structure, self.backend.shape(name), kept)  # fan-in: the row
        kept, row = kept[~ablated.to(kept.device)[row]], row[~ablated.to(kept.device)[row]]
        counts = torch.bincount(row.cpu(), minlength=rows)
        if int(counts.max()) <= fan_in:
            return kept
        active = self.backend.active_positions(name)
        scores = self.drop_scores(name).to(torch.float64)[torch.searchsorted(active, kept)]
        start = torch.cumsum(counts, 0) - counts
        column = torch.arange(kept.numel()) - start[row.cpu()]  # rank within the row, by position
        table = torch.full((rows, int(counts.max())), -math.inf, dtype=torch.float64)
        table[row.cpu(), column] = scores.cpu()
        at = torch.full_like(table, -1, dtype=torch.int64)
        at[row.cpu(), column] = kept.cpu()
        order = self.order(name, DROP, t)
        chosen = top_per_group(table, counts.clamp(max=fan_in), lambda r, c: order.rank(at[r, c]))
        return torch.sort(at[chosen]).values.to(kept.device)

    def update_topology(self, t: int) -> None:
        fraction = self.drop_fraction(t)
        best = [self._update_layer(name, fraction, t) for name in self.backend.names]
        warn_if_blind(self, best, t)
