"""The reproduction's plan: every claim selects runs the studies train (three seeds, one run
each), and the claims table is written from finished runs."""

import pytest

from sparsetrain.runner import folder
from sparsetrain.runner.claims import select
from sparsetrain.runner.reproduce import SEEDS, STUDIES, cells, claims, write_results

PLANNED = cells()


def fake_summary(config, accuracy):
    return {"method": config.method, "model": config.model, "data": config.data,
            "test_accuracy": accuracy, "density": config.density,
            "ever_active_fraction": config.density, "layer_densities": {"w": config.density},
            "config": config.to_dict()}


SUMMARIES = [fake_summary(c, 0.5) for c in PLANNED]


def test_cells_are_distinct_and_every_study_has_every_seed():
    names = [c.run_name() for c in PLANNED]
    assert len(names) == len(set(names))
    for base, grid in STUDIES.values():
        for method in grid["method"]:
            got = {c.seed for c in PLANNED if c.model == base["model"] and c.method == method}
            assert got == set(SEEDS)


@pytest.mark.parametrize("claim", claims(), ids=lambda c: f"{c.claim}|{c.setting}")
def test_every_claim_selects_one_planned_run_per_seed(claim):
    groups = [claim.a, claim.b, *claim.others] if claim.kind != "correlation" else [claim.a]
    for selector in groups:
        if not selector:
            continue
        runs = select(SUMMARIES, selector)
        seeds = [r["config"]["seed"] for r in runs]
        if claim.kind == "correlation":
            variants = {(r["method"], r["config"]["delta_t"]) for r in runs}
            assert len(runs) >= 9 and len(variants) >= 3
        else:
            assert sorted(seeds) == SEEDS, selector


def test_the_claims_table_is_written_from_finished_runs(tmp_path):
    runs = tmp_path / "runs"
    for i, c in enumerate(PLANNED):
        run = runs / c.run_name()
        run.mkdir(parents=True)
        folder.save_config(run, c)
        # RigL 0.01 above every other method, seeds apart by a little noise
        accuracy = 0.8 + (0.01 if c.method == "rigl" else 0.0) + 0.001 * ((i * 7) % 3)
        folder.write_summary(run, fake_summary(c, accuracy))
    analysis = tmp_path / "analysis"
    analysis.mkdir()
    for name in ("analysis.md", "lines.png"):
        (analysis / name).write_text("x")
    path, counts = write_results(runs, tmp_path / "RESULTS.md", "sparsetrain reproduce",
                                 analysis=analysis)
    text = path.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and line.endswith("** |")]
    assert len(rows) == len(claims()) == sum(counts.values())
    assert "no runs" not in text
    assert "(analysis/analysis.md)" in text and "(analysis/lines.png)" in text
    rigl_vs_set = [r for r in rows if r.startswith("| RigL >= SET")]
    assert rigl_vs_set and all("**holds**" in r for r in rigl_vs_set)
    assert f"{len(PLANNED)} finished runs of the {len(PLANNED)} planned" in text


def test_a_missing_data_set_stops_the_reproduction_before_any_training(tmp_path, capsys):
    from sparsetrain.cli import main

    code = main(["reproduce", "--runs-dir", str(tmp_path / "runs"), "--results",
                 str(tmp_path / "R.md"), "--cifar10-sample", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert code == 2 and "cifar10_sample.npz" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "R.md").exists()
    assert main(["reproduce", "--jobs", "0", "--runs-dir", str(tmp_path / "runs")]) == 2


def test_active_counts_come_from_the_checkpoint_when_the_summary_lacks_them(tmp_path):
    from sparsetrain.runner import Trainer, make_config
    from sparsetrain.runner.reproduce import with_active_counts
    from sparsetrain.runner.results import collect_runs

    config = make_config(dict(model="lenet300", data="synthetic", method="snip", density=0.1,
                              epochs=1, batch_size=32, progress=False, device="cpu",
                              data_options={"n_train": 64, "n_test": 16,
                                            "input_shape": [1, 6, 6], "num_classes": 3}))
    summary = Trainer(config, tmp_path / "run", log=lambda m: None).train()
    counts = summary["layer_active_counts"]
    assert sum(counts.values()) == round(0.1 * (36 * 300 + 300 * 100 + 100 * 3))
    (run,) = collect_runs([tmp_path / "run"])
    assert with_active_counts(run) is run["summary"]  # has them: nothing read
    del run["summary"]["layer_active_counts"]
    assert with_active_counts(run)["layer_active_counts"] == counts
