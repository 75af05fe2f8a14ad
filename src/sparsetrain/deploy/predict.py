"""``sparsetrain predict``: a sparse model file's accuracy on a data set's test split, and how
fast it runs (latency of single examples, throughput of batches), beside the same weights on
dense layers."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..analysis.interpolation import flatten_predictions
from .format import SparseFileError
from .load import materialise, read_sparse


@dataclass
class Speed:
    """Median latency of one example (ms) and throughput at ``batch`` (examples/s)."""

    latency_ms: float
    throughput: float
    batch: int


def accuracy(model: nn.Module, data, batch_size: int = 256) -> tuple[float, int]:
    """Accuracy per prediction over ``data``'s test split, and the number of predictions."""
    correct = total = 0
    with torch.inference_mode():
        for i in range(0, len(data.test_y), batch_size):
            x = data.prepare(data.test_x[i:i + batch_size], train=False)
            out, y = flatten_predictions(model(x), data.prepare_targets(
                data.test_y[i:i + batch_size]))
            correct += int((out.argmax(1) == y).sum())
            total += y.numel()
    return correct / max(1, total), total


def measure_speed(model: nn.Module, examples: torch.Tensor, *, batch: int = 256,
                  singles: int = 100, rounds: int = 5) -> Speed:
    """Median latency of ``singles`` one-example forwards and median throughput of ``rounds``
    forwards of ``batch`` examples (cycled from ``examples``), after a warm-up."""
    n = examples.shape[0]
    big = examples[torch.arange(batch) % n]
    with torch.inference_mode():
        model(examples[:1])
        model(big)
        times = []
        for i in range(singles):
            x = examples[i % n:i % n + 1]
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
        rates = []
        for _ in range(rounds):
            start = time.perf_counter()
            model(big)
            rates.append(batch / (time.perf_counter() - start))
    return Speed(1e3 * statistics.median(times), statistics.median(rates), batch)


def check_data(content, data, where: str) -> None:
    """``SparseFileError`` unless the data set's examples and classes fit the file's recipe."""
    recipe = content.recipe
    if recipe is None:
        return
    shape = tuple(recipe["input_shape"])
    if tuple(data.input_shape) != shape or data.num_classes != recipe["num_classes"]:
        raise SparseFileError(
            f"{where} takes inputs of shape {shape} with {recipe['num_classes']} classes, but "
            f"the data set {data.name!r} has {tuple(data.input_shape)} with {data.num_classes}"
            + (f"; it was trained on {content.info['data']!r}" if content.info.get("data")
               else ""))


def predict(path: str | Path, data: str | None = None, *, data_dir: str | Path | None = None,
            data_options: Mapping[str, Any] | None = None, model: nn.Module | None = None,
            batch_size: int = 256, singles: int = 100, compare_dense: bool = True
            ) -> dict[str, Any]:
    """Accuracy and speed of the sparse model file at ``path`` on the test split of the data
    set ``data`` (by default the one it was trained on, from its info), loaded on the CSR
    backend, and, with ``compare_dense``, the same weights on plain dense layers."""
    from ..data import load_dataset

    content = read_sparse(path)
    data = data or content.info.get("data")
    if not data:
        raise SparseFileError(f"{path} does not record its data set; name it (--data)")
    options = dict(content.info.get("data_options") or {}) if data_options is None \
        else dict(data_options)
    dataset = load_dataset(data, data_dir, **options)
    check_data(content, dataset, str(path))
    examples = dataset.prepare(dataset.test_x[:max(batch_size, singles)], train=False)
    result: dict[str, Any] = {"file": str(path), "data": data, "threads": torch.get_num_threads()}
    backends = ("csr", "dense") if compare_dense else ("csr",)
    for backend in backends:
        net = materialise(content, None if model is None else _fresh(model), backend=backend,
                          where=str(path))
        acc, n = accuracy(net, dataset, batch_size)
        speed = measure_speed(net, examples, batch=batch_size, singles=singles)
        result[backend] = {"accuracy": acc, "predictions": n, "latency_ms": speed.latency_ms,
                           "throughput": speed.throughput, "batch": batch_size}
    return result


def _fresh(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def format_result(result: Mapping[str, Any]) -> str:
    """The result of :func:`predict` as a few lines of text."""
    lines = [f"{result['file']} on {result['data']} (test split), {result['threads']} threads"]
    for backend in ("csr", "dense"):
        if backend not in result:
            continue
        r = result[backend]
        lines.append(f"  {backend:5s}: accuracy {r['accuracy']:.4f} ({r['predictions']} "
                     f"predictions), latency {r['latency_ms']:.3f} ms at batch 1, "
                     f"{r['throughput']:.0f} examples/s at batch {r['batch']}")
    if "dense" in result:
        s, d = result["csr"], result["dense"]
        lines.append(f"  sparse vs dense: {d['latency_ms'] / s['latency_ms']:.2f}x lower "
                     f"latency, {s['throughput'] / d['throughput']:.2f}x throughput")
    return "\n".join(lines)
