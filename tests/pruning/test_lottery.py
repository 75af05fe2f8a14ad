"""LotteryTicket: exact counts per round, magnitude pruning, rewinding, history, checkpoints."""

import io
import math

import pytest
import torch
from torch import nn

from sparsetrain.methods import Static
from sparsetrain.pruning.lottery import LotteryRound, LotteryTicket, keep_count, run_lottery_ticket
from tests.conftest import batches, tiny_cnn, train_step

WEIGHTS = ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]


def tiny_mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))


@torch.no_grad()
def fake_training(ticket, generator):
    """Stand-in for a round of training: new random weights, pruned weights kept at zero."""
    params = dict(ticket.model.named_parameters())
    for p in ticket.model.parameters():
        p.copy_(torch.randn(p.shape, generator=generator))
    for name, mask in ticket.masks.items():
        params[name].mul_(mask)


def counts(masks):
    return {n: int(m.sum()) for n, m in masks.items()}


def reference_global(weights, masks, n_keep):
    """Slow reference: sort every active (|w|, layer, index) and keep the n_keep largest."""
    entries = []
    for name, w in weights.items():
        values, active = w.reshape(-1).tolist(), masks[name].reshape(-1).tolist()
        entries += [(abs(v), name, i) for i, (v, a) in enumerate(zip(values, active)) if a]
    entries.sort(reverse=True)
    kept = {(name, i) for _, name, i in entries[:n_keep]}
    return {
        name: torch.tensor([(name, i) in kept for i in range(w.numel())]).view(w.shape)
        for name, w in weights.items()
    }


def reference_layer(w, mask, n_keep):
    pairs = zip(w.reshape(-1).tolist(), mask.reshape(-1).tolist())
    values = sorted(((abs(v), i) for i, (v, a) in enumerate(pairs) if a), reverse=True)
    kept = {i for _, i in values[:n_keep]}
    return torch.tensor([i in kept for i in range(w.numel())]).view(w.shape)


# --- counts and selection -----------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:keeping the")  # the keep-one-per-layer rescue, tested below
@pytest.mark.parametrize("prune_fraction", [0.2, 0.5, 0.9])
def test_global_counts_are_exact_every_round(prune_fraction):
    model = tiny_cnn()
    ticket = LotteryTicket(model, rounds=6, prune_fraction=prune_fraction)
    generator = torch.Generator().manual_seed(0)
    total = ticket.total
    expected = total
    assert sorted(ticket.masks) == WEIGHTS
    assert all(bool(m.all()) for m in ticket.masks.values())
    assert ticket.density == 1.0
    for _ in range(6):
        fake_training(ticket, generator)
        ticket.end_round()
        expected = max(len(WEIGHTS), round(expected * (1 - prune_fraction)))
        assert ticket.active == expected
        assert ticket.density == expected / total
        assert all(n >= 1 for n in counts(ticket.masks).values())


@pytest.mark.parametrize("prune_fraction", [0.2, 0.5, 0.9])
def test_layer_counts_are_exact_every_round(prune_fraction):
    model = tiny_cnn()
    ticket = LotteryTicket(model, rounds=5, prune_fraction=prune_fraction, scope="layer")
    generator = torch.Generator().manual_seed(0)
    expected = {n: p.numel() for n, p in model.named_parameters() if n in WEIGHTS}
    for _ in range(5):
        fake_training(ticket, generator)
        ticket.end_round()
        expected = {n: max(1, round(c * (1 - prune_fraction))) for n, c in expected.items()}
        assert counts(ticket.masks) == expected


def test_keep_count():
    assert keep_count(100, 0.2) == 80
    assert keep_count(10, 0.25) == 8  # round(7.5) -> 8
    assert keep_count(1, 0.5) == 1
    assert keep_count(3, 0.9) == 1


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_pruning_removes_the_smallest_magnitudes(scope):
    model = tiny_mlp()
    ticket = LotteryTicket(model, rounds=4, prune_fraction=0.3, scope=scope)
    generator = torch.Generator().manual_seed(3)
    for _ in range(4):
        fake_training(ticket, generator)
        params = dict(model.named_parameters())
        weights = {n: params[n].detach().clone() for n in ticket.masks}
        before = ticket.masks
        ticket.end_round()
        after = ticket.masks
        if scope == "global":
            n_keep = max(3, round(sum(counts(before).values()) * 0.7))
            assert counts(after) and all(c >= 1 for c in counts(after).values())
            if all(c > 1 for c in counts(after).values()):
                expected = reference_global(weights, before, n_keep)
                assert all(torch.equal(after[n], expected[n]) for n in after)
        else:
            for n in after:
                n_keep = keep_count(int(before[n].sum()), 0.3)
                expected = reference_layer(weights[n], before[n], n_keep)
                assert torch.equal(after[n], expected)
        for n in after:  # a pruned weight never comes back
            assert not bool((after[n] & ~before[n]).any())


def test_global_scope_prunes_unevenly_and_layer_scope_evenly():
    def model_with_a_large_layer():
        model = tiny_mlp()
        with torch.no_grad():  # every weight of layer 0 larger than any other weight
            model[0].weight.copy_(model[0].weight.sign() * (10 + model[0].weight.abs()))
        return model

    model = model_with_a_large_layer()
    sizes = {n: p.numel() for n, p in model.named_parameters() if n.endswith("weight")}
    global_ticket = LotteryTicket(model, rounds=1, prune_fraction=0.4)
    global_ticket.end_round()
    global_counts = counts(global_ticket.masks)
    assert global_counts["0.weight"] == sizes["0.weight"]
    assert sum(global_counts.values()) == round(sum(sizes.values()) * 0.6)

    model = model_with_a_large_layer()
    layer_ticket = LotteryTicket(model, rounds=1, prune_fraction=0.4, scope="layer")
    layer_ticket.end_round()
    assert counts(layer_ticket.masks) == {n: round(s * 0.6) for n, s in sizes.items()}


def test_global_scope_keeps_one_weight_in_a_layer_it_would_empty():
    model = tiny_mlp()
    with torch.no_grad():
        model[4].weight.mul_(1e-6)  # every weight of the last layer is smaller than the rest
    ticket = LotteryTicket(model, rounds=1, prune_fraction=0.5)
    with pytest.warns(RuntimeWarning, match=r"\['4.weight'\]"):
        ticket.end_round()
    masks = ticket.masks
    assert int(masks["4.weight"].sum()) == 1
    w = model[4].weight.detach()  # after the rewind the kept weight is the largest at init
    initial = tiny_mlp()[4].weight.detach() * 1e-6
    assert int(masks["4.weight"].view(-1).nonzero()) == int(initial.abs().argmax())
    total = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight"))
    assert ticket.active == round(total * 0.5)
    assert bool((w[~masks["4.weight"]] == 0).all())


# --- rewinding ----------------------------------------------------------------------------

@pytest.mark.parametrize("rewind_step", [0, 3])
def test_rewind_restores_the_step_k_state_with_pruned_weights_zero(rewind_step):
    torch.manual_seed(0)
    model = tiny_cnn()
    ticket = LotteryTicket(model, rounds=2, prune_fraction=0.4, rewind_step=rewind_step)
    assert ticket.has_rewind_point == (rewind_step == 0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = Static(model, optimizer, density=ticket.density, total_steps=6,
                        masks=ticket.masks)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    for step, (x, y) in enumerate(batches(6), start=1):
        train_step(model, optimizer, sparsifier, x, y)
        captured = ticket.observe_step(step)
        assert captured == (step == rewind_step)
        if step == rewind_step:
            snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    assert not torch.equal(trained["bn1.running_mean"], snapshot["bn1.running_mean"])

    record = ticket.end_round(accuracy=0.5)
    assert record.round == 0 and record.density == 1.0
    state = model.state_dict()
    masks = ticket.masks
    for key, value in state.items():
        if key in masks:
            assert torch.equal(value[masks[key]], snapshot[key][masks[key]])
            assert bool((value[~masks[key]] == 0).all())
            assert bool((~masks[key]).any())
        else:  # biases, BatchNorm parameters and running statistics: all rewound
            assert torch.equal(value, snapshot[key]), key
    assert ticket.start_step == rewind_step


def test_capture_rewind_point_by_hand_and_its_errors():
    model = tiny_mlp()
    ticket = LotteryTicket(model, rounds=2, rewind_step=5)
    with pytest.raises(RuntimeError, match="observe_step"):
        ticket.end_round()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    expected = model[0].weight.detach().clone()
    ticket.capture_rewind_point()
    assert not ticket.observe_step(5)  # already captured: the explicit capture stands
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    ticket.end_round()
    mask = ticket.masks["0.weight"]
    assert torch.equal(model[0].weight.detach()[mask], expected[mask])
    with pytest.raises(RuntimeError, match="round 0"):
        ticket.capture_rewind_point()
    assert not ticket.observe_step(5)


def test_last_round_records_without_pruning_or_rewinding():
    model = tiny_mlp()
    ticket = LotteryTicket(model, rounds=1)
    ticket.end_round(accuracy=0.9)
    with torch.no_grad():
        model[0].weight.mul_(2.0)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    masks = ticket.masks
    record = ticket.end_round(accuracy=0.8)
    assert ticket.done and ticket.round == 2
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(ticket.masks[n], masks[n]) for n in masks)
    assert record.round == 1 and record.accuracy == 0.8
    with pytest.raises(RuntimeError, match="already ended"):
        ticket.end_round()


# --- history, iteration, checkpoints ------------------------------------------------------

def test_history_keeps_every_round():
    model = tiny_cnn()
    ticket = LotteryTicket(model, rounds=3, prune_fraction=0.5)
    generator = torch.Generator().manual_seed(0)
    seen = []
    for r in ticket.rounds_iter():
        seen.append((r, ticket.active))
        fake_training(ticket, generator)
        ticket.end_round(accuracy=0.1 * r)
    assert [r for r, _ in seen] == [0, 1, 2, 3]
    history = ticket.history
    assert [h.round for h in history] == [0, 1, 2, 3]
    assert [h.accuracy for h in history] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert [h.active for h in history] == [a for _, a in seen]
    assert all(h.total == ticket.total for h in history)
    assert history[0].density == 1.0
    assert all(math.isclose(h.density, h.active / h.total) for h in history)
    for earlier, later in zip(history, history[1:]):
        assert set(earlier.masks) == set(WEIGHTS)
        for n in WEIGHTS:
            assert not bool((later.masks[n] & ~earlier.masks[n]).any())
            assert later.masks[n].device.type == "cpu"
    assert torch.equal(history[-1].masks["fc1.weight"], ticket.masks["fc1.weight"].cpu())


def test_rounds_iter_refuses_to_repeat_a_round():
    ticket = LotteryTicket(tiny_mlp(), rounds=2)
    iterator = ticket.rounds_iter()
    assert next(iterator) == 0
    with pytest.raises(RuntimeError, match="end_round"):
        next(iterator)


def test_accuracy_must_be_a_number():
    ticket = LotteryTicket(tiny_mlp(), rounds=1)
    with pytest.raises(ValueError, match="accuracy"):
        ticket.end_round(accuracy="high")


def _saved(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("rewind_step", [0, 2])
def test_state_dict_round_trip_resumes_between_rounds(rewind_step):
    def run(stop_after=None):
        torch.manual_seed(0)
        model = tiny_cnn()
        ticket = LotteryTicket(model, rounds=3, prune_fraction=0.3, rewind_step=rewind_step,
                               seed=4)
        generator = torch.Generator().manual_seed(1)
        for r in ticket.rounds_iter():
            if r == 0:
                for step in range(1, 4):
                    fake_training(ticket, generator)
                    ticket.observe_step(step)
            fake_training(ticket, generator)
            ticket.end_round(accuracy=float(r))
            if r == stop_after:
                return ticket, generator
        return ticket, generator

    straight, _ = run()
    stopped, generator = run(stop_after=1)
    state = _saved(stopped.state_dict())

    torch.manual_seed(123)
    model = tiny_cnn()  # a fresh model with other weights
    resumed = LotteryTicket(model, rounds=3, prune_fraction=0.3, rewind_step=rewind_step, seed=4)
    resumed.load_state_dict(state)
    assert resumed.round == 2 and len(resumed.history) == 2
    resumed.rewind()  # the weights of a finished round: the rewind point with pruned ones zero
    assert all(torch.equal(v, stopped.model.state_dict()[k]) for k, v in model.state_dict().items())
    for r in resumed.rounds_iter():
        fake_training(resumed, generator)
        resumed.end_round(accuracy=float(r))
    assert resumed.done
    assert [h.accuracy for h in resumed.history] == [h.accuracy for h in straight.history]
    for a, b in zip(resumed.history, straight.history):
        assert a.active == b.active
        assert all(torch.equal(a.masks[n], b.masks[n]) for n in WEIGHTS)
    assert all(torch.equal(v, straight.model.state_dict()[k])
               for k, v in model.state_dict().items())


def test_state_dict_holds_only_safe_values_and_loads_before_any_round():
    ticket = LotteryTicket(tiny_mlp(), rounds=2, rewind_step=4)
    state = _saved(ticket.state_dict())  # no rewind point yet: None
    assert state["rewind_point"] is None and state["history"] == []
    other = LotteryTicket(tiny_mlp(), rounds=2, rewind_step=4)
    other.load_state_dict(state)
    assert not other.has_rewind_point and other.round == 0
    original = LotteryRound(0, 1.0, 3, 3, {"w": torch.ones(3, dtype=torch.bool)}, None)
    record = LotteryRound.from_dict(_saved(original.to_dict()))
    assert record.accuracy is None and bool(record.masks["w"].all())


def test_load_state_dict_checks_what_it_loads():
    ticket = LotteryTicket(tiny_mlp(), rounds=2)
    ticket.end_round()
    state = ticket.state_dict()
    with pytest.raises(ValueError, match="not a sparsetrain LotteryTicket"):
        ticket.load_state_dict({"masks": {}})
    with pytest.raises(ValueError, match="missing names"):
        LotteryTicket(tiny_mlp(), rounds=2, dense_layers=["0"]).load_state_dict(state)
    short = LotteryTicket(tiny_mlp(), rounds=1)
    with pytest.warns(UserWarning, match="rounds"):
        short.load_state_dict(state)  # 1 finished round fits in 2
    ticket.end_round()
    ticket.end_round()
    with pytest.raises(ValueError, match="finished rounds"):
        short.load_state_dict(ticket.state_dict())
    with pytest.warns(UserWarning, match="prune_fraction"):
        LotteryTicket(tiny_mlp(), rounds=2, prune_fraction=0.5).load_state_dict(state)


# --- with the sparsifiers -----------------------------------------------------------------

def test_dense_layers_are_never_pruned_and_masks_fit_static():
    model = tiny_cnn()
    ticket = LotteryTicket(model, rounds=2, prune_fraction=0.5, dense_layers=["fc2"])
    assert sorted(ticket.masks) == ["conv1.weight", "conv2.weight", "fc1.weight"]
    generator = torch.Generator().manual_seed(0)
    fake_training(ticket, generator)
    ticket.end_round()
    assert bool((model.fc2.weight != 0).all())
    assert ticket.layer_densities()["fc2.weight"] == 1.0
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = Static(model, optimizer, density=ticket.density, total_steps=2,
                        masks=ticket.masks, dense_layers=["fc2"])
    assert all(torch.equal(sparsifier.masks[n], m) for n, m in ticket.masks.items())


def test_run_lottery_ticket_trains_every_round_with_its_ticket():
    torch.manual_seed(0)
    model = tiny_cnn()
    data = batches(5)
    calls = []

    def train(model, optimizer, sparsifier, start_step, on_step):
        calls.append((start_step, sparsifier.overall_density()))
        for step in range(start_step, len(data)):
            train_step(model, optimizer, sparsifier, *data[step])
            on_step(step + 1)
            for name, mask in sparsifier.masks.items():
                assert bool((dict(model.named_parameters())[name][~mask] == 0).all())
        return 0.25

    ticket = run_lottery_ticket(
        model, lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), train,
        rounds=3, total_steps=len(data), prune_fraction=0.5, rewind_step=2,
    )
    assert ticket.done
    assert [s for s, _ in calls] == [0, 2, 2, 2]
    assert [d for _, d in calls] == pytest.approx([h.density for h in ticket.history])
    assert [h.accuracy for h in ticket.history] == [0.25] * 4
    assert ticket.history[-1].density == pytest.approx(0.125, abs=0.01)


def test_run_lottery_ticket_errors():
    model = tiny_mlp()
    make = lambda m: torch.optim.SGD(m.parameters(), lr=0.1)  # noqa: E731
    with pytest.raises(ValueError, match="rewind_step"):
        run_lottery_ticket(model, make, lambda *a: None, rounds=1, total_steps=3, rewind_step=3)
    with pytest.raises(ValueError, match="total_steps"):
        run_lottery_ticket(model, make, lambda *a: None, rounds=1, total_steps=0)
    with pytest.raises(ValueError, match="callable"):
        run_lottery_ticket(model, None, lambda *a: None, rounds=1, total_steps=3)


# --- bad arguments ------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"rounds": 0}, "rounds"),
        ({"rounds": -2}, "rounds"),
        ({"rounds": 1.5}, "rounds"),
        ({"rounds": True}, "rounds"),
        ({"rounds": 2, "prune_fraction": 0.0}, "prune_fraction"),
        ({"rounds": 2, "prune_fraction": 1.0}, "prune_fraction"),
        ({"rounds": 2, "prune_fraction": -0.1}, "prune_fraction"),
        ({"rounds": 2, "prune_fraction": "0.2"}, "prune_fraction"),
        ({"rounds": 2, "prune_fraction": float("nan")}, "prune_fraction"),
        ({"rounds": 2, "rewind_step": -1}, "rewind_step"),
        ({"rounds": 2, "rewind_step": 2.0}, "rewind_step"),
        ({"rounds": 2, "scope": "local"}, "scope"),
        ({"rounds": 2, "seed": "zero"}, "seed"),
        ({"rounds": 2, "dense_layers": ["nope"]}, "dense_layers"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_them(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        LotteryTicket(tiny_mlp(), **kwargs)


def test_bad_model_and_step():
    with pytest.raises(ValueError, match="model"):
        LotteryTicket("not a model", rounds=1)
    ticket = LotteryTicket(tiny_mlp(), rounds=1)
    with pytest.raises(ValueError, match="step"):
        ticket.observe_step(-1)


def test_nan_weights_cannot_be_pruned():
    model = tiny_mlp()
    ticket = LotteryTicket(model, rounds=1)
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ticket.end_round()
