"""What a sparsifier covers: which weights it sparsifies, which stay dense and why.

A sparsifier's density is over the weights it sparsifies, not over the whole model. A weight can
stay dense because the user asked (``dense_layers``), because it is a position embedding (kept
dense by default), or because sparsetrain does not know its module type: the last is the one a
user does not expect, and :func:`check_coverage` warns when such weights hold more than
``UNEXPECTED_DENSE_LIMIT`` of the model's parameters.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from torch import nn

from .targets import Target, position_embeddings

#: Warn when weights of unsupported module types hold more than this fraction of the parameters.
UNEXPECTED_DENSE_LIMIT = 0.2


@dataclass
class Coverage:
    """Sizes, in parameters (tied ones once): ``sparsified`` by the sparsifier, ``total`` in the
    model, and the weight matrices kept ``dense`` (name -> (size, reason))."""

    sparsified: int
    total: int
    dense: dict[str, tuple[int, str]] = field(default_factory=dict)
    tied: dict[str, list[str]] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        """Fraction of the model's parameters that the sparsifier sparsifies."""
        return self.sparsified / self.total if self.total else 0.0

    @property
    def unexpected(self) -> int:
        """Parameters of weight matrices left dense because their module type is unsupported."""
        return sum(n for n, why in self.dense.values() if why.startswith("unsupported"))

    def line(self, density: float) -> str:
        """One line: what is sparsified at ``density``, and what stays dense and why."""
        text = (f"sparsifies {_count(self.sparsified)} of the model's {_count(self.total)} "
                f"parameters ({100 * self.fraction:.1f}%) at density {density:g} over them")
        if self.dense:
            largest = sorted(self.dense.items(), key=lambda kv: -kv[1][0])
            shown = [f"{n} ({_count(size)}, {why})" for n, (size, why) in largest[:6]]
            more = len(largest) - len(shown)
            text += "; kept dense: " + ", ".join(shown) + (f" and {more} more" if more else "")
        if self.tied:
            text += "; tied: " + ", ".join(f"{n} = {' = '.join(o)}" for n, o in self.tied.items())
        return text


def _count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def coverage(model: nn.Module, sparse: list[Target], dense: list[Target]) -> Coverage:
    """The coverage of a sparsifier of ``model`` that sparsifies ``sparse`` and keeps the
    sparsifiable ``dense`` dense (by ``dense_layers`` or as position embeddings)."""
    positional = position_embeddings(model)
    known = {id(t.param) for t in [*sparse, *dense]}
    result = Coverage(sum(t.numel for t in sparse), 0)
    owners: dict[int, str] = {}
    for path, module in model.named_modules():
        for attr, p in module.named_parameters(recurse=False):
            name = f"{path}.{attr}" if path else attr
            if id(p) in owners:  # a tied weight, reached again under another name
                result.tied.setdefault(owners[id(p)], []).append(name)
                continue
            owners[id(p)] = name
            result.total += p.numel()
            if p.dim() >= 2 and id(p) not in known:
                result.dense[name] = (p.numel(), f"unsupported module {type(module).__name__}")
    for t in dense:
        result.dense[t.name] = (t.numel, "position embedding" if id(t.param) in positional
                                else "dense_layers")
    return result


def check_coverage(cover: Coverage, owner: str) -> None:
    """Warn when unsupported module types leave much of the model dense."""
    if cover.total and cover.unexpected > UNEXPECTED_DENSE_LIMIT * cover.total:
        kinds = sorted({why.split(" ", 2)[2] for why in (w for _, w in cover.dense.values())
                        if why.startswith("unsupported")})
        warnings.warn(
            f"{owner}: {100 * cover.unexpected / cover.total:.0f}% of the model's parameters "
            f"stay dense because sparsetrain does not know their module types ({', '.join(kinds)})"
            "; declare them with sparsetrain.register_weight_layout(ModuleType, ('weight',), "
            "in_dim=...) to sparsify them", RuntimeWarning, stacklevel=4)
