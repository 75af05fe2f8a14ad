"""state_dict round trips: a run saved, loaded (weights_only) and continued is the same run."""

import pytest
import torch

import sparsetrain as st
from tests.conftest import (
    batches, save_checkpoint, schedule_kwargs, tiny_cnn, train_step,
)

PAIRS = st.supported_pairs()
STEPS = 30


def build(method, seed=0, backend="masked"):
    torch.manual_seed(0)
    model = tiny_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sp = st.make_sparsifier(method, model, opt, density=0.2, total_steps=STEPS, seed=seed,
                            backend=backend, **schedule_kwargs(method, 4))
    return model, opt, sp


@pytest.mark.parametrize("split", [13, 15])  # 15: saved the step before an update (at 16)
@pytest.mark.parametrize("method,backend", PAIRS)
def test_resume_is_exact(method, backend, split, tmp_path):
    SPLIT = split
    data = batches(STEPS)
    model, opt, sp = build(method, backend=backend)
    for x, y in data:
        train_step(model, opt, sp, x, y)

    model_a, opt_a, sp_a = build(method, backend=backend)
    for x, y in data[:SPLIT]:
        train_step(model_a, opt_a, sp_a, x, y)
    checkpoint = save_checkpoint(tmp_path / "checkpoint.pt", model_a, opt_a, sp_a)
    model_b, opt_b, sp_b = build(method, seed=123, backend=backend)  # the saved seed wins
    model_b.load_state_dict(checkpoint["model"])
    opt_b.load_state_dict(checkpoint["optimizer"])
    with pytest.warns(UserWarning, match="seed"):
        sp_b.load_state_dict(checkpoint["sparsifier"])
    assert sp_b.step_count == SPLIT
    for x, y in data[SPLIT:]:
        train_step(model_b, opt_b, sp_b, x, y)

    for name in sp.masks:
        assert torch.equal(sp.masks[name], sp_b.masks[name]), name
    for (name, p), p_b in zip(model.named_parameters(), model_b.parameters()):
        assert torch.equal(p, p_b), name
    assert sp.ever_active_fraction() == sp_b.ever_active_fraction()


def test_state_dict_is_plain_data(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = st.SNFS(model, opt, density=0.5, total_steps=10).state_dict()
    assert state["method"] == "snfs" and state["step_count"] == 0
    names = {"conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"}
    assert set(state["positions"]) == set(state["ever_active"]) == names
    assert all(p.dtype == torch.int64 and p.dim() == 1 for p in state["positions"].values())
    assert state["config"]["t_end"] == 7 and state["config"]["distribution"] == "erk"


def test_load_rejects_other_methods_and_shapes(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rigl = st.RigL(model, opt, density=0.5, total_steps=10)
    with pytest.raises(ValueError, match="of method 'set'"):
        rigl.load_state_dict(st.SET(model, opt, density=0.5, total_steps=10).state_dict())
    state = rigl.state_dict()
    state["positions"]["fc1.weight"] = torch.ones(3, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"masks\['fc1.weight'\] has shape \(3, 3\)"):
        rigl.load_state_dict(state)
    with pytest.raises(ValueError, match="not a sparsetrain sparsifier state_dict"):
        rigl.load_state_dict({"weights": 1})
