"""Size on disk of an exported sparse model against dense checkpoints of the same model.

For LeNet-300-100 and the MLP 4096-4096-4096-10, each trained for a few steps with RigL (ERK
densities, masked backend) at densities 0.1, 0.05 and 0.02, the table compares

- the sparse model file (``st.export_sparse``: values and int32 column indices of the sparse
  weights, dense biases);
- the dense model checkpoint (``torch.save(model.state_dict())``, zeros included), the usual
  "dense checkpoint";
- a training checkpoint as a run keeps it (model, SGD momentum and the sparsifier's state,
  ``torch.save``), which holds the model's tensors about twice over.

    .venv/bin/python benchmarks/export_size.py
"""

from __future__ import annotations

import datetime as dt
import io
import sys
import tempfile
from pathlib import Path

import torch
from _common import write_result
from torch import nn

import sparsetrain as st


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
                         nn.Linear(4096, 10))


def lenet() -> nn.Module:
    return st.models.build_model("lenet300", num_classes=10, input_shape=(1, 28, 28))


def saved_size(obj) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer().nbytes


def measure(build, density: float, folder: Path) -> dict[str, float]:
    torch.manual_seed(0)
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sp = st.RigL(model, opt, density=density, total_steps=4, delta_t=2)
    inputs = next(m for m in model.modules() if isinstance(m, nn.Linear)).in_features
    for _ in range(4):
        opt.zero_grad()
        model(torch.randn(8, inputs)).square().mean().backward()
        sp.step()
    path = st.export_sparse(model, sp, folder / "m.sparse.safetensors")
    return {"sparse": path.stat().st_size, "dense": saved_size(model.state_dict()),
            "training": saved_size({"model": model.state_dict(), "optimizer": opt.state_dict(),
                                    "sparsifier": sp.state_dict()}),
            "nnz": sum(sp.active_counts().values())}


def main() -> None:
    lines = ["# Size of an exported sparse model", "",
             f"`benchmarks/export_size.py`, {dt.date.today()}: file sizes in MB; ratios are "
             "the sparse model file's size over the other file's.", "",
             "| model | density | non-zeros | sparse file | dense checkpoint | ratio | "
             "training checkpoint | ratio |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in (("LeNet-300-100", lenet), ("MLP 4096-4096-4096-10", mlp)):
            for density in (0.1, 0.05, 0.02):
                r = measure(build, density, Path(tmp))
                lines.append(
                    f"| {name} | {density} | {r['nnz']} | {r['sparse'] / 1e6:.3f} | "
                    f"{r['dense'] / 1e6:.3f} | {r['sparse'] / r['dense']:.3f} | "
                    f"{r['training'] / 1e6:.3f} | {r['sparse'] / r['training']:.3f} |")
                print(lines[-1], file=sys.stderr)
    lines += ["", "The sparse file stores 8 bytes a non-zero (float32 value, int32 column) plus "
              "the row pointers and the dense biases; the dense checkpoint 4 bytes a weight. "
              "So the ratio is about 2 x density."]
    write_result(lines, Path(__file__).parent / "results" / "export_size.md")


if __name__ == "__main__":
    main()
