"""Data-parallel training on torch.distributed: the process group, sharding and agreement.

A run under ``torchrun`` (or ``sparsetrain train --nproc N``, which starts torchrun) is the same
run as on one process: ``batch_size`` is the total batch of a step, every process prepares that
step's batch from the seed (order and augmentation) and trains on its own contiguous share, and
the loss is scaled so that DDP's average of the shares' gradients is the gradient of the whole
batch's mean loss. Steps, learning rates, mask updates and checkpoints are therefore those of a
single-process run, which is why a run can be resumed on another number of processes.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from .. import collectives
from . import interrupt

#: How long a collective may wait for the other processes before failing (a crashed rank).
TIMEOUT = datetime.timedelta(minutes=10)


@dataclass
class Distributed:
    """This process's place in the run: ``rank`` of ``world`` processes (1: no process group)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, device: str) -> "Distributed":
        """Join the process group torchrun describes in the environment (``WORLD_SIZE`` > 1):
        NCCL when the run is on CUDA, gloo on the CPU. Without torchrun: a single process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            use_cuda = device.startswith("cuda") or (device == "auto"
                                                     and torch.cuda.is_available())
            if use_cuda:
                torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl" if use_cuda else "gloo", timeout=TIMEOUT)
        return cls(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank)

    def device(self, resolved: torch.device) -> torch.device:
        """One GPU per process (by local rank) when the run is on CUDA."""
        if self.active and resolved.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return resolved

    def share(self, n: int) -> slice:
        """This process's contiguous share of a batch of ``n`` examples."""
        return slice(n * self.rank // self.world, n * (self.rank + 1) // self.world)

    def sum(self, values: Sequence[float]) -> list[float]:
        """``values`` summed over the processes (float64)."""
        return collectives.all_sum(torch.tensor(list(values), dtype=torch.float64)).tolist()

    def gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every process's ``tensor`` (the same shape on all), on the CPU."""
        return [p.cpu() for p in collectives.all_gather(tensor)]

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``tensor`` on every process (same shape and dtype everywhere)."""
        return collectives.broadcast(tensor)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def launch(argv: Sequence[str], nproc: int) -> int:
    """Run ``sparsetrain <argv>`` on ``nproc`` processes of this machine through torchrun; each
    process gets an equal share of the CPU cores for its threads. Returns the exit status.

    torchrun runs in a session of its own and this process passes SIGINT, SIGTERM and SIGHUP on
    to it once (torchrun passes them to the workers, which stop cleanly with a checkpoint); the
    status is then that of the signal (130, 143, 129)."""
    threads = max(1, (os.cpu_count() or 1) // nproc)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "sparsetrain", *argv]
    process = subprocess.Popen(command, env=env, start_new_session=True)
    received: list[int] = []

    def forward(signum: int) -> None:
        if not received:
            received.append(signum)
            process.send_signal(signum)

    with interrupt.handling({s: forward for s in interrupt.STOP_SIGNALS}):
        status = process.wait()
    return interrupt.exit_status(received[0]) if received and status != 0 else status
