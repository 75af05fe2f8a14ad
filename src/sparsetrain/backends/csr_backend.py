"""The CSR backend: eligible Linear layers become ``CSRLinear``, updated in their compact form.

``backend="csr"`` on a sparsifier converts, in place, every sparsified ``nn.Linear`` of the model
into a :class:`~sparsetrain.backends.csr.CSRLinear` and hands the optimizer the layer's values
parameter in place of the dense weight (with its optimizer state, gathered at the active
positions). Other sparsified weights (convolutions, embeddings, ...) stay on the masked backend.

Topology updates of a CSR layer never build a dense tensor of the layer's size:

- drop: the ``n_drop`` values of smallest magnitude (a top-k over the values);
- grow, random (SET): positions drawn uniformly among those not kept, by rejection sampling;
- grow, gradient (RigL): the dense gradient ``grad_y^T x`` of the update step is computed from
  the layer's saved input and output gradient in blocks of rows, keeping a running top-k of the
  candidates, so the extra memory is one block (about twice the layer's non-zeros, between
  ``MIN_BLOCK_ELEMENTS`` and ``BLOCK_ELEMENTS``) and not ``out * in``.

Kept weights carry their values and optimizer state to their new places in the values vector;
grown weights start at zero with zero optimizer state. The number of values never changes, so
the values parameter and its state tensors are updated in place.

Layers built on the ``meta`` device (``with torch.device("meta"): model = ...``) are
materialised with only their active weights, drawn as ``nn.Linear`` draws its initial weights:
that is how a layer too large to exist densely (the RigL paper's "Big-Sparse" regime) is made.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from ..sparsity.targets import Target
from .csr import CSRLinear, _default_init, compiled_kernels
from .masked import MaskedBackend

#: Bounds of the dense block (in elements) the gradient-based grow step materialises at once:
#: twice the layer's non-zeros, within these bounds, so the extra memory stays in proportion
#: to what the layer holds anyway and the products stay large enough to run fast.
MIN_BLOCK_ELEMENTS = 1 << 20
BLOCK_ELEMENTS = 1 << 23


# --- optimizer state ------------------------------------------------------------------------
def _swap_param(optimizer: torch.optim.Optimizer | None, old: torch.Tensor, new: torch.Tensor,
                convert: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Put ``new`` where ``old`` was in the optimizer, its state tensors of ``old``'s shape
    passed through ``convert`` (other state, e.g. Adam's step, is kept as it is)."""
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if p is old:
                group["params"][i] = new
    state = optimizer.state.pop(old, None)
    if state:
        optimizer.state[new] = {
            k: convert(v) if torch.is_tensor(v) and v.shape == old.shape else v
            for k, v in state.items()
        }


def _remap_state(optimizer, param: torch.Tensor, source: torch.Tensor,
                 target: torch.Tensor) -> None:
    """In place: ``param`` and its state become zero except ``[target] = old[source]``."""
    tensors = [param.data] + [v for v in optimizer.state.get(param, {}).values()
                              if torch.is_tensor(v) and v.shape == param.shape]
    for t in tensors:
        moved = t[source].clone()
        t.zero_()
        t[target] = moved


# --- where the Linear layers are ------------------------------------------------------------
def _parents(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(module) -> every (parent, attribute) through which it is reached."""
    found: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for attr, child in parent.named_children():
            found.setdefault(id(child), []).append((parent, attr))
    return found


def eligible_linears(model: nn.Module, names: Iterable[str]) -> dict[str, tuple[nn.Module, str]]:
    """Weight name -> (parent, attribute) for the weights in ``names`` that a CSR layer can
    hold: the ``weight`` of a plain ``nn.Linear`` reached through one parent, its weight not
    shared with another module, with no hooks or parametrizations on the layer."""
    names = set(names)
    parents = _parents(model)
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    result = {}
    for path, module in model.named_modules():
        name = f"{path}.weight" if path else "weight"
        if name not in names or type(module) is not nn.Linear:
            continue
        if len(parents.get(id(module), [])) != 1 or owners.get(id(module.weight), 0) != 1:
            continue
        if (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "parametrizations", None) is not None):
            continue
        result[name] = parents[id(module)][0]
    return result


# --- random positions ------------------------------------------------------------------------
def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _collective_device(tensor: torch.Tensor) -> torch.device:
    import torch.distributed as dist

    return torch.device("cpu") if dist.get_backend() == "gloo" else tensor.device


def _gather_batches(x: torch.Tensor, g_t: torch.Tensor):
    """``x`` (batch, in) and ``g_t`` (out, batch) of every rank, joined along the batch, with
    the gradient divided by the number of ranks (DDP averages the ranks' gradients). Batches
    of different sizes are padded with zeros, which add nothing to ``g_t @ x``."""
    import torch.distributed as dist

    world = dist.get_world_size()
    device = _collective_device(x)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=device))
    largest = max(int(n) for n in sizes)
    padded_x = torch.zeros(largest, x.shape[1], dtype=x.dtype, device=device)
    padded_x[:x.shape[0]] = x
    padded_g = torch.zeros(largest, g_t.shape[0], dtype=g_t.dtype, device=device)
    padded_g[:x.shape[0]] = g_t.t()
    xs = [torch.empty_like(padded_x) for _ in range(world)]
    gs = [torch.empty_like(padded_g) for _ in range(world)]
    dist.all_gather(xs, padded_x)
    dist.all_gather(gs, padded_g)
    x_all = torch.cat(xs).to(x.device)
    g_all = (torch.cat(gs).t() / world).contiguous().to(x.device)
    return x_all, g_all


def _contains(sorted_values: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    if sorted_values.numel() == 0:
        return torch.zeros_like(queries, dtype=torch.bool)
    where = torch.searchsorted(sorted_values, queries).clamp_(max=sorted_values.numel() - 1)
    return sorted_values[where] == queries


def _first_occurrences(draw: torch.Tensor) -> torch.Tensor:
    """The distinct entries of ``draw`` in the order they first appear."""
    unique, inverse = torch.unique(draw, return_inverse=True)
    first = torch.full((unique.numel(),), draw.numel(), dtype=torch.int64)
    first.scatter_reduce_(0, inverse, torch.arange(draw.numel()), reduce="amin")
    return unique[torch.argsort(first)]


def random_positions(numel: int, n: int, generator: torch.Generator,
                     exclude: torch.Tensor | None = None) -> torch.Tensor:
    """``n`` distinct flat positions in ``range(numel)``, not in the sorted ``exclude``, drawn
    uniformly from ``generator``; returned sorted. Memory is O(n), not O(numel)."""
    exclude = torch.empty(0, dtype=torch.int64) if exclude is None else exclude.cpu()
    free = numel - exclude.numel()
    if n > free:
        raise ValueError(f"cannot choose {n} of the {free} free positions")
    if n == 0:
        return torch.empty(0, dtype=torch.int64)
    if free <= 4 * n:  # dense enough to list the free positions
        if numel > 1 << 28:
            raise ValueError(f"a layer of {numel} weights is too large to fill to density "
                             f"{(numel - free + n) / numel:.3g} on the CSR backend")
        candidates = torch.ones(numel, dtype=torch.bool)
        candidates[exclude] = False
        candidates = candidates.nonzero().squeeze(1)
        return torch.sort(candidates[torch.randperm(free, generator=generator)[:n]]).values
    chosen = torch.empty(0, dtype=torch.int64)
    while chosen.numel() < n:
        need = n - chosen.numel()
        draw = torch.randint(numel, (int(need * 1.25 * numel / free) + 64,), generator=generator)
        draw = _first_occurrences(draw)
        taken = torch.sort(chosen).values
        draw = draw[~_contains(exclude, draw) & ~_contains(taken, draw)]
        chosen = torch.cat([chosen, draw[:need]])
    return torch.sort(chosen).values


#: Entries of the sample from which a lower bound of the k-th largest score is estimated.
SAMPLE = 1 << 16


def _lower_bound_of_kth(scores: torch.Tensor, k: int) -> torch.Tensor:
    """A score ``t`` with at least ``k`` entries ``>= t``, close to the k-th largest: read off
    an evenly spaced sample with a safety margin (and checked; the exact k-th largest where the
    sample misleads), so that only about ``k`` entries go on to an exact selection."""
    n = scores.numel()
    if n > 8 * SAMPLE:
        sample = scores[::n // SAMPLE]
        p = k / n  # the share above the k-th largest; the sample's quantile is off by about
        margin = 0.05 * p + 4 * (p * (1 - p) / sample.numel()) ** 0.5  # sqrt(p(1-p)/m)
        rank = int(sample.numel() * max(0.0, 1 - p - margin))
        if rank >= 1:
            t = torch.kthvalue(sample, rank).values
            if int((scores >= t).sum()) >= k:
                return t
    return torch.kthvalue(scores, n - k + 1).values


def _top_k_lowest_first(scores: torch.Tensor, positions: torch.Tensor, k: int):
    """The ``k`` entries of largest score (the lower position first among equal scores), in
    O(n): the k-th largest score is found by selection, not by sorting everything."""
    n = scores.numel()
    if n <= k:
        return scores, positions
    if n > 8 * SAMPLE:  # an exact selection among the few above a lower bound of the k-th
        keep = (scores >= _lower_bound_of_kth(scores, k)).nonzero().squeeze(1)
        if keep.numel() < n:
            return _top_k_lowest_first(scores[keep], positions[keep], k)
    kth = torch.kthvalue(scores, n - k + 1).values
    above = (scores > kth).nonzero().squeeze(1)
    ties = (scores == kth).nonzero().squeeze(1)
    ties = ties[torch.argsort(positions[ties])[:k - above.numel()]]
    keep = torch.cat([above, ties])
    return scores[keep], positions[keep]


def _smallest(values: torch.Tensor, n: int) -> torch.Tensor:
    """Bool mask of the ``n`` smallest ``values`` (the lower index first among equal ones)."""
    threshold = torch.kthvalue(values, n).values
    chosen = values < threshold
    ties = (values == threshold).nonzero().squeeze(1)[:n - int(chosen.sum())]
    chosen[ties] = True
    return chosen


def _merge_sorted(a: torch.Tensor, b: torch.Tensor):
    """The union of the sorted, disjoint ``a`` and ``b``, sorted, and where the entries of
    ``a`` and of ``b`` are in it; by binary search, without sorting the union."""
    b_at = torch.searchsorted(a, b) + torch.arange(b.numel(), device=b.device)
    from_b = torch.zeros(a.numel() + b.numel(), dtype=torch.bool, device=a.device)
    from_b[b_at] = True
    merged = torch.empty(a.numel() + b.numel(), dtype=a.dtype, device=a.device)
    merged[b_at] = b
    a_at = (~from_b).nonzero().squeeze(1)
    merged[a_at] = a
    return merged, a_at, b_at


# --- the backend ----------------------------------------------------------------------------
class _LazyMasks(Mapping):
    """name -> dense bool mask; CSR layers' masks are built on access (O(out * in) each)."""

    def __init__(self, backend: "CSRBackend"):
        self._backend = backend

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._backend.layers:
            return self._backend.layers[name].mask()
        return self._backend.masked.masks[name]

    def __setitem__(self, name: str, mask: torch.Tensor) -> None:
        self._backend.set_mask(name, mask)

    def __iter__(self) -> Iterator[str]:
        return iter(self._backend.names)

    def __len__(self) -> int:
        return len(self._backend.names)


class CSRBackend:
    """Sparsified ``nn.Linear`` weights as ``CSRLinear`` layers, the rest masked-dense.

    ``masks`` gives a mask for every sparsified weight (``None`` for a layer whose initial
    structure this backend draws itself from ``densities`` and ``generator``, without a dense
    mask). ``model`` is converted in place.
    """

    name = "csr"

    def __init__(self, targets: Iterable[Target], masks: Mapping[str, torch.Tensor] | None,
                 optimizer: torch.optim.Optimizer, *, model: nn.Module,
                 densities: Mapping[str, float] | None = None,
                 generator: torch.Generator | None = None):
        targets = list(targets)
        self.optimizer = optimizer
        self.names = [t.name for t in targets]
        self.shapes = {t.name: tuple(t.shape) for t in targets}
        where = eligible_linears(model, self.names)
        if not where:
            warnings.warn("backend='csr': no sparsified weight is a plain nn.Linear, so every "
                          "layer stays on the masked backend", RuntimeWarning, stacklevel=4)
        others = [t for t in targets if t.name not in where]
        meta = [t.name for t in others if t.param.is_meta]
        if meta:
            raise ValueError(f"the weights {meta} are on the meta device, and only nn.Linear "
                             "layers can be materialised by the CSR backend; build the other "
                             "layers on a real device")
        self.masked = MaskedBackend(
            others, None if masks is None else {t.name: masks[t.name] for t in others},
            optimizer, densities=densities, generator=generator)
        self.layers: dict[str, CSRLinear] = {}
        self.captures: dict[str, list] = {}
        for name, (parent, attr) in where.items():
            linear = getattr(parent, attr)
            mask = None if masks is None else masks.get(name)
            layer = self._convert(name, linear, mask, densities, generator)
            setattr(parent, attr, layer)
            self.layers[name] = layer
        self.masks = _LazyMasks(self)

    # --- conversion ---------------------------------------------------------------------
    def _convert(self, name, linear: nn.Linear, mask, densities, generator) -> CSRLinear:
        weight = linear.weight
        if mask is not None:
            mask = mask.to(device="cpu" if weight.is_meta else weight.device, dtype=torch.bool)
        if weight.is_meta:
            device = "cpu"
            if mask is None:
                positions = self._initial_positions(name, densities, generator)
            else:
                positions = mask.reshape(-1).nonzero().squeeze(1)
            gen = generator if generator is not None else torch.Generator().manual_seed(0)
            values = _default_init(gen, positions.numel(), weight.shape[1], weight.dtype, device)
            bias = None
            if linear.bias is not None:
                bias = nn.Parameter(_default_init(gen, weight.shape[0], weight.shape[1],
                                                  weight.dtype, device))
                _swap_param(self.optimizer, linear.bias, bias, lambda v: v)
            layer = CSRLinear.from_positions(positions, values, weight.shape, bias)
        else:
            if mask is None:
                positions = self._initial_positions(name, densities, generator).to(weight.device)
                mask = torch.zeros(weight.numel(), dtype=torch.bool, device=weight.device)
                mask[positions] = True
                mask = mask.view(weight.shape)
            layer = CSRLinear.from_linear(linear, mask)
        rows_cols = layer.rows(), layer.col
        _swap_param(self.optimizer, weight, layer.values,
                    lambda v: v[rows_cols[0], rows_cols[1]].clone())
        empty = layer.empty_rows()
        if empty:
            warnings.warn(f"backend='csr': {empty} of the {layer.out_features} output units of "
                          f"{name!r} have no active weight at its density and will output only "
                          "their bias; raise the density or use a denser distribution "
                          "(e.g. 'erk') if that is not intended", RuntimeWarning, stacklevel=5)
        return layer

    def _initial_positions(self, name, densities, generator) -> torch.Tensor:
        from ..sparsity.masks import active_count

        if densities is None or generator is None:
            raise ValueError(f"no mask and no density given for {name!r}")
        numel = math.prod(self.shapes[name])
        return random_positions(numel, active_count(numel, densities[name]), generator)

    # --- the interface the methods use ----------------------------------------------------
    @property
    def params(self) -> dict[str, torch.Tensor]:
        """The masked-dense parameters (the CSR layers' weights have no dense form)."""
        return self.masked.params

    def is_compact(self, name: str) -> bool:
        return name in self.layers

    def n_active(self, name: str) -> int:
        if name in self.layers:
            return self.layers[name].nnz
        return int(self.masked.masks[name].sum())

    def numel(self, name: str) -> int:
        return math.prod(self.shapes[name])

    def apply_masks(self) -> None:
        self.masked.apply_masks()

    def mask_weights(self) -> None:
        self.masked.mask_weights()

    def mask_gradients(self) -> None:
        self.masked.mask_gradients()

    def weight_magnitudes(self, name: str) -> torch.Tensor:
        if name in self.layers:
            return self.layers[name].dense_weight().abs()
        return self.masked.weight_magnitudes(name)

    def dense_gradient(self, name: str) -> torch.Tensor | None:
        if name not in self.layers:
            return self.masked.dense_gradient(name)
        pair = self.saved_gradient(name)
        return None if pair is None else pair[1] @ pair[0]

    def saved_gradient(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(x, grad_y^T)`` of the saved backward passes of CSR layer ``name``, with
        ``grad_y^T @ x`` the dense weight gradient: the passes are joined along the batch and,
        under torch.distributed, gathered from every rank and averaged as DDP averages."""
        captured = self.captures.get(name)
        if not captured:
            return None
        x = torch.cat([x for x, _ in captured]).contiguous()
        g_t = torch.cat([g for _, g in captured]).t().contiguous()
        if _world_size() > 1:
            x, g_t = _gather_batches(x, g_t)
        return x, g_t

    def replace_active(self, name: str, new_mask: torch.Tensor) -> torch.Tensor:
        if name not in self.layers:
            return self.masked.replace_active(name, new_mask)
        layer = self.layers[name]
        new_mask = new_mask.to(device=layer.values.device, dtype=torch.bool)
        grown = new_mask & ~layer.mask()
        self._move(layer, new_mask.reshape(-1).nonzero().squeeze(1))
        return grown

    def set_mask(self, name: str, mask: torch.Tensor) -> None:
        """Make ``mask`` the active set of ``name`` (restoring a saved state)."""
        if name not in self.layers:
            self.masked.set_mask(name, mask)
            return
        if tuple(mask.shape) != self.shapes[name] or int(mask.sum()) != self.layers[name].nnz:
            raise ValueError(f"a mask for {name!r} must have shape {self.shapes[name]} and "
                             f"{self.layers[name].nnz} active entries")
        self.replace_active(name, mask)

    def positions(self, name: str) -> torch.Tensor:
        """Sorted flat positions of the active weights of CSR layer ``name``."""
        return self.layers[name].positions()

    def set_positions(self, name: str, positions: torch.Tensor) -> None:
        """Make the sorted flat ``positions`` the active set of CSR layer ``name``."""
        layer = self.layers[name]
        if (not torch.is_tensor(positions) or positions.dim() != 1
                or positions.dtype != torch.int64 or positions.numel() != layer.nnz):
            raise ValueError(f"positions for {name!r} must be a 1-D int64 tensor of "
                             f"{layer.nnz} entries")
        positions = positions.to(layer.values.device)
        if positions.numel() and (bool((positions[1:] <= positions[:-1]).any())
                                  or int(positions[0]) < 0
                                  or int(positions[-1]) >= self.numel(name)):
            raise ValueError(f"positions for {name!r} must be increasing and inside "
                             f"[0, {self.numel(name)})")
        self._move(layer, positions)

    # --- compact topology updates ---------------------------------------------------------
    def prepare_step(self, capture: bool) -> None:
        """Keep (or stop keeping) each CSR layer's input and output gradient for the next
        backward passes, which an update that grows by gradient reads."""
        for name, layer in self.layers.items():
            if capture:
                self.captures[name] = layer.capture = []
            else:
                layer.capture = None
                self.captures.pop(name, None)

    def finite(self, name: str) -> bool:
        """Whether the layer's values and saved gradients are all finite (on every rank)."""
        layer = self.layers[name]
        tensors = [layer.values.detach()] + [t for pair in self.captures.get(name, [])
                                             for t in pair]
        ok = all(bool(torch.isfinite(t).all()) for t in tensors)
        if _world_size() > 1:  # every rank must take the same branch
            import torch.distributed as dist

            flag = torch.tensor([int(ok)], device=_collective_device(layer.values))
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            ok = bool(flag.item())
        return ok

    @torch.no_grad()
    def compact_update(self, name: str, n_drop: int, grow: str, generator: torch.Generator,
                       allow_regrowth: bool = True) -> None:
        """Drop the ``n_drop`` smallest-magnitude values of CSR layer ``name`` and grow as many
        positions, at random (``grow="random"``) or by the largest ``|dense gradient|`` of the
        saved step (``grow="gradient"``; random when no gradient was saved)."""
        layer = self.layers[name]
        nnz, numel = layer.nnz, layer.out_features * layer.in_features
        n_drop = max(0, min(int(n_drop), nnz, numel - nnz))
        if n_drop == 0:
            return
        old = layer.positions()
        keep = ~_smallest(layer.values.detach().abs(), n_drop)
        kept = old[keep]  # still sorted
        closed = kept if allow_regrowth else old
        saved = self.saved_gradient(name) if grow == "gradient" else None
        if saved is not None:
            grown = self._grow_by_gradient(layer, saved, closed, n_drop)
        else:
            grown = random_positions(numel, n_drop, generator, closed.cpu()).to(old.device)
        grown = torch.sort(grown).values
        positions, kept_at, grown_at = _merge_sorted(kept, grown)
        # a weight dropped and grown back by this update keeps its value and state, as on the
        # masked backend: only positions that were not active before start at zero
        back = _contains(old, grown)
        source = torch.cat([keep.nonzero().squeeze(1), torch.searchsorted(old, grown[back])])
        target = torch.cat([kept_at, grown_at[back]])
        with torch.no_grad():
            _remap_state(self.optimizer, layer.values, source, target)
        layer.set_positions(positions)

    def _grow_by_gradient(self, layer: CSRLinear, saved, closed: torch.Tensor,
                          k: int) -> torch.Tensor:
        """The ``k`` positions outside the sorted ``closed`` with the largest
        ``|grad_y^T x|``, computed in blocks of rows with a running top-k; among equal scores
        the lower position wins."""
        out_features, in_features = layer.out_features, layer.in_features
        elements = min(BLOCK_ELEMENTS, max(MIN_BLOCK_ELEMENTS, 2 * layer.nnz))
        block = max(1, elements // max(1, in_features))
        device = closed.device
        best_scores = torch.empty(0, dtype=layer.values.dtype, device=device)
        best_positions = torch.empty(0, dtype=torch.int64, device=device)
        pending_scores, pending_positions, pending = [], [], 0
        threshold = -math.inf  # once k are chosen: the smallest chosen score
        kernels = compiled_kernels()
        x, g_t = saved  # x is (batch, in) contiguous: thin products run twice as fast on it
        # one buffer for every block: allocating and freeing a block-sized tensor thousands
        # of times fragments the C heap (its resident size grew to gigabytes on large layers)
        buffer = torch.empty(min(block, out_features), in_features, dtype=x.dtype,
                             device=device)
        for r0 in range(0, out_features, block):
            r1 = min(out_features, r0 + block)
            scores = buffer[:r1 - r0]
            torch.mm(g_t[r0:r1], x, out=scores)
            lo, hi = r0 * in_features, r1 * in_features
            a, b = torch.searchsorted(closed, torch.tensor([lo, hi], device=device))
            inside = closed[int(a):int(b)] - lo  # closed is sorted
            # a later position equal to the threshold loses to the chosen, lower one
            if threshold > -math.inf and kernels is not None and scores.device.type == "cpu":
                found, candidates = kernels.grow_candidates(scores.reshape(-1), threshold,
                                                            inside)
            else:
                scores = scores.abs_().reshape(-1)
                scores[inside] = -math.inf
                keep = scores > threshold
                if threshold == -math.inf and scores.numel() > k:  # at most k (+ ties) a block
                    keep &= scores >= _lower_bound_of_kth(scores, k)
                candidates = keep.nonzero().squeeze(1)
                found = scores[candidates]
            pending_scores.append(found)
            pending_positions.append(candidates + lo)
            pending += candidates.numel()
            if best_scores.numel() + pending >= 2 * k or r1 == out_features:
                best_scores, best_positions = _top_k_lowest_first(
                    torch.cat([best_scores, *pending_scores]),
                    torch.cat([best_positions, *pending_positions]), k)
                pending_scores, pending_positions, pending = [], [], 0
                if best_scores.numel() == k:
                    threshold = float(best_scores.min())
        return best_positions

    @torch.no_grad()
    def _move(self, layer: CSRLinear, positions: torch.Tensor) -> None:
        """Re-point ``layer`` at the sorted ``positions`` (as many as its values): values and
        optimizer state of positions it had move along, new positions start at zero."""
        old = layer.positions()
        where = torch.searchsorted(positions, old).clamp_(max=positions.numel() - 1)
        keep = positions[where] == old
        _remap_state(self.optimizer, layer.values, keep, where[keep])
        layer.set_positions(positions)


# --- conversion between the backends -------------------------------------------------------
def to_csr(model: nn.Module, masks: Mapping[str, torch.Tensor],
           optimizer: torch.optim.Optimizer | None = None) -> dict[str, CSRLinear]:
    """Convert, in place, every plain ``nn.Linear`` whose weight is in ``masks`` to a CSR
    layer holding the weights at its mask; the optimizer (if given) gets the values parameter
    with its state gathered at the active positions. Returns name -> new layer."""
    where = eligible_linears(model, masks)
    layers = {}
    for name, (parent, attr) in where.items():
        linear = getattr(parent, attr)
        layer = CSRLinear.from_linear(linear, masks[name])
        rows, cols = layer.rows(), layer.col
        _swap_param(optimizer, linear.weight, layer.values, lambda v: v[rows, cols].clone())
        setattr(parent, attr, layer)
        layers[name] = layer
    return layers


def to_masked(model: nn.Module, optimizer: torch.optim.Optimizer | None = None
              ) -> dict[str, torch.Tensor]:
    """Convert, in place, every ``CSRLinear`` of ``model`` back to an ``nn.Linear`` (zeros at
    inactive positions); the optimizer gets the dense weight with its state scattered back.
    Returns weight name -> mask, ready for ``masks=`` of a sparsifier on the masked backend."""
    masks = {}
    parents = _parents(model)
    for path, module in list(model.named_modules()):
        if not isinstance(module, CSRLinear):
            continue
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           device=module.values.device, dtype=module.values.dtype)
        with torch.no_grad():
            linear.weight.copy_(module.dense_weight())
        if module.bias is not None:
            linear.bias = module.bias
        rows, cols = module.rows(), module.col

        def scatter(v, rows=rows, cols=cols, shape=linear.weight.shape):
            dense = torch.zeros(shape, dtype=v.dtype, device=v.device)
            dense[rows, cols] = v
            return dense

        _swap_param(optimizer, module.values, linear.weight, scatter)
        for parent, attr in parents.get(id(module), []):
            setattr(parent, attr, linear)
        masks[f"{path}.weight" if path else "weight"] = module.mask()
    return masks
