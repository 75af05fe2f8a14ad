"""The training-loop contract of every method on every backend: clipping by the active
gradients, GradScaler (skipped steps never update), gradient accumulation, bf16 autocast, and
optimizers stepped by someone else (``hook_optimizer``)."""

import math
import warnings

import pytest
import torch
from torch import nn

import sparsetrain as st
from tests.conftest import batches, schedule_kwargs, tiny_cnn

PAIRS = st.supported_pairs()
DYNAMIC = [(m, b) for m, b in PAIRS if st.get_method(m).update_reads_gradient]


def build(method, backend, total_steps=24, delta_t=4, **kwargs):
    torch.manual_seed(0)
    model = tiny_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = st.make_sparsifier(method, model, opt, density=0.3, total_steps=total_steps,
                            backend=backend, **schedule_kwargs(method, delta_t, alpha=0.5),
                            **kwargs)
    return model, opt, sp


def loss_of(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("method,backend", PAIRS)
def test_clip_grad_norm_counts_active_gradients_only(method, backend):
    model, opt, sp = build(method, backend)
    x, y = batches(1)[0]
    loss_of(model, x, y).backward()
    masks, parts = sp.masks, []
    holders = {id(sp.backend.gradient_parameter(n)): n for n in sp.names}
    for p in model.parameters():
        name = holders.get(id(p))
        if p.grad is None:
            continue
        if name is not None and p.shape == sp.backend.shape(name):
            parts.append(p.grad[masks[name]])
        else:  # a dense weight, or a CSR layer's values: every gradient entry is active
            parts.append(p.grad)
    expected = torch.cat([g.reshape(-1) for g in parts]).norm()
    before = {id(p): p.grad.clone() for p in model.parameters() if p.grad is not None}
    total = sp.clip_grad_norm_(0.5 * float(expected))
    assert math.isclose(float(total), float(expected), rel_tol=1e-5)
    for p in model.parameters():  # every gradient scaled by one factor: rankings unchanged
        if p.grad is not None:
            assert torch.allclose(p.grad, before[id(p)] * 0.5, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("method,backend", DYNAMIC)
def test_clipping_leaves_the_update_its_choice(method, backend):
    results = []
    for clip in (None, 1e-3):
        model, opt, sp = build(method, backend)
        for x, y in batches(9):
            opt.zero_grad()
            loss_of(model, x, y).backward()
            if sp.is_update_step(sp.step_count + 1):
                if sp.optimizer_step_on_update:  # the optimizer steps before the update (GraNet):
                    for group in opt.param_groups:  # at lr 0 both runs update the same weights
                        group["lr"] = 0.0
                if clip is not None:
                    sp.clip_grad_norm_(clip)  # clipped hard on the update step
            sp.step()
            if sp.is_update_step(sp.step_count):
                break
        results.append(sp.mask_fingerprint())
        grown = sp.ever_active_fraction()
    assert torch.equal(*results)
    assert grown > 0.3  # the update grew new weights, not only ties


@pytest.mark.parametrize("method,backend", DYNAMIC)
def test_masking_gradients_before_an_update_warns(method, backend):
    model, opt, sp = build(method, backend, delta_t=2)
    if all(bool(m.all()) for m in sp.masks.values()):
        pytest.skip("a dense start (GraNet): masking by all-ones masks hides no gradient")
    for t, (x, y) in enumerate(batches(2), start=1):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        if t == 2:
            for name, p in model.named_parameters():  # what a user's own masking does
                if p.grad is not None and name in sp.names and p.grad.shape == p.shape:
                    p.grad.mul_(sp.masks[name])
            for name in sp.names:
                layer = sp.backend.gradient_parameter(name)
                if layer.shape != sp.backend.shape(name):
                    pytest.skip("a CSR layer's dense gradient is not held in .grad")
            with pytest.warns(RuntimeWarning, match="tie order alone"):
                sp.step()
        else:
            sp.step()


@pytest.mark.parametrize("method,backend", DYNAMIC)
def test_no_blind_update_warning_in_a_normal_run(method, backend):
    model, opt, sp = build(method, backend, delta_t=2)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*tie order alone")
        for x, y in batches(6):
            opt.zero_grad()
            loss_of(model, x, y).backward()
            sp.step()


@pytest.mark.parametrize("method,backend", PAIRS)
def test_a_step_the_scaler_skips_changes_nothing(method, backend):
    model, opt, sp = build(method, backend, delta_t=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    data = batches(4)
    for x, y in data[:1]:
        opt.zero_grad()
        scaler.scale(loss_of(model, x, y)).backward()
        sp.step(scaler=scaler)
        scaler.update()
    assert sp.step_count == 1
    masks, before = sp.mask_fingerprint(), weights(model)
    x, y = data[1]
    opt.zero_grad()
    scaler.scale(loss_of(model, x, y)).backward()
    next(iter(model.parameters())).grad.view(-1)[0] = float("inf")  # an overflow
    sp.clip_grad_norm_(1.0, scaler=scaler)
    assert sp.step(scaler=scaler) is None
    scaler.update()
    assert sp.step_count == 1 and torch.equal(sp.mask_fingerprint(), masks)
    assert all(torch.equal(a, b) for a, b in zip(weights(model), before))
    assert scaler.get_scale() == 2.0 ** 9  # the scaler saw the skip
    for x, y in data[2:]:  # then steps count again, and step 2 updates
        opt.zero_grad()
        scaler.scale(loss_of(model, x, y)).backward()
        sp.clip_grad_norm_(1.0, scaler=scaler)
        sp.step(scaler=scaler)
        scaler.update()
    assert sp.step_count == 3


@pytest.mark.parametrize("method,backend", PAIRS)
def test_scaled_steps_match_unscaled_ones(method, backend):
    runs = []
    for scale in (None, 2.0 ** 8):
        model, opt, sp = build(method, backend, delta_t=3)
        scaler = torch.amp.GradScaler("cpu", init_scale=scale) if scale else None
        for x, y in batches(8):
            opt.zero_grad()
            loss = loss_of(model, x, y)
            (scaler.scale(loss) if scaler else loss).backward()
            sp.step(scaler=scaler)
            if scaler:
                scaler.update()
        runs.append((sp.mask_fingerprint(), weights(model)))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(runs[0][1], runs[1][1]))


@pytest.mark.parametrize("method,backend", PAIRS)
def test_gradient_accumulation_is_one_big_batch(method, backend):
    runs = []
    for parts in (1, 2):
        model, opt, sp = build(method, backend, delta_t=3)
        model.eval()  # batch norm's statistics are per micro-batch in training mode
        for x, y in batches(7, batch=8):
            opt.zero_grad()
            for xs, ys in zip(x.chunk(parts), y.chunk(parts)):
                (loss_of(model, xs, ys) / parts).backward()
            sp.step()
        runs.append((sp.mask_fingerprint(), weights(model)))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(runs[0][1], runs[1][1]))


@pytest.mark.parametrize("method,backend", PAIRS)
def test_hooked_optimizer_is_the_same_run(method, backend):
    runs = []
    for way in ("step", "hooked", "hooked-closure"):
        model, opt, sp = build(method, backend, delta_t=3)
        if way != "step":
            handle = sp.hook_optimizer()
        for x, y in batches(10):
            def closure():  # as Lightning steps: the gradients are made inside step()
                opt.zero_grad()
                loss = loss_of(model, x, y)
                loss.backward()
                return loss
            if way == "hooked-closure":
                assert opt.step(closure) is not None
                continue
            closure()
            opt.step() if way == "hooked" else sp.step()
        runs.append((sp.mask_fingerprint(), weights(model), sp.step_count))
        if way != "step":
            handle.remove()
            assert sp._hooks is None
    assert [r[2] for r in runs] == [10, 10, 10]
    for other in runs[1:]:
        assert torch.equal(runs[0][0], other[0])
        assert all(torch.equal(a, b) for a, b in zip(runs[0][1], other[1]))


@pytest.mark.parametrize("method,backend", PAIRS)
def test_bf16_autocast_keeps_the_invariants(method, backend):
    model, opt, sp = build(method, backend, delta_t=2)
    counts = sp.active_counts()
    for x, y in batches(6):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_of(model, x, y)
        loss.backward()
        sp.clip_grad_norm_(1.0)
        sp.step()
    if sp.fixed_budget:
        assert sp.active_counts() == counts
    for name, mask in sp.masks.items():
        assert torch.count_nonzero(sp.backend.dense_weight(name)[~mask]) == 0
