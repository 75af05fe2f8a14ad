"""The training-length multiplier (--length, the RigL paper's 2x and 5x runs): epochs and every
schedule stretched together, delta_t kept, FLOPs against dense at length 1, the "long" preset."""

import json
import math
from collections import Counter

import pytest

import sparsetrain as st
from sparsetrain.cli import main
from sparsetrain.methods import get_method
from sparsetrain.runner import ConfigError, Trainer, make_config
from sparsetrain.runner.config import LR_SCHEDULES
from sparsetrain.runner.lr_schedule import LRSchedule
from sparsetrain.runner.build import accepted_keywords
from sparsetrain.runner.sweep import PRESETS, expand_grid

SYNTHETIC = {"n_train": 160, "n_test": 40, "input_shape": [1, 8, 8], "num_classes": 4}
STEPS_PER_EPOCH = 5  # 160 examples in batches of 32


def config(**overrides):
    settings = dict(model="lenet300", data="synthetic", data_options=SYNTHETIC, method="rigl",
                    density=0.2, epochs=4, batch_size=32, lr=0.05, delta_t=3, log_every=5,
                    checkpoint_every=0, progress=False, device="cpu")
    settings.update(overrides)
    return make_config(settings)


def quiet(_message):
    pass


def build(tmp_path, name, **overrides):
    return Trainer(config(**overrides), tmp_path / name, log=quiet)


def test_a_run_at_length_2_trains_twice_the_steps_and_epochs(tmp_path):
    short, long = build(tmp_path, "1x").train(), build(tmp_path, "2x", length=2).train()
    assert short["steps"] == 4 * STEPS_PER_EPOCH and long["steps"] == 2 * short["steps"]
    assert (short["epochs"], short["length"]) == (4, 1.0)
    assert (long["epochs"], long["length"]) == (8, 2.0)
    assert long["config"]["epochs"] == 4 and long["config"]["length"] == 2.0
    records = [json.loads(line) for line in (tmp_path / "2x" / "metrics.jsonl").open()]
    assert [r["epoch"] for r in records if r["kind"] == "eval"] == list(range(1, 9))
    assert "length" not in config().run_name() and "length2.0" in config(length=2).run_name()


def test_a_length_that_keeps_whole_epochs_may_shorten_a_run(tmp_path):
    trainer = build(tmp_path, "half", length=0.5)
    assert trainer.total_steps == 2 * STEPS_PER_EPOCH and config(length=0.5).trained_epochs() == 2


def schedule(k, **settings):
    c = config(length=k, **settings)
    return LRSchedule(c, STEPS_PER_EPOCH, STEPS_PER_EPOCH * c.trained_epochs())


@pytest.mark.parametrize("k", [2, 5])
@pytest.mark.parametrize("warmup", [0, 1])
@pytest.mark.parametrize("kind, extra", [(s, {}) for s in LR_SCHEDULES] + [
    ("step", {"lr_step_epochs": 1}),
    ("multistep", {"lr_milestones": [1, 3]}),       # epochs of the run at length 1
    ("multistep", {"lr_milestones": [0.25, 0.5]}),  # fractions of training
])
def test_the_learning_rate_at_step_kt_is_the_1x_rate_at_step_t(k, warmup, kind, extra):
    one = schedule(1, lr_schedule=kind, warmup_epochs=warmup, **extra)
    stretched = schedule(k, lr_schedule=kind, warmup_epochs=warmup, **extra)
    assert stretched.total_steps == k * one.total_steps
    assert stretched.warmup_steps == k * one.warmup_steps
    for t in range(one.total_steps):
        if t < one.warmup_steps:
            # the ramp gives a step the value of its end: reached by the stretched step's end
            assert stretched.factor(k * t + k - 1) == pytest.approx(one.factor(t))
        else:
            assert stretched.factor(k * t) == pytest.approx(one.factor(t), abs=1e-12)


def test_the_trainer_uses_the_stretched_schedule(tmp_path):
    trainer = build(tmp_path, "run", length=2, lr_schedule="step", lr_step_epochs=1)
    assert trainer.total_steps == trainer.schedule.total_steps == 8 * STEPS_PER_EPOCH
    assert trainer.schedule.step_steps == 2 * STEPS_PER_EPOCH


def mask_updating_methods():
    """Registered methods whose masks change until ``t_end``."""
    return [m for m in st.available_methods() if getattr(get_method(m), "updates_topology", False)
            and "t_end" in accepted_keywords(get_method(m))]


@pytest.mark.parametrize("method", mask_updating_methods())
def test_mask_updates_stop_at_the_scaled_t_end_every_delta_t_steps(tmp_path, method):
    one, two = build(tmp_path, "1x", method=method), build(tmp_path, "2x", method=method, length=2)
    assert (one.sparsifier.t_end, two.sparsifier.t_end) == (15, 30)  # 0.75 of 20 and 40 steps
    assert one.sparsifier.delta_t == two.sparsifier.delta_t == 3
    updates = [t for t in range(1, two.total_steps + 1) if two.sparsifier.is_update_step(t)]
    assert updates == list(range(3, 31, 3))
    # a t_end given in steps, through --method-option, is one of the run at length 1
    given = build(tmp_path, "given", method=method, length=2, method_options={"t_end": 9})
    assert given.sparsifier.t_end == 18


def test_rigl_masks_change_until_the_scaled_t_end_only(tmp_path):
    trainer = build(tmp_path, "2x", length=2)
    changed, last = [], [trainer.sparsifier.mask_fingerprint()]

    def record(t):
        now = t.sparsifier.mask_fingerprint()
        if not (now == last[0]).all():
            changed.append(t.state.step)
        last[0] = now

    trainer.train(on_step=record)
    assert changed and 15 < max(changed) <= 30 and set(changed) <= set(range(3, 31, 3))


@pytest.mark.parametrize("options, one, two", [
    ({}, (4, 15), (8, 30)),                                      # 0.2 and 0.75 of training
    ({"start_step": 2, "end_step": 10}, (2, 10), (4, 20)),       # steps at length 1
])
def test_gmp_prunes_on_the_stretched_schedule(tmp_path, options, one, two):
    a = build(tmp_path, "1x", method="gmp", method_options=options).sparsifier
    b = build(tmp_path, "2x", method="gmp", method_options=options, length=2).sparsifier
    assert (a.start_step, a.end_step) == one and (b.start_step, b.end_step) == two
    assert a.frequency == b.frequency == 3  # delta_t, not scaled
    for t in range(a.total_steps + 1):
        assert b.target_counts(2 * t) == a.target_counts(t)


@pytest.mark.parametrize("method", ["dense"] + st.available_methods())
def test_training_flops_are_against_dense_at_length_1(tmp_path, method):
    # mask changes every step: the 2x run's changes are as fine, in its own time, as the 1x
    # run's (with a longer delta_t, GMP's staircase of densities is finer at 2x)
    one = build(tmp_path, "1x", method=method, delta_t=1).train()
    two = build(tmp_path, "2x", method=method, delta_t=1, length=2).train()
    assert two["train_flops"] == pytest.approx(2 * one["train_flops"], rel=0.05)
    assert two["train_flops_vs_dense"] == pytest.approx(2 * one["train_flops_vs_dense"], rel=0.05)
    if method == "dense":
        assert (one["train_flops_vs_dense"], two["train_flops_vs_dense"]) == pytest.approx((1, 2))
    assert "relative to dense training at length 1" in two["flops_note"]


@pytest.mark.parametrize("value", [0, -1, math.nan, math.inf, "x", "nan"])
def test_bad_lengths_are_refused_with_the_setting_name(value):
    with pytest.raises(ConfigError, match="length"):
        config(length=value)


def test_a_length_that_leaves_part_of_an_epoch_is_refused():
    with pytest.raises(ConfigError, match="whole number"):
        config(epochs=3, length=1.5)
    with pytest.raises(ConfigError, match="whole number"):
        config(epochs=4, length=0.1)  # 0.4 epochs
    assert config(epochs=10, length=0.3).trained_epochs() == 3  # 3.0000000000000004


def test_the_command_line_refuses_a_bad_length_in_one_line(capsys):
    argv = ["train", "--model", "lenet300", "--data", "synthetic", "--length", "0",
            "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "length" in err and "--length 2" in err


def test_resume_with_another_length_is_refused(tmp_path):
    build(tmp_path, "run").train(on_step=lambda t: t.state.step == 3 and t.request_stop())
    with pytest.raises(ConfigError, match="different configuration.*length"):
        Trainer(config(length=2), tmp_path / "run", resume=True, log=quiet)
    with pytest.raises(ConfigError, match="only its learning-rate settings"):
        Trainer(config(length=2), tmp_path / "run", resume=True, changed=["length"], log=quiet)


def test_the_long_preset_expands_to_its_cells():
    preset = PRESETS["long"]
    cells = expand_grid(preset["base"], preset["grid"], preset["exclude"])
    intended = Counter({(m, float(k)): 2 * 3 for m in ("static", "set", "rigl") for k in (1, 2, 5)})
    intended[("gmp", 1.0)] = 2 * 3
    assert Counter((c.method, c.length) for c in cells) == intended
    assert len(cells) == 3 * 3 * 2 * 3 + 1 * 2 * 3 == len({c.run_name() for c in cells})
    assert {(c.density, c.seed) for c in cells} == {(d, s) for d in (0.05, 0.02) for s in (0, 1, 2)}
    first = cells[0]
    assert (first.model, first.data, first.distribution, first.epochs, first.batch_size,
            first.lr, first.lr_schedule, first.delta_t) == (
        "lenet300", "fashion-mnist", "erk", 10, 128, 0.05, "cosine", 100)


def test_the_sweep_command_leaves_the_preset_exclusions_out(monkeypatch):
    seen = []

    def stop(cells, *args, **kwargs):
        seen.extend(cells)
        raise KeyboardInterrupt

    monkeypatch.setattr("sparsetrain.runner.sweep.run_sweep", stop)
    assert main(["sweep", "--preset", "long"]) == 130
    assert len(seen) == 60 and all(c.length == 1 for c in seen if c.method == "gmp")


def test_grid_exclusions():
    base = {"model": "lenet300", "data": "synthetic"}
    grid = {"method": ["static", "rigl"], "density": [0.5, 0.2]}
    cells = expand_grid(base, grid, [{"method": "rigl", "density": 0.2}])
    assert [(c.method, c.density) for c in cells] == [("static", 0.5), ("static", 0.2),
                                                       ("rigl", 0.5)]
    with pytest.raises(ConfigError, match="did you mean 'density'"):
        expand_grid(base, grid, [{"densty": 0.2}])
    with pytest.raises(ConfigError, match="non-empty mapping"):
        expand_grid(base, grid, [{}])
    with pytest.raises(ConfigError, match="list of mappings"):
        expand_grid(base, grid, {"method": "rigl"})
