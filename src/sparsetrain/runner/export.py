"""``sparsetrain export``: a finished run's model as a sparse model file or ONNX, with its card.

The run is rebuilt from its folder as ``--resume`` would (its settings, its data set, its final
checkpoint), and its model written as the forward pass uses it, with what the run's summary
records (method, density, data set, accuracy, FLOPs, settings) in the file's info.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any, Mapping

from ..deploy.card import card_path, model_card
from ..deploy.export import pack
from ..deploy.format import SparseModel
from ..deploy.read import load
from ..deploy.write import save
from . import folder
from .config import ConfigError, TrainConfig, make_config

#: The formats ``export`` writes, and the default file name of each in the run folder.
FORMATS = {"safetensors": "model.sparse.safetensors", "onnx": "model.onnx"}
#: What the card and ``predict`` read from the run's summary.
SUMMARY_KEYS = ("method", "density", "data", "test_accuracy", "best_test_accuracy",
                "train_flops", "train_flops_vs_dense", "inference_flops",
                "inference_flops_vs_dense", "epochs", "steps", "layer_densities")


def train_command(config: Mapping[str, Any]) -> str:
    """The ``sparsetrain train`` command line of the settings ``config`` (a ``TrainConfig``'s
    ``to_dict()``): every setting that differs from its default, where and how visibly the run
    went (device, logging, output folder) left out."""
    default = TrainConfig()
    words = ["sparsetrain", "train"]
    for key in TrainConfig.keys():
        if key in TrainConfig.NON_SEMANTIC or key not in config:
            continue
        value = config[key]
        if key not in ("model", "data", "method", "density") and value == getattr(default, key):
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else f"--no-{key.replace('_', '-')}")
        elif value is None:
            continue
        elif key in ("method_options", "data_options"):
            for k, v in value.items():
                words += [flag[:-1], f"{k}={v}"]
        elif isinstance(value, list):
            words += [flag, *(str(v) for v in value)]
        else:
            words += [flag, str(value)]
    return shlex.join(words)


def run_content(run: Path) -> tuple[SparseModel, Any]:
    """The sparse model of the finished run in ``run`` and an example input of its data."""
    from .train import Trainer

    run = Path(run)
    if not run.is_dir() or not folder.is_run_folder(run):
        raise ConfigError(f"{run} is not a sparsetrain run folder (it has no "
                          f"{folder.CONFIG}); give the folder a `sparsetrain train` run wrote")
    summary = folder.read_summary(run)
    if summary is None or not folder.has_checkpoint(run):
        raise ConfigError(f"{run} holds no finished run (no {folder.SUMMARY} and final "
                          f"{folder.CHECKPOINT}); finish it first: sparsetrain train --resume "
                          f"{run}")
    config = make_config(summary.get("config") or {})
    trainer = Trainer(config, run, resume=True, log=lambda message: None)
    try:
        if trainer.state.step != trainer.total_steps:
            raise ConfigError(f"the checkpoint of {run} is at step {trainer.state.step} of "
                              f"{trainer.total_steps}; finish the run first: sparsetrain train "
                              f"--resume {run}")
        data = trainer.data
        info = {k: summary[k] for k in SUMMARY_KEYS if k in summary}
        info.update(config=config.to_dict(), command=train_command(config.to_dict()),
                    data_options=dict(config.data_options),
                    input_mean=data.mean.flatten().tolist(),
                    input_std=data.std.flatten().tolist(), run=run.name)
        recipe = {"model": config.model, "num_classes": data.num_classes,
                  "input_shape": list(data.input_shape), "width": trainer.width}
        content = pack(trainer.model.cpu(), trainer.sparsifier, recipe=recipe, metadata=info)
        example = data.prepare(data.test_x[:1], train=False)
    finally:
        trainer.close()
    return content, example


def dense_bytes(content: SparseModel) -> int:
    """Bytes of the model's tensors stored dense (what a dense checkpoint of them holds),
    counted from their sizes: nothing is made dense for it."""
    return (sum(t.numel() * t.element_size() for t in content.dense.values())
            + sum(w.numel * w.values.element_size() for w in content.sparse.values()))


def export_run(run: Path, out: Path | None = None, *, format: str = "safetensors"
               ) -> tuple[Path, Path, str]:
    """Write the model of the finished run in ``run`` as ``format`` (``"safetensors"``, the
    sparse model file, or ``"onnx"``, the model on dense layers with zeros) to ``out`` (by
    default in the run folder, see :data:`FORMATS`) and its card beside it; returns both
    paths and what was checked: the file read back (safetensors) or run in onnxruntime against
    the model (onnx, where onnxruntime is installed)."""
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}; the formats are "
                          f"{', '.join(FORMATS)}")
    out = Path(out) if out is not None else Path(run) / FORMATS[format]
    if out.is_dir():
        raise ConfigError(f"{out} is a folder; give the path of the file to write (--out)")
    content, example = run_content(Path(run))
    if format == "safetensors":
        save(content, out)
        load(out)  # read back: the checksum and structure hold
        checked = "read back and checked"
    else:
        checked = _export_onnx(content, example, out)
    card = card_path(out)
    card.write_text(model_card(content, file_name=out.name, file_bytes=out.stat().st_size,
                               dense_bytes=dense_bytes(content)))
    return out, card, checked


def _export_onnx(content: SparseModel, example, out: Path) -> str:
    from ..deploy.load import materialise
    from ..deploy.onnx_export import OnnxDependencyError, check_onnx, export_onnx

    model = materialise(content, backend="dense")
    export_onnx(model, example, out)
    batch = example.repeat(3, *([1] * (example.dim() - 1)))
    try:
        worst = check_onnx(out, model, batch)
    except OnnxDependencyError:
        return "not run in onnxruntime (not installed: pip install 'sparsetrain[onnx]')"
    return f"onnxruntime's outputs within {worst:.2g} of torch's"
