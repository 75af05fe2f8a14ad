"""Sparse momentum, SNFS (Dettmers & Zettlemoyer 2019): grow by ``|EMA(0.9) of the gradient|``.

The moving average of the dense gradient is updated at every step, so it needs a backend that
has the dense gradient of every step (capability ``"dense_gradient_every_step"``: the masked
one). As in the RigL paper's comparison, the layer densities stay fixed (no redistribution
between layers).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..backends.base import DENSE_GRADIENT_EVERY_STEP, Block
from ..flops import snfs_training_flops
from .dst import SET
from .registry import register_method


@register_method("snfs")
class SNFS(SET):
    """SET with the grow score ``|EMA(0.9) of the dense gradient|``."""

    default_optimizer_step_on_update = False
    requires = frozenset({DENSE_GRADIENT_EVERY_STEP})
    grad_momentum = 0.9

    def init_method_state(self) -> None:
        self.gradient_ema: dict[str, torch.Tensor] = {}

    def observe_gradients(self) -> None:
        for name in self.backend.names:
            grad = self.backend.dense_gradient(name)
            if grad is None:
                continue
            ema = self.gradient_ema.get(name)
            if ema is None:
                self.gradient_ema[name] = (1 - self.grad_momentum) * grad.clone()
            else:
                ema.mul_(self.grad_momentum).add_(grad, alpha=1 - self.grad_momentum)

    def grow_scores(self, block: Block) -> torch.Tensor:
        ema = self.gradient_ema.get(block.name)
        if ema is None:
            return torch.zeros(block.shape)
        return ema[block.rows].abs()

    @classmethod
    def training_flops(cls, f_dense: float, f_sparse: float, *, delta_t: int = 100) -> float:
        return snfs_training_flops(f_dense, f_sparse)

    def method_state(self) -> dict[str, Any]:
        return {"gradient_ema": {n: e.detach().cpu().clone()
                                 for n, e in self.gradient_ema.items()}}

    def check_method_state(self, state: Mapping[str, Any]) -> None:
        ema = state.get("gradient_ema", {})
        if not isinstance(ema, Mapping):
            raise ValueError(f"method_state['gradient_ema'] must be a dict name -> tensor, got "
                             f"{type(ema).__name__}; pass what state_dict() returned")
        for name, e in ema.items():
            if not isinstance(name, str) or name not in self.backend.names:
                shown = repr(name) if isinstance(name, str) else f"a {type(name).__name__}"
                raise ValueError(f"method_state['gradient_ema'] names {shown}, which is not a "
                                 f"sparsified weight ({self.backend.names})")
            shape = self.backend.shape(name)
            if not torch.is_tensor(e) or not e.is_floating_point() or e.is_meta or (
                    e.layout != torch.strided or tuple(e.shape) != shape):
                got = (f"{e.dtype} of shape {tuple(e.shape)}" if torch.is_tensor(e)
                       else type(e).__name__)
                raise ValueError(f"method_state['gradient_ema'][{name!r}] must be a floating "
                                 f"tensor of the weight's shape {shape}, got {got}")

    def load_method_state(self, state: Mapping[str, Any]) -> None:
        like = {n: self.backend.active_values(n) for n in self.backend.names}
        self.gradient_ema = {
            n: e.to(device=like[n].device, dtype=like[n].dtype)
            for n, e in state.get("gradient_ema", {}).items()
        }
