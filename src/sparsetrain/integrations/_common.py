"""What the framework integrations share: building the sparsifier the user asked for once the
framework knows the optimizer and the number of steps, restoring it from a checkpoint into a
model whose weights the framework has already loaded, and the statistics they log.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..methods.base import Sparsifier
from ..methods.registry import get_method

#: ``factory(model, optimizer, total_steps) -> Sparsifier``
Factory = Callable[[nn.Module, torch.optim.Optimizer, int], Sparsifier]

#: Keys of the logged statistics.
DENSITY_KEY = "sparsity/density"
EVER_ACTIVE_KEY = "sparsity/ever_active"

_SUPPLIED = ("model", "optimizer", "total_steps")


def make_factory(method: str | Factory, kwargs: Mapping[str, Any]) -> Factory:
    """A factory from a method (a registered name such as ``"rigl"``, or a ``Sparsifier``
    class) and its keyword arguments, checked now so that a typo fails before training starts;
    or ``method`` itself when it is a factory ``(model, optimizer, total_steps) -> Sparsifier``."""
    is_class = isinstance(method, type) and issubclass(method, Sparsifier)
    if callable(method) and not isinstance(method, str) and not is_class:
        if kwargs:
            raise ValueError(f"with a factory for method, pass its settings to the factory, not "
                             f"here (got {sorted(kwargs)})")
        return method
    if not isinstance(method, str) and not is_class:
        raise ValueError(f"method must be a registered method name such as 'rigl', a Sparsifier "
                         f"class, or a function (model, optimizer, total_steps) -> Sparsifier; "
                         f"got {method!r}")
    cls = method if is_class else get_method(method)  # ValueError naming the methods
    supplied = sorted(k for k in kwargs if k in _SUPPLIED)
    if supplied:
        raise ValueError(f"do not pass {supplied}: the integration takes the model and optimizer "
                         "from the trainer, and total_steps from the trainer's number of "
                         "optimizer steps")
    try:
        inspect.signature(cls).bind(None, None, total_steps=1, **kwargs)
    except TypeError as exc:
        raise ValueError(f"invalid settings for {cls.__name__}: {exc}") from None
    if kwargs.get("backend", "masked") != "masked":
        raise ValueError(_BACKEND_ERROR.format(backend=kwargs["backend"]))
    settings = dict(kwargs)

    def factory(model: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int):
        return cls(model, optimizer, total_steps=total_steps, **settings)

    return factory


_BACKEND_ERROR = ("backend={backend!r} is not supported by the framework integrations: it "
                  "replaces layers of the model, which the framework's checkpoints cannot load "
                  "back into the model it builds; use backend='masked'")


def build(factory: Factory, model: nn.Module, optimizer: torch.optim.Optimizer,
          total_steps: int) -> Sparsifier:
    """``factory(model, optimizer, total_steps)``, checked to be a masked-backend sparsifier of
    that optimizer."""
    total_steps = int(total_steps)
    if total_steps < 1:
        raise ValueError(f"the trainer plans {total_steps} optimizer steps; set max_steps (or "
                         "the number of epochs and a dataset with a length)")
    sparsifier = factory(model, optimizer, total_steps)
    if not isinstance(sparsifier, Sparsifier):
        raise TypeError(f"the factory must return a sparsetrain Sparsifier, got "
                        f"{type(sparsifier).__name__}")
    if sparsifier.optimizer is not optimizer:
        raise ValueError("the factory built the sparsifier on another optimizer; build it on the "
                         "optimizer it is given")
    if sparsifier.backend.name != "masked":
        raise ValueError(_BACKEND_ERROR.format(backend=sparsifier.backend.name))
    return sparsifier


def restore(factory: Factory, model: nn.Module, optimizer: torch.optim.Optimizer,
            total_steps: int, state: Mapping[str, Any], where: str) -> Sparsifier:
    """Build the sparsifier and load its saved ``state`` into a model whose weights the
    framework loaded from the same checkpoint already.

    Building a sparsifier zeroes the weights outside its initial active sets, so the loaded
    weights are put back after the state is loaded (the order of ``sparsetrain``'s own runner:
    sparsifier, its state, then the weights). A checkpoint whose weights are non-zero outside
    the saved active sets comes from another run: ``ValueError``."""
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sparsifier = build(factory, model, optimizer, total_steps)
    sparsifier.load_state_dict(state)
    model.load_state_dict(weights)
    params = dict(model.named_parameters())
    stray = [n for n in sparsifier.names
             if bool(params[n].detach()[~sparsifier.masks[n]].ne(0).any())]
    if stray:
        raise ValueError(f"the weights loaded from {where} are non-zero outside the saved active "
                         f"sets of {stray}: the weights and the sparsifier state come from "
                         "different runs; resume from one checkpoint of one run")
    return sparsifier


def save_state(sparsifier: Sparsifier, path: str) -> None:
    """Write ``sparsifier.state_dict()`` to ``path`` (whole or not at all)."""
    partial = path + ".partial"
    torch.save(sparsifier.state_dict(), partial)
    os.replace(partial, path)


def load_state(path: str, what: str) -> dict[str, Any]:
    """The sparsifier state saved at ``path``; ``ValueError`` saying what to do if absent."""
    if not os.path.isfile(path):
        raise ValueError(f"{what} holds no sparsifier state ({os.path.basename(path)}): it was "
                         "not saved by a sparse run of this integration; resume from a "
                         "checkpoint of such a run, or start a new run")
    return torch.load(path, map_location="cpu", weights_only=True)


def statistics(sparsifier: Sparsifier) -> dict[str, float]:
    """Overall density of the sparsified weights, and the fraction ever active."""
    return {DENSITY_KEY: sparsifier.overall_density(),
            EVER_ACTIVE_KEY: sparsifier.ever_active_fraction()}
