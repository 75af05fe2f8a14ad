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



def window(sp):
    """Every step of a window around an update (at 16 for delta_t = 4): saved three and two
    steps before it, the step before (the coming step's gradient must be recorded), at it, and
    two steps after it. Around step 16 for a method that never updates."""
    update = next((t for t in range(14, STEPS) if sp.is_update_step(t)), 16)
    return range(update - 3, update + 3)


@pytest.mark.parametrize("method,backend", PAIRS)
def test_resume_is_exact_at_every_step_around_an_update(method, backend, tmp_path):
    data = batches(STEPS)
    model, opt, sp = build(method, backend=backend)
    for x, y in data:
        train_step(model, opt, sp, x, y)
    for split in window(sp):
        model_a, opt_a, sp_a = build(method, backend=backend)
        for x, y in data[:split]:
            train_step(model_a, opt_a, sp_a, x, y)
        checkpoint = save_checkpoint(tmp_path / "checkpoint.pt", model_a, opt_a, sp_a)
        model_b, opt_b, sp_b = build(method, seed=123, backend=backend)  # the saved seed wins
        model_b.load_state_dict(checkpoint["model"])
        opt_b.load_state_dict(checkpoint["optimizer"])
        with pytest.warns(UserWarning, match="seed"):
            sp_b.load_state_dict(checkpoint["sparsifier"])
        assert sp_b.step_count == split
        for x, y in data[split:]:
            train_step(model_b, opt_b, sp_b, x, y)

        for name in sp.masks:
            assert torch.equal(sp.masks[name], sp_b.masks[name]), f"{name}, saved at {split}"
        for (name, p), p_b in zip(model.named_parameters(), model_b.parameters()):
            assert torch.equal(p, p_b), f"{name}, saved at step {split}"
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
