"""Training a sweep's cells: each under its folder's lock, in this process or in workers.

Sweeps started together on one folder share its cells: a cell whose folder another process has
locked is waited for, then taken over if that process stopped before finishing it. SIGINT,
SIGTERM and SIGHUP make every running cell finish its step and write a checkpoint. Worker
processes run in process groups of their own, so that a signal reaches them once, through the
sweep.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

from . import folder, interrupt
from .config import ConfigError, TrainConfig, make_config
from .folder import has_checkpoint, is_finished
from .lock import FolderInUse, FolderLock


class SweepStopped(Exception):
    """The sweep was asked to stop (``signum``): every running cell wrote a checkpoint."""

    def __init__(self, signum: int | None):
        self.signum = signum
        name = signal.Signals(signum).name if signum else "a request"
        super().__init__(f"sweep stopped by {name}; every cell in progress wrote a checkpoint: "
                         "run the same command again to continue")


class SweepFailed(ConfigError):
    """Some cells failed; the others were trained."""


def _run_cell(settings: dict[str, Any], out: str, threads: int | None) -> dict[str, Any]:
    """Train one cell in this process, under its folder's lock. Returns ``{"status": "done",
    "summary": ...}``, ``{"status": "busy", "pid": ...}`` (another process trains it),
    ``{"status": "stopped", "signal": ...}`` or ``{"status": "failed", "error": ...}``."""
    import torch

    from .train import Trainer

    if threads:
        torch.set_num_threads(threads)
    run = Path(out)
    try:
        run.mkdir(parents=True, exist_ok=True)
        lock = folder.claim(run)
    except FolderInUse as exc:
        return {"status": "busy", "pid": exc.pid}
    except (ConfigError, OSError) as exc:
        return {"status": "failed", "error": str(exc)}
    try:
        if is_finished(run):  # finished by another sweep meanwhile
            return {"status": "done", "summary": folder.read_summary(run)}
        trainer = Trainer(make_config(settings), run, resume=has_checkpoint(run), lock=lock,
                          log=lambda m: folder.append_log(run, m))
        summary = trainer.train()
    except (ConfigError, ValueError, RuntimeError) as exc:  # TrainingError among them
        return {"status": "failed", "error": str(exc).splitlines()[0] if str(exc) else repr(exc)}
    finally:
        lock.release()
    if summary is None:
        return {"status": "stopped", "signal": trainer.stopped_by}
    return {"status": "done", "summary": summary}


def _cell_process(settings: dict[str, Any], out: str, threads: int | None, results) -> None:
    """A worker process's cell: in a process group of its own, so that only the sweep passes
    signals on to it (once), and its result on the queue."""
    os.setpgrp()
    try:
        result = _run_cell(settings, out, threads)
    except BaseException as exc:  # report, never die silently
        result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    results.put((out, result))


class _Cells:
    """The bookkeeping of a sweep's cells: what is left, running, waiting on another process,
    failed; and the stop request."""

    def __init__(self, todo: list[tuple[TrainConfig, Path]], log: Callable[[str], None]):
        self.pending = deque(todo)
        self.waiting: list[tuple[TrainConfig, Path, int | None]] = []
        self.failed: list[str] = []
        self.log = log
        self.signum: int | None = None
        self.stop = False

    def settle(self, config: TrainConfig, run: Path, result: dict[str, Any]) -> None:
        status = result["status"]
        if status == "done":
            summary = result["summary"]
            loss = summary.get("test_nats_per_byte")
            measured = (f"validation loss {loss:.4f} nats/byte" if loss is not None
                        else f"test accuracy {summary['test_accuracy']:.4f}")
            self.log(f"  {run.name}: {measured}, density {summary['density']:.4f}, "
                     f"{summary['wall_time_s']:.0f} s")
        elif status == "busy":
            self.waiting.append((config, run, result.get("pid")))
        elif status == "stopped":
            self.request_stop(result.get("signal"))
        else:
            self.failed.append(f"{run.name}: {result.get('error')}")
            self.log(f"  {run.name}: failed: {result.get('error')}")

    def request_stop(self, signum: int | None) -> None:
        if not self.stop:
            self.signum = signum
        self.stop = True

    def next_waiting(self) -> None:
        """Wait for a cell that another process trains; queue it again if that process
        stopped before finishing it."""
        config, run, pid = self.waiting.pop(0)
        self.log(f"  {run.name}: trained by process {pid or '?'}; waiting for it")
        lock = FolderLock(run)
        while not self.stop:
            try:
                lock.acquire()
                break
            except FolderInUse:
                time.sleep(0.5)
        if self.stop:
            return
        lock.release()
        if is_finished(run):
            self.settle(config, run, {"status": "done", "summary": folder.read_summary(run)})
        else:
            self.pending.append((config, run))


def train_cells(todo: list[tuple[TrainConfig, Path]], jobs: int,
                log: Callable[[str], None]) -> None:
    """Train the cells ``todo`` (config, folder), ``jobs`` at a time; raises ``SweepStopped``
    or ``SweepFailed`` as ``run_sweep`` says."""
    state = _Cells(todo, log)
    if jobs <= 1:
        _in_this_process(state)
    else:
        _in_worker_processes(state, jobs, max(1, (os.cpu_count() or 1) // jobs))
    if state.stop:
        raise SweepStopped(state.signum)
    if state.failed:
        raise SweepFailed(f"{len(state.failed)} of the runs failed (the others are trained): "
                          + "; ".join(state.failed))


def _in_this_process(state: _Cells) -> None:
    # a cell's Trainer catches the signals while it trains; between cells the sweep does
    with interrupt.handling({s: state.request_stop for s in interrupt.STOP_SIGNALS}):
        while not state.stop and (state.pending or state.waiting):
            if not state.pending:
                state.next_waiting()
                continue
            config, run = state.pending.popleft()
            state.settle(config, run, _run_cell(config.to_dict(), str(run), None))


def _in_worker_processes(state: _Cells, jobs: int, threads: int) -> None:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    running: dict[str, tuple[Any, TrainConfig]] = {}

    def on_signal(signum: int) -> None:
        if state.stop and signum == signal.SIGINT:  # Ctrl-C twice: stop at once
            for process, _ in running.values():
                process.kill()
            raise KeyboardInterrupt
        if not state.stop:
            state.request_stop(signum)
            for process, _ in running.values():
                process.terminate()  # SIGTERM: finish the step, checkpoint

    with interrupt.handling({s: on_signal for s in interrupt.STOP_SIGNALS}):
        while running or (not state.stop and (state.pending or state.waiting)):
            while state.pending and len(running) < jobs and not state.stop:
                config, run = state.pending.popleft()
                process = context.Process(target=_cell_process,
                                          args=(config.to_dict(), str(run), threads, results))
                process.start()
                running[str(run)] = (process, config)
            if not running:
                if state.waiting and not state.stop:
                    state.next_waiting()
                continue
            try:
                out, result = results.get(timeout=0.5)
            except queue.Empty:
                _reap_dead(running, state)
                continue
            process, config = running.pop(out)
            process.join()
            state.settle(config, Path(out), result)


def _reap_dead(running: dict[str, tuple[Any, TrainConfig]], state: _Cells) -> None:
    """Settle the cells whose process died without a result (killed)."""
    for out, (process, config) in list(running.items()):
        if process.is_alive() or process.exitcode is None:
            continue
        time.sleep(0.2)  # a result put just before exiting may still be in the pipe
        if process.exitcode == 0:
            continue
        running.pop(out)
        if state.stop:  # stopped before its trainer caught the signal: nothing to save yet
            continue
        state.settle(config, Path(out), {"status": "failed", "error": "its process died "
                                         f"(exit status {process.exitcode})"})
