"""ONNX export of sparse models (sparsetrain.deploy.onnx_export): the zoo's models, ~90% of
their weights zeroed, exported and run in onnxruntime at batch 1 and 5; the zeros kept in the
file; CSR layers refused; the errors when a package is missing or a model cannot be exported.

The export tests skip when onnx, onnxscript or onnxruntime is missing (``pip install
'sparsetrain[onnx]'``); the missing-package tests run either way.
"""

from __future__ import annotations

import copy
import importlib
import sys

import pytest
import torch
from torch import nn

import sparsetrain.kernels as kernels_module
from sparsetrain.backends.conversion import to_csr
from sparsetrain.deploy.onnx_export import (OnnxDependencyError, OnnxExportError, check_onnx,
                                            export_onnx)
from sparsetrain.models import available_models, build_model, example_input, model_inputs
from sparsetrain.sparsity.targets import find_targets

DENSITY = 0.1
#: name -> (input_shape, width) where the default, (3, 32, 32) at width 0.25, does not fit.
SIZES = {"lenet300": ((1, 28, 28), 1.0), "lenet5": ((1, 28, 28), 1.0), "gpt-mini": ((16,), 0.25)}
#: Exported in the default run, 1-4 s each on two CPU cores. torch.export's tracing time grows
#: with the number of layers, not their width, so the deeper models (ResNet-32/56, the ImageNet
#: ResNets, MobileNets, WRN, VGG-16/19: 2-10 s each, ~40 s together) run with ``-m slow``.
FAST = {"lenet300", "lenet5", "resnet20", "vgg11", "gpt-mini"}


@pytest.fixture(scope="module")
def onnx_installed():
    for package in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(package)


def size(name: str) -> tuple[tuple[int, ...], float, int]:
    """(input_shape, width, num_classes) of the zoo model ``name`` here."""
    shape, width = SIZES.get(name, ((3, 32, 32), 0.25))
    return shape, width, 256 if model_inputs(name) == "tokens" else 10


def sparse_model(name: str, seed: int = 0) -> nn.Module:
    """The zoo model ``name`` with ~90% of each sparsifiable weight zeroed by a random mask,
    its BatchNorm statistics taken from random inputs and its affine parameters random (so
    that folding them into the convolutions is not a no-op), in eval mode."""
    torch.manual_seed(seed)
    shape, width, classes = size(name)
    model = build_model(name, num_classes=classes, input_shape=shape, width=width)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for target in find_targets(model):
            target.param.mul_(torch.rand(target.shape, generator=g) < DENSITY)
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for bn in norms:
            bn.momentum = None  # running statistics: the average over the batches below
            bn.weight.uniform_(0.5, 1.5, generator=g)
            bn.bias.uniform_(-0.2, 0.2, generator=g)
        if norms:
            model.train()
            for _ in range(2):
                model(example_input(name, shape, classes, batch=16))
        for bn in norms:  # a channel the mask left (almost) without weights has a variance
            bn.running_var.clamp_(min=0.1)  # near 0: its huge scale would amplify rounding
    return model.eval()


@pytest.fixture(scope="module")
def exported(onnx_installed, tmp_path_factory):
    """name -> (sparse model, its ONNX file), exported once per module from a batch of 1."""
    cache = {}

    def get(name):
        if name not in cache:
            model = sparse_model(name)
            shape, _, classes = size(name)
            path = tmp_path_factory.mktemp("onnx") / f"{name}.onnx"
            cache[name] = model, export_onnx(model, example_input(name, shape, classes, 1), path)
        return cache[name]
    return get


def initializers(path) -> dict:
    import onnx
    from onnx import numpy_helper
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("name", [
    name if name in FAST else pytest.param(name, marks=pytest.mark.slow)
    for name in available_models()
])
def test_zoo_model_runs_in_onnxruntime(exported, name):
    import onnx
    model, path = exported(name)
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["input"]
    assert [o.name for o in graph.output] == ["output"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    shape, _, classes = size(name)
    for batch in (1, 5):  # exported from a batch of 1: the batch dimension is dynamic
        x = example_input(name, shape, classes, batch)
        with torch.no_grad():
            assert model(x).std() > 1e-3  # a comparison of outputs that vary
        assert check_onnx(path, model, x, rtol=1e-4, atol=1e-5) < 1e-4


@pytest.mark.parametrize("name", ["lenet300", "lenet5"])
def test_initializers_keep_the_exact_zeros(exported, name):
    model, path = exported(name)
    stored = initializers(path)
    for target in find_targets(model):
        weight = target.param.detach().numpy()
        assert (weight == stored[target.name]).all(), target.name  # bit for bit, zeros too
        assert (stored[target.name] == 0).mean() > 1 - DENSITY - 0.05


def test_folded_batchnorm_keeps_the_zero_pattern(exported):
    model, path = exported("resnet20")
    stored = initializers(path)
    convs = [t for t in find_targets(model) if t.param.dim() == 4]
    assert len(convs) > 10
    for target in convs:  # BatchNorm scales each output channel: zeros stay, values change
        assert ((stored[target.name] == 0) == (target.param.detach().numpy() == 0)).all()


class FixedBatch(nn.Module):
    """Works at a batch of 3 only."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x.reshape(3, 4))


class DataDependent(nn.Module):
    """Branches on the values of its input: torch.export cannot trace it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4))


def test_one_file_written_over_an_old_one_and_training_mode_restored(onnx_installed, tmp_path):
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Dropout(0.5), nn.Linear(5, 3))
    model.train()
    model[1].eval()  # a mix of flags, each restored
    path = tmp_path / "out" / "model.onnx"
    path.parent.mkdir()
    path.write_bytes(b"an older file")
    assert export_onnx(model, torch.randn(4, 6), str(path)) == path
    assert model.training and not model[1].training and model[2].training and model[3].training
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"]  # no side files
    assert check_onnx(path, model, torch.randn(7, 6)) < 1e-5  # compared in eval mode
    assert model.training


def test_fixed_batch_export_and_opset(onnx_installed, tmp_path):
    import onnx
    model = nn.Sequential(nn.Linear(4, 2))
    path = export_onnx(model, torch.randn(3, 4), tmp_path / "m.onnx", opset=18,
                       dynamic_batch=False)
    proto = onnx.load(str(path))
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [18]
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == [3, 4]
    assert check_onnx(path, model, torch.randn(3, 4)) < 1e-5
    with pytest.raises(Exception, match="dimension"):  # onnxruntime's own error
        check_onnx(path, model, torch.randn(5, 4))


def test_model_that_fixes_its_batch_size(onnx_installed, tmp_path):
    model = FixedBatch()
    with pytest.raises(OnnxExportError, match="fixes the batch size.*dynamic_batch=False"):
        export_onnx(model, torch.randn(3, 4), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []
    path = export_onnx(model, torch.randn(3, 4), tmp_path / "m.onnx", dynamic_batch=False)
    assert check_onnx(path, model, torch.randn(3, 4)) < 1e-5


def test_model_that_cannot_be_exported(onnx_installed, tmp_path):
    with pytest.raises(OnnxExportError, match="could not export DataDependent") as info:
        export_onnx(DataDependent(), torch.randn(2, 4), tmp_path / "m.onnx")
    assert isinstance(info.value, ValueError) and info.value.__cause__ is not None
    assert "\x1b[" not in str(info.value)  # no terminal colours from torch's message
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary left


@pytest.mark.filterwarnings("ignore:sparsetrain. the compiled CSR kernels")
def test_csr_layers_exported_from_a_plain_copy(onnx_installed, tmp_path, monkeypatch):
    monkeypatch.setattr(kernels_module, "_KERNELS", False)  # torch's operations: no C++ build
    model = mlp()
    g = torch.Generator().manual_seed(1)
    masks = {n: torch.rand(p.shape, generator=g) < 0.2
             for n, p in model.named_parameters() if p.dim() == 2}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in masks:
                p.mul_(masks[n])
    reference = copy.deepcopy(model).eval()
    layers = to_csr(model, masks)
    path = export_onnx(model, torch.randn(2, 20), tmp_path / "m.onnx")
    assert check_onnx(path, reference, torch.randn(5, 20)) < 1e-5
    assert [model[0], model[2]] == list(layers.values())  # the model itself is unchanged
    assert isinstance(model[1], nn.Identity)  # its fused ReLU too


def test_weights_too_large_for_one_file_go_beside_it(onnx_installed, tmp_path, monkeypatch):
    program = importlib.import_module("torch.onnx._internal.exporter._onnx_program")
    if not hasattr(program, "_LARGE_MODEL_THRESHOLD"):
        pytest.skip("this torch has no _LARGE_MODEL_THRESHOLD to lower")
    monkeypatch.setattr(program, "_LARGE_MODEL_THRESHOLD", 0)  # every model counts as large
    model = mlp().eval()
    path = export_onnx(model, torch.randn(2, 20), tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert check_onnx(path, model, torch.randn(3, 20)) < 1e-5


def test_check_reports_a_mismatch(exported):
    model, path = exported("lenet300")
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.fc3.bias.add_(1.0)
    with pytest.raises(OnnxExportError, match="differs from the model's by up to 1"):
        check_onnx(path, other, torch.randn(2, 1, 28, 28))


def test_missing_onnxruntime(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime fails
    with pytest.raises(OnnxDependencyError, match=r"onnxruntime.*install sparsetrain\[onnx\]"):
        check_onnx(tmp_path / "m.onnx", mlp(), torch.randn(2, 20))
    assert issubclass(OnnxDependencyError, ImportError)


def test_missing_onnxscript(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(OnnxDependencyError, match=r"onnxscript.*install sparsetrain\[onnx\]"):
        export_onnx(mlp(), torch.randn(2, 20), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="example must be a torch.Tensor"):
        export_onnx(mlp(), [torch.randn(2, 20)], tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="opset"):
        export_onnx(mlp(), torch.randn(2, 20), tmp_path / "m.onnx", opset="18")
    with pytest.raises(ValueError, match="is a folder"):
        export_onnx(mlp(), torch.randn(2, 20), tmp_path)
