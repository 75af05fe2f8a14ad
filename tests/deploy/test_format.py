"""The sparse model file: what it stores, and one clear error for every file it cannot use."""

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import sparsetrain as st
from sparsetrain import files
from sparsetrain.deploy import format as fmt
from sparsetrain.deploy import read, write
from sparsetrain.models import build_model


@pytest.fixture
def exported(tmp_path):
    torch.manual_seed(0)
    model = build_model("lenet300", num_classes=10, input_shape=(1, 28, 28))
    sp = st.Static(model, torch.optim.SGD(model.parameters(), lr=0.1), density=0.1,
                   total_steps=1)
    return st.export_sparse(model, sp, tmp_path / "m.sparse.safetensors",
                            metadata={"method": "static", "test_accuracy": 0.5})


def test_layout_and_metadata(exported):
    from safetensors import safe_open

    with safe_open(str(exported), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert {"fc1.weight::values", "fc1.weight::crow", "fc1.weight::col", "fc1.bias"} <= keys
    assert "fc1.weight" not in keys
    assert meta["format"] == fmt.FORMAT and meta["format_version"] == str(fmt.FORMAT_VERSION)
    assert meta["sparsetrain_version"] == st.__version__
    layers = json.loads(meta["layers"])
    assert layers["fc1.weight"]["layout"] == "csr" and layers["fc1.weight"]["shape"] == [300, 784]
    assert json.loads(meta["info"]) == {"method": "static", "test_accuracy": 0.5}
    assert json.loads(meta["recipe"])["model"] == "lenet300"


def test_loading_unpickles_nothing(exported, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the load path unpickled something")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    st.load_sparse(exported)


def rewrite(path, change):
    """Rewrite the file with ``change(tensors, metadata)`` applied, checksum recomputed."""
    content = st.read_sparse(path)
    tensors, metadata = write.encode(content)
    change(tensors, metadata)
    metadata["checksum"] = fmt.checksum(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)


def test_truncated(exported):
    data = exported.read_bytes()
    for size in (4, 100, len(data) // 2, len(data) - 1):
        exported.write_bytes(data[:size])
        with pytest.raises(st.SparseFileError, match="not a complete safetensors file"):
            st.load_sparse(exported)


def test_tampered_values_and_metadata(exported):
    data = bytearray(exported.read_bytes())
    data[-3] ^= 0x40  # a bit of the last tensor's bytes
    exported.write_bytes(bytes(data))
    with pytest.raises(st.SparseFileError, match="does not match its checksum.*changed or "
                                                 "damaged after export"):
        st.load_sparse(exported)
    data[-3] ^= 0x40
    text = bytes(data).replace(b'\\"method\\": \\"static\\"', b'\\"method\\": \\"STATIC\\"')
    assert text != bytes(data)
    exported.write_bytes(text)
    with pytest.raises(st.SparseFileError, match="does not match its checksum"):
        st.read_sparse(exported)


def test_newer_format_version(exported):
    rewrite(exported, lambda t, m: m.update(format_version=str(fmt.FORMAT_VERSION + 1),
                                            sparsetrain_version="9.0"))
    with pytest.raises(st.SparseFileError, match="newer sparsetrain \\(9.0, format version 2; "
                                                 "this one reads up to 1\\); upgrade"):
        st.load_sparse(exported)


def test_wrong_model(exported):
    with pytest.raises(st.SparseFileError, match="is for another model \\(the file is for "
                                                 "lenet300 with 10 classes.*shapes differ"):
        st.load_sparse(exported, model=build_model("lenet300", num_classes=10,
                                                   input_shape=(1, 28, 28), width=0.5))
    with pytest.raises(st.SparseFileError, match="the module has conv1.bias, conv1.weight.*the "
                                                 "file has fc3.bias, fc3.weight"):
        st.load_sparse(exported, model=build_model("lenet5", num_classes=10,
                                                   input_shape=(1, 28, 28)))


def test_not_a_sparse_model_file(tmp_path):
    missing = tmp_path / "none.safetensors"
    with pytest.raises(st.SparseFileError, match="does not exist"):
        st.load_sparse(missing)
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(3)}, str(other))
    with pytest.raises(st.SparseFileError, match="not a sparsetrain sparse model"):
        st.load_sparse(other)
    pickled = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(3)}, pickled)
    with pytest.raises(st.SparseFileError, match="not a complete safetensors file"):
        st.load_sparse(pickled)


@pytest.mark.parametrize("change,message", [
    (lambda t, m: t.__setitem__("fc1.weight::col", t["fc1.weight::col"] + 5000),
     "column indices outside its shape"),
    (lambda t, m: t.__setitem__("fc1.weight::col", t["fc1.weight::col"].flip(0)),
     "not sorted and unique"),
    (lambda t, m: t.__setitem__("fc1.weight::crow", t["fc1.weight::crow"][:-1]),
     "row pointers and columns that do not agree"),
    (lambda t, m: t.pop("fc2.weight::values"), "lacks its values"),
    (lambda t, m: t.__setitem__("fc9.weight::values", torch.zeros(1)), "does not describe"),
    (lambda t, m: m.update(layers=m["layers"].replace('"csr"', '"coo"')), "unknown layout"),
    (lambda t, m: m.update(info="{not json"), "not valid JSON"),
])
def test_inconsistent_structure(exported, change, message):
    """A file whose checksum holds but whose structure does not (a faulty writer)."""
    rewrite(exported, change)
    with pytest.raises(st.SparseFileError, match=message):
        st.load_sparse(exported)


def test_blocks_are_stored_as_blocks(tmp_path):
    layer = nn.Linear(16, 8, bias=False)
    blocks = torch.rand(2, 4) < 0.5
    blocks[0, 0] = True
    mask = blocks.repeat_interleave(4, 0).repeat_interleave(4, 1)
    with torch.no_grad():
        layer.weight.mul_(mask)
    weight = fmt.SparseWeight((8, 16), mask.view(-1).nonzero().view(-1),
                              layer.weight.detach().view(-1)[mask.view(-1)], "block:4x4", (4, 4))
    tensors, metadata = write.encode(fmt.SparseModel({}, {"weight": weight}))
    n = int(blocks.sum())
    assert tensors["weight::values"].shape == (n, 4, 4) and tensors["weight::col"].numel() == n
    back = read.decode(tensors, metadata).sparse["weight"]
    assert torch.equal(back.positions, weight.positions)
    assert torch.equal(back.values, weight.values) and back.block == (4, 4)
    # positions that are not whole blocks are stored as CSR
    weight.positions, weight.values = weight.positions[1:], weight.values[1:]
    tensors, metadata = write.encode(fmt.SparseModel({}, {"weight": weight}))
    assert json.loads(metadata["layers"])["weight"]["layout"] == "csr"
    assert torch.equal(read.decode(tensors, metadata).sparse["weight"].positions, weight.positions)


def test_n_m_groups_are_stored_as_groups(tmp_path):
    torch.manual_seed(0)
    keep = torch.rand(6, 5, 8).argsort(-1)[..., :3].sort(-1).values  # 3 of every 8
    mask = torch.zeros(6, 5, 8, dtype=torch.bool).scatter_(-1, keep, True).view(6, 40)
    values = torch.randn(int(mask.sum()))
    weight = fmt.SparseWeight((6, 40), mask.view(-1).nonzero().view(-1), values, "3:8")
    tensors, metadata = write.encode(fmt.SparseModel({}, {"weight": weight}))
    assert json.loads(metadata["layers"])["weight"]["layout"] == "nm"
    assert tensors["weight::values"].shape == (6, 5, 3)
    assert tensors["weight::idx"].dtype == torch.uint8 and torch.equal(
        tensors["weight::idx"].long(), keep)
    back = read.decode(tensors, metadata).sparse["weight"]
    assert torch.equal(back.positions, weight.positions) and torch.equal(back.values, values)
    bad = dict(tensors, **{"weight::idx": tensors["weight::idx"].flip(-1).contiguous()})
    metadata["checksum"] = fmt.checksum(bad, metadata)
    with pytest.raises(st.SparseFileError, match="not increasing and below 8"):
        read.decode(bad, metadata)
    # positions that are not N:M groups (one group short of one) are stored as CSR
    weight.positions, weight.values = weight.positions[1:], weight.values[1:]
    tensors, metadata = write.encode(fmt.SparseModel({}, {"weight": weight}))
    assert json.loads(metadata["layers"])["weight"]["layout"] == "csr"


def test_written_atomically(exported, monkeypatch):
    before = exported.read_bytes()
    monkeypatch.setattr(files.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("full")))
    model = build_model("lenet300", num_classes=10, input_shape=(1, 28, 28))
    with pytest.raises(OSError):
        st.export_sparse(model, None, exported)
    assert exported.read_bytes() == before
    assert [p.name for p in exported.parent.iterdir()] == [exported.name]
