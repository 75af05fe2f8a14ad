"""The model card: a short Markdown description written beside an exported model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .format import SparseModel

#: Suffixes of exported files that the card's name replaces.
_SUFFIXES = (".safetensors", ".onnx")


def card_path(path: str | Path) -> Path:
    """Where the card of the exported file ``path`` goes: beside it, ``.md`` in place of
    ``.safetensors`` or ``.onnx`` (``model.sparse.safetensors`` -> ``model.sparse.md``)."""
    path = Path(path)
    for suffix in _SUFFIXES:
        if path.name.endswith(suffix) and len(path.name) > len(suffix):
            return path.with_name(path.name[:-len(suffix)] + ".md")
    return path.with_name(path.name + ".md")


def _flops(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else "not recorded"


def model_card(content: SparseModel, *, file_name: str, file_bytes: int,
               dense_bytes: int | None = None) -> str:
    """The card of ``content`` (written to ``file_name``, ``file_bytes`` long; ``dense_bytes``:
    the size of the same tensors stored dense, for comparison). It reads the file's ``info``:
    ``method``, ``density``, ``data``, ``test_accuracy``, ``train_flops``, ``inference_flops``
    and their ratios to dense, and ``command`` (the command that trained it) where recorded."""
    info = content.info
    recipe = content.recipe
    title = recipe["model"] if recipe else "model"
    lines = [f"# {title}, {info.get('method', 'sparse')} at density "
             f"{info.get('density', _overall(content)):.4g}", ""]
    if recipe:
        lines.append(f"- **Model**: `{recipe['model']}`, width {recipe['width']:g}, input "
                     f"{tuple(recipe['input_shape'])}, {recipe['num_classes']} classes")
    lines += [f"- **Method**: {info.get('method', 'not recorded')}",
              f"- **Density**: {_overall(content):.4f} of the sparse layers' weights kept "
              f"({sum(w.positions.numel() for w in content.sparse.values())} non-zeros)",
              f"- **Data set**: {info.get('data', 'not recorded')}"]
    if "test_accuracy" in info:
        lines.append(f"- **Test accuracy**: {float(info['test_accuracy']):.4f}")
    lines += [f"- **Training FLOPs** (per example, whole run): {_flops(info.get('train_flops'))}"
              + (f" ({info['train_flops_vs_dense']:.3f}x the dense model's)"
                 if isinstance(info.get("train_flops_vs_dense"), (int, float)) else ""),
              f"- **Inference FLOPs** (per example): {_flops(info.get('inference_flops'))}"
              + (f" ({info['inference_flops_vs_dense']:.3f}x the dense model's)"
                 if isinstance(info.get("inference_flops_vs_dense"), (int, float)) else ""),
              f"- **File**: `{file_name}`, {file_bytes / 1e6:.3f} MB"
              + (f" ({file_bytes / dense_bytes:.3f}x the {dense_bytes / 1e6:.3f} MB of the "
                 "same tensors stored dense)" if dense_bytes else ""),
              f"- **Written by**: sparsetrain {content.sparsetrain_version}"]
    if info.get("command"):
        lines += ["", "Trained with:", "", "```bash", str(info["command"]), "```"]
    lines += ["", "## Layers", "", "| weight | shape | density | non-zeros | structure |",
              "| --- | --- | --- | --- | --- |"]
    for name, w in content.sparse.items():
        lines.append(f"| `{name}` | {'x'.join(map(str, w.shape))} | {w.density:.4f} | "
                     f"{w.positions.numel()} | {w.structure} |")
    dense = [n for n, t in content.dense.items() if t.dim() >= 2 and t.is_floating_point()]
    for name in dense:
        t = content.dense[name]
        lines.append(f"| `{name}` | {'x'.join(map(str, t.shape))} | 1 (dense) | {t.numel()} | "
                     "kept dense |")
    lines += ["", "Load it with `sparsetrain.load_sparse(path)` (CSR inference layers) or "
              "`sparsetrain.load_sparse(path, backend=\"dense\")` (plain PyTorch layers); "
              "`sparsetrain predict PATH --data DATA` measures accuracy and latency.", ""]
    return "\n".join(lines)


def _overall(content: SparseModel) -> float:
    total = sum(w.numel for w in content.sparse.values())
    return sum(w.positions.numel() for w in content.sparse.values()) / total if total else 1.0
