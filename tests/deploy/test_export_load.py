"""Exporting and loading sparse models: every method on every backend, every zoo model from its
recipe, every structure; the weights come back bit for bit and the outputs agree."""

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

import sparsetrain as st
from sparsetrain.backends.conversion import dense_state_dict
from sparsetrain.backends.csr import CSRLinear
from sparsetrain.models import available_models, build_model, example_input
from sparsetrain.sparsity.structure import STRUCTURE_EXAMPLES
from tests.conftest import batches, schedule_kwargs, tiny_cnn, train_step

BACKENDS = ("csr", "dense")


def assert_same_state(loaded: nn.Module, expected: dict):
    state = dense_state_dict(loaded)
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert state[key].dtype == value.dtype, key
        assert torch.equal(state[key], value), f"{key} differs"


@pytest.mark.parametrize("method,backend", st.supported_pairs())
def test_every_method_round_trips_bit_equal(method, backend, tmp_path):
    torch.manual_seed(0)
    model = tiny_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = st.make_sparsifier(method, model, opt, density=0.2, total_steps=12, backend=backend,
                            **schedule_kwargs(method, 3, alpha=0.5))
    for x, y in batches(12):
        train_step(model, opt, sp, x, y)
    model.eval()
    x = batches(1, seed=1)[0][0]
    with torch.no_grad():
        reference = model(x)
    expected = dense_state_dict(model)
    path = st.export_sparse(model, sp, tmp_path / "m.sparse.safetensors",
                            metadata={"method": method})
    content = st.read_sparse(path)
    assert content.info == {"method": method}
    assert set(content.sparse) == set(sp.names)
    for name in sp.names:
        assert torch.equal(content.sparse[name].positions, sp.forward_positions(name))
    for load_backend in BACKENDS:
        loaded = st.load_sparse(path, model=tiny_cnn(), backend=load_backend)
        assert not loaded.training
        assert not any(p.requires_grad for p in loaded.parameters())
        assert_same_state(loaded, expected)
        with torch.inference_mode():
            assert torch.allclose(loaded(x), reference, rtol=1e-5, atol=1e-5)
        csr = [m for m in loaded.modules() if isinstance(m, CSRLinear)]
        assert bool(csr) == (load_backend == "csr")  # fc1 and fc2 of the tiny CNN


def zoo_input(name: str) -> tuple[int, ...]:
    if st.models.model_inputs(name) == "tokens":
        return (16,)
    return (1, 28, 28) if name.startswith("lenet") else (3, 32, 32)


@pytest.mark.parametrize("name", available_models())
def test_every_zoo_model_loads_from_its_recipe(name, tmp_path):
    torch.manual_seed(0)
    shape = zoo_input(name)
    width = 1.0 if name.startswith("lenet") else 0.25
    model = build_model(name, num_classes=10, input_shape=shape, width=width)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = st.Static(model, opt, density=0.1, total_steps=1)
    x = example_input(name, shape, num_classes=10, batch=3)
    model.eval()
    with torch.no_grad():
        reference = model(x)
    expected = dense_state_dict(model)
    path = st.export_sparse(model, sp, tmp_path / "m.sparse.safetensors")
    state = torch.get_rng_state()
    for backend in BACKENDS:
        loaded = st.load_sparse(path, backend=backend)  # built from the file's recipe
        assert type(loaded) is type(model)
        assert_same_state(loaded, expected)
        with torch.inference_mode():
            assert torch.allclose(loaded(x), reference, rtol=1e-4, atol=1e-5)
    assert torch.equal(torch.get_rng_state(), state)  # building it drew no random numbers


def mlp():
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16), nn.ReLU(),
                         nn.Linear(16, 8))


@pytest.mark.filterwarnings("ignore:backend='csr'.*output only their bias")
@pytest.mark.parametrize("backend", st.available_backends())
@pytest.mark.parametrize("structure", list(STRUCTURE_EXAMPLES.values()))
def test_every_structure_round_trips(structure, backend, tmp_path):
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    density = 0.5 if structure == "2:4" else 0.25
    sp = st.RigL(model, opt, density=density, total_steps=8, delta_t=2, structure=structure,
                 backend=backend, distribution="uniform")
    for _ in range(8):
        x = torch.randn(16, 32)
        opt.zero_grad()
        model(x).square().mean().backward()
        sp.step()
    model.eval()
    x = torch.randn(5, 32)
    with torch.no_grad():
        reference = model(x)
    expected = dense_state_dict(model)
    path = st.export_sparse(model, sp, tmp_path / "m.safetensors")
    content = st.read_sparse(path)
    layout = {"2:4": "nm", "block:4x4": "bsr"}.get(structure, "csr")
    with safe_open(str(path), "pt") as f:
        layers = json.loads(f.metadata()["layers"])
    for name, w in content.sparse.items():
        assert w.structure == structure
        assert (w.block is not None) == structure.startswith("block")
        assert layers[name]["layout"] == layout
    for load_backend in BACKENDS:
        loaded = st.load_sparse(path, model=mlp(), backend=load_backend)
        assert_same_state(loaded, expected)
        with torch.inference_mode():
            for batch in (x[:1], x):
                assert torch.allclose(loaded(batch), reference[:batch.shape[0]], rtol=1e-5,
                                      atol=1e-6)
        if load_backend == "csr":
            shapes = {m.block_shape for m in loaded.modules() if isinstance(m, CSRLinear)}
            assert shapes == ({(4, 4)} if structure.startswith("block") else {None})


def test_masks_and_no_sparsifier(tmp_path):
    torch.manual_seed(0)
    model = mlp()
    mask = torch.rand(64, 32) < 0.1
    with torch.no_grad():
        model[0].weight.mul_(mask)
    path = st.export_sparse(model, {"0.weight": mask}, tmp_path / "m.safetensors")
    content = st.read_sparse(path)
    assert list(content.sparse) == ["0.weight"]
    assert torch.equal(content.sparse["0.weight"].mask(), mask)
    assert_same_state(st.load_sparse(path, model=mlp()), dense_state_dict(model))
    dense = st.export_sparse(model, None, tmp_path / "d.safetensors")
    assert st.read_sparse(dense).sparse == {}
    assert_same_state(st.load_sparse(dense, model=mlp()), dense_state_dict(model))


def test_refuses_what_would_change_the_model(tmp_path):
    model = mlp()
    mask = torch.rand(64, 32) < 0.1  # the weights outside it are not zero
    with pytest.raises(ValueError, match="non-zero weights outside its mask"):
        st.export_sparse(model, {"0.weight": mask}, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="not a tensor of the model"):
        st.export_sparse(model, {"9.weight": mask}, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="bool tensor"):
        st.export_sparse(model, {"0.weight": mask.float()}, tmp_path / "m.safetensors")
    with pytest.raises(TypeError, match="sparsifier, a dict"):
        st.export_sparse(model, [mask], tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_size_is_proportional_to_the_non_zeros(tmp_path):
    """8 bytes a non-zero (float32 value, int32 column) plus the row pointers and header."""
    layer = nn.Linear(1000, 1000, bias=False)
    dense = 1000 * 1000 * 4
    for density in (0.1, 0.02):
        mask = torch.rand(1000, 1000) < density
        with torch.no_grad():
            layer.weight.mul_(mask)
        path = st.export_sparse(layer, {"weight": mask}, tmp_path / f"{density}.safetensors")
        size, nnz = path.stat().st_size, int(mask.sum())
        assert 8 * nnz < size < 8 * nnz + 4 * 1001 + 2000
        assert size < 2.2 * density * dense


def test_zoo_recipe_is_recorded_and_needed(tmp_path):
    model = build_model("lenet300", num_classes=10, input_shape=(1, 28, 28), width=0.5)
    path = st.export_sparse(model, None, tmp_path / "zoo.safetensors")
    assert st.read_sparse(path).recipe == {"model": "lenet300", "num_classes": 10,
                                           "input_shape": [1, 28, 28], "width": 0.5}
    path = st.export_sparse(mlp(), None, tmp_path / "own.safetensors")
    assert st.read_sparse(path).recipe is None
    with pytest.raises(st.SparseFileError, match="no zoo recipe.*model=MyNet"):
        st.load_sparse(path)
    with pytest.raises(ValueError, match="missing num_classes, input_shape, width"):
        st.export_sparse(mlp(), None, tmp_path / "x.safetensors", recipe={"model": "lenet300"})


@pytest.mark.slow
@pytest.mark.parametrize("method", st.available_methods())
@pytest.mark.parametrize("name", available_models())
def test_every_zoo_model_with_every_method(name, method, tmp_path):
    """The whole product, after two training steps (the default run covers each side)."""
    torch.manual_seed(0)
    shape = zoo_input(name)
    width = 1.0 if name.startswith("lenet") else 0.25
    model = build_model(name, num_classes=10, input_shape=shape, width=width)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sp = st.make_sparsifier(method, model, opt, density=0.1, total_steps=2,
                            **schedule_kwargs(method, 1, alpha=0.3))
    x = example_input(name, shape, num_classes=10, batch=4)
    for _ in range(2):
        opt.zero_grad()
        out = model(x)
        out.float().square().mean().backward()
        sp.step()
    model.eval()
    with torch.no_grad():
        reference = model(x)
    path = st.export_sparse(model, sp, tmp_path / "m.sparse.safetensors")
    for backend in BACKENDS:
        loaded = st.load_sparse(path, backend=backend)
        assert_same_state(loaded, dense_state_dict(model))
        with torch.inference_mode():
            assert torch.allclose(loaded(x), reference, rtol=1e-4, atol=1e-5)
