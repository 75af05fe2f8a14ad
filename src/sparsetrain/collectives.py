"""The few torch.distributed collectives the library and the runner need, in one place.

Every function works without a process group (one process: the identity), and runs gloo's
collectives on the CPU and NCCL's on the tensor's GPU.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def active() -> bool:
    """Whether a process group of more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def device_for(tensor: torch.Tensor | None = None) -> torch.device:
    """Where a collective runs: the CPU for gloo, else the tensor's (or the current) GPU."""
    if dist.get_backend() == "gloo":
        return torch.device("cpu")
    if tensor is not None and tensor.device.type == "cuda":
        return tensor.device
    return torch.device("cuda", torch.cuda.current_device())


def all_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every process's ``tensor`` (the same shape everywhere), on ``tensor``'s device."""
    if not active():
        return [tensor]
    work = tensor.to(device_for(tensor))
    parts = [torch.empty_like(work) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, work)
    return [p.to(tensor.device) for p in parts]


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """The 2-D ``tensor`` of every process stacked along its first dimension, in rank order.
    Processes may hold different numbers of rows."""
    if not active():
        return tensor
    device = device_for(tensor)
    sizes = all_gather(torch.tensor([tensor.shape[0]], device=device))
    largest = max(int(s) for s in sizes)
    padded = torch.zeros(largest, *tensor.shape[1:], dtype=tensor.dtype, device=device)
    padded[:tensor.shape[0]] = tensor
    parts = all_gather(padded)
    return torch.cat([p[:int(s)] for p, s in zip(parts, sizes)]).to(tensor.device)


def all_sum(values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over the processes."""
    if not active():
        return values
    work = values.to(device_for(values))
    dist.all_reduce(work)
    return work.to(values.device)


def broadcast(tensor: torch.Tensor, source: int = 0) -> torch.Tensor:
    """Process ``source``'s ``tensor`` on every process (same shape and dtype everywhere)."""
    if not active():
        return tensor
    work = tensor.to(device_for(tensor),
                     dtype=torch.uint8 if tensor.dtype == torch.bool else tensor.dtype)
    dist.broadcast(work, source)
    return work.to(tensor.device, dtype=tensor.dtype)
