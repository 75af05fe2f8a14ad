"""Property-based: ``load_state_dict`` of a mutated ``state_dict()`` either loads a state that
keeps every invariant, or raises ``ValueError`` and changes nothing; never another exception.

``pytest -m fuzz --hypothesis-profile long tests/methods/test_state_fuzz.py`` runs it at
length."""

import copy
import functools
import math
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as hs
from torch import nn

import sparsetrain as st

TOTAL = 30
SHAPES = {"0.weight": (20, 12), "2.weight": (16, 20), "4.weight": (4, 16)}
WEIRD = [None, 0, -1, 1.5, float("nan"), "x", True, [], [1, 2], {}, {"a": 1}, (3,),
         torch.tensor(3), torch.ones(3), torch.zeros(2, 2, dtype=torch.bool),
         torch.arange(5), torch.arange(5).to_sparse()]
NAMES = [*SHAPES, "9.weight", "0.bias", "", 3]
DTYPES = [torch.int32, torch.int16, torch.uint8, torch.float32, torch.float64, torch.float16,
          torch.bool, torch.complex64, torch.uint16]


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 16), nn.ReLU(),
                         nn.Linear(16, 4))


def build(method, seed=0):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    options = dict(density=0.3, total_steps=TOTAL, seed=seed)
    if method == "gmp":
        options.update(start_step=3, end_step=20, frequency=4, initial_density=0.8)
    else:
        options.update(delta_t=3)
    return model, opt, st.make_sparsifier(method, model, opt, **options)


def step(model, opt, sp, g):
    opt.zero_grad()
    x = torch.randn(8, 12, generator=g)
    nn.functional.cross_entropy(model(x), torch.randint(0, 4, (8,), generator=g)).backward()
    sp.step()


@functools.lru_cache(maxsize=None)
def source_state(method, steps):
    """A valid state of another run (other seed) after ``steps`` steps."""
    model, opt, sp = build(method, seed=7)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        step(model, opt, sp, g)
    return sp.state_dict()


def positions(data, name):
    """An active set for layer ``name``, in a valid form or not."""
    numel = math.prod(SHAPES.get(name, (7,)))
    count = data.draw(hs.integers(0, numel), label="count")
    seed = data.draw(hs.integers(0, 2 ** 16), label="seed")
    subset = torch.randperm(numel, generator=torch.Generator().manual_seed(seed))[:count]
    subset = subset.sort().values
    kind = data.draw(hs.sampled_from(["subset", "shuffled", "duplicated", "beyond", "negative",
                                      "dtype", "mask", "sparse", "2-d", "weird"]),
                     label="kind")
    if kind == "shuffled":
        return subset.flip(0)
    if kind == "duplicated" and count:
        return torch.cat([subset[:1], subset]).sort().values
    if kind == "beyond":
        return torch.cat([subset, torch.tensor([numel + data.draw(hs.integers(0, 2 ** 40))])])
    if kind == "negative":
        return torch.cat([torch.tensor([-data.draw(hs.integers(1, 2 ** 40))]), subset])
    if kind == "dtype":
        return subset.to(data.draw(hs.sampled_from(DTYPES)))
    if kind == "mask":
        shape = data.draw(hs.sampled_from([*SHAPES.values(), (numel,), (2, 3)]))
        mask = torch.zeros(math.prod(shape), dtype=torch.bool)
        mask[subset[subset < mask.numel()]] = True
        return mask.view(shape).to(data.draw(hs.sampled_from([torch.bool, *DTYPES])))
    if kind == "sparse":
        return subset.to_sparse()
    if kind == "2-d":
        return subset.view(1, -1)
    if kind == "weird":
        return data.draw(hs.sampled_from(WEIRD))
    return subset


def mutate(state, data, method):
    """One mutation of ``state`` (in place)."""
    op = data.draw(hs.sampled_from(["drop_key", "set_key", "step", "method", "layer",
                                    "drop_layer", "config", "method_state"]), label="op")
    if op == "drop_key" and state:
        del state[data.draw(hs.sampled_from(sorted(state, key=repr)))]
    elif op == "set_key":
        key = data.draw(hs.sampled_from([*STATE_KEYS, "masks", "extra"]))
        state[key] = data.draw(hs.sampled_from(WEIRD))
    elif op == "step":
        state["step_count"] = data.draw(hs.one_of(
            hs.integers(-3, TOTAL + 3), hs.integers(-2 ** 70, 2 ** 70),
            hs.floats(allow_nan=True), hs.sampled_from(WEIRD)))
    elif op == "method":
        state["method"] = data.draw(hs.sampled_from(["rigl", "gmp", "snfs", "set", "", "RigL",
                                                     3, None, torch.tensor(1)]))
    elif op in ("layer", "drop_layer"):
        key = data.draw(hs.sampled_from(["positions", "ever_active", "masks"]))
        if not isinstance(state.get(key), dict):
            state[key] = {}
        name = data.draw(hs.sampled_from(NAMES))
        if op == "layer":
            state[key][name] = positions(data, name if name in SHAPES else "0.weight")
        else:
            state[key].pop(name, None)
    elif op == "config" and isinstance(state.get("config"), dict):
        key = data.draw(hs.sampled_from([*sorted(state["config"], key=repr), "seed", 5]))
        state["config"][key] = data.draw(hs.one_of(hs.sampled_from(WEIRD), hs.integers()))
    elif op == "method_state" and isinstance(state.get("method_state"), dict):
        name = data.draw(hs.sampled_from(NAMES))
        shape = data.draw(hs.sampled_from([SHAPES.get(name, (2,)), (3,), ()]))
        value = data.draw(hs.sampled_from([
            torch.zeros(shape), torch.zeros(shape, dtype=torch.int64),
            torch.full(shape, float("nan")), *WEIRD]))
        ema = data.draw(hs.sampled_from([{name: value}, value]))
        state["method_state"]["gradient_ema"] = ema


STATE_KEYS = ["method", "step_count", "positions", "ever_active", "config", "method_state"]


def snapshot(sp):
    b = sp.backend
    return (sp.step_count, sp.seed,
            {n: b.active_positions(n).clone() for n in b.names},
            {n: b.ever_active_positions(n).clone() for n in b.names},
            {n: e.clone() for n, e in getattr(sp, "gradient_ema", {}).items()})


def unchanged(a, b):
    return a[:2] == b[:2] and all(
        x.keys() == y.keys() and all(torch.equal(x[n], y[n]) for n in x)
        for x, y in zip(a[2:], b[2:]))


def check_invariants(sp, model, opt, counts_before):
    assert 0 <= sp.step_count <= sp.total_steps
    counts = sp.active_counts()
    allowed = sp.allowed_counts(sp.step_count)
    for name in sp.names:
        low, high = allowed[name]
        assert low <= counts[name] <= high, name
        p = sp.active_positions(name)
        assert p.dtype == torch.int64 and bool((p[1:] > p[:-1]).all()), name
        mask = sp.masks[name]
        assert torch.count_nonzero(sp.backend.dense_weight(name)[~mask]) == 0, name
        for state in sp.backend.dense_state(name):
            assert torch.count_nonzero(state[~mask]) == 0, name
    if sp.fixed_budget:
        assert counts == counts_before
    if sp.step_count < sp.total_steps:  # and training goes on from it
        step(model, opt, sp, torch.Generator().manual_seed(2))


def load_mutated(method, data):
    steps = data.draw(hs.sampled_from([0, 5, 13, 21, TOTAL]), label="saved step")
    state = copy.deepcopy(source_state(method, steps))
    if data.draw(hs.booleans(), label="old format"):  # bool masks, as earlier versions saved
        state["masks"] = {n: torch.zeros(math.prod(SHAPES[n]), dtype=torch.bool)
                          .index_fill_(0, p, True).view(SHAPES[n])
                          for n, p in state.pop("positions").items()}
        state.pop("ever_active")
    for _ in range(data.draw(hs.integers(0, 3), label="mutations")):
        mutate(state, data, method)
    model, opt, sp = build(method)
    g = torch.Generator().manual_seed(3)
    step(model, opt, sp, g)  # optimizer state to keep at zero
    before, counts = snapshot(sp), sp.active_counts()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            sp.load_state_dict(state)
        except ValueError as error:
            assert "\n" not in str(error)
            assert unchanged(before, snapshot(sp)), "a refused state changed the sparsifier"
            return
        check_invariants(sp, model, opt, counts)


@pytest.mark.fuzz
@given(data=hs.data())
def test_rigl_loads_or_refuses_mutated_states(data):
    load_mutated("rigl", data)


@pytest.mark.fuzz
@given(data=hs.data())
def test_gmp_loads_or_refuses_mutated_states(data):
    load_mutated("gmp", data)


@pytest.mark.fuzz
@given(data=hs.data())
def test_snfs_loads_or_refuses_mutated_states(data):
    load_mutated("snfs", data)
