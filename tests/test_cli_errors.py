"""Bad input to every command ends in one line on stderr, ``sparsetrain: error: ...``, and
exit status 2: never a traceback, a hang or a crash (issue 13)."""

import json
import signal
import time

import pytest

from sparsetrain.cli import main
from sparsetrain.sparsity import distributions

TRAIN = ["train", "--model", "lenet300", "--data", "synthetic", "--data-option", "n_train=64",
         "--data-option", "n_test=16", "--data-option", "input_shape=[1, 4, 4]",
         "--epochs", "1", "--batch-size", "32", "--no-progress", "--device", "cpu"]
# A YAML "billion laughs": 600 bytes that expand to 10**9 list items.
BOMB = "a: &a [x,x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 10) + "]\n"
    for i in range(8))


def outcome(capsys, argv) -> tuple[int, str]:
    """Exit status and stderr of ``sparsetrain ARGV``, run in this process."""
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    return code, capsys.readouterr().err


def assert_one_line(code, err, *fragments):
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparsetrain: error"), err
    for fragment in fragments:
        assert fragment in lines[0], err


@pytest.fixture(autouse=True)
def no_erk_loop(monkeypatch):
    """A bad ERK power must be refused before the ERK loop runs (NaN looped forever)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the ERK loop ran with an unchecked erk_power_scale")

    original = distributions._scaled_densities

    def guarded(shapes, density, distribution, power):
        if not (0.0 <= power <= 1.0):
            refuse()
        return original(shapes, density, distribution, power)

    monkeypatch.setattr(distributions, "_scaled_densities", guarded)


@pytest.mark.parametrize("args, fragments", [
    (["--lr-schedule", "step", "--lr-step-epochs", "0"], ["lr_step_epochs"]),
    (["--device", "cuda:abc"], ["device", "cuda:abc"]),
    (["--width", "1e6"], ["width"]),
    (["--width", ".inf"], ["width"]),
    (["--width", "inf"], ["width"]),
    (["--data-option", "n_train=1e10"], ["n_train"]),
    (["--data-option", "n_train=10000000000"], ["n_train"]),
    (["--method-option", "a=[1"], ["--method-option a", "not valid YAML"]),
    (["--data-option", "a=[1"], ["--data-option a", "not valid YAML"]),
    (["--method-option", "erk_power_scale=.nan"], ["erk_power_scale"]),
    (["--method-option", "erk_power_scale=.inf"], ["erk_power_scale"]),
    (["--method-option", "erk_power_scale=-1"], ["erk_power_scale"]),
    (["--lr-gamma", "-1"], ["lr_gamma"]),
    (["--lr-gamma", "2"], ["lr_gamma"]),
    (["--lr", "inf"], ["lr"]),
    (["--lr", "-0.1"], ["lr"]),
    (["--lr", "nan"], ["lr"]),
    (["--lr-milestones", "nan"], ["lr_milestones"]),
    (["--warmup-epochs", "inf"], ["warmup_epochs"]),
    (["--seed", str(2**70)], ["seed", "4294967295"]),
    (["--epochs", str(2**70)], ["epochs"]),
    (["--batch-size", "1e3"], ["batch_size"]),
])
def test_bad_settings(tmp_path, capsys, args, fragments):
    code, err = outcome(capsys, [*TRAIN, "--out", str(tmp_path / "run"), *args])
    assert_one_line(code, err, *fragments)
    assert not (tmp_path / "run").exists()


def test_out_under_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, err = outcome(capsys, [*TRAIN, "--out", str(tmp_path / "file" / "run")])
    assert_one_line(code, err, str(tmp_path / "file"))


def test_out_is_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, err = outcome(capsys, [*TRAIN, "--out", str(tmp_path / "file")])
    assert_one_line(code, err, str(tmp_path / "file"))


def test_read_only_run_folder(tmp_path, capsys, monkeypatch):
    from sparsetrain.runner import folder

    def refuse(run, config):  # what a read-only folder does (even root gets it on some mounts)
        path = folder.config_path(run)
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(folder, "save_config", refuse)
    code, err = outcome(capsys, [*TRAIN, "--out", str(tmp_path / "run")])
    assert_one_line(code, err, str(tmp_path / "run" / "config.yaml"), "Permission denied")


def test_bad_yaml_in_a_grid(tmp_path, capsys):
    code, err = outcome(capsys, ["sweep", "--model", "lenet300", "--data", "synthetic",
                                 "--grid", "density=[1", "--sweep-dir", str(tmp_path / "s")])
    assert_one_line(code, err, "--grid", "density")


def test_sweep_file_with_a_list_as_base(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text("base: [1, 2]\ngrid: {seed: [0, 1]}\n")
    code, err = outcome(capsys, ["sweep", "--config", str(path),
                                 "--sweep-dir", str(tmp_path / "s")])
    assert_one_line(code, err, str(path), "base")


@pytest.fixture
def deadline():
    """Stop the test with ``TimeoutError`` after 10 s instead of hanging."""
    def expire(signum, frame):
        raise TimeoutError("still running after 10 s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, 10.0)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("where", ["config", "method-option", "data-option", "grid", "sweep"])
def test_yaml_alias_bomb_is_refused_at_once(tmp_path, capsys, deadline, where):
    path = tmp_path / "bomb.yaml"
    inline = "{" + BOMB.strip().replace("\n", ", ") + "}"
    if where == "config":
        path.write_text("method_options:\n" + "".join("  " + line + "\n"
                                                      for line in BOMB.splitlines()))
        argv = [*TRAIN, "--config", str(path)]
    elif where == "sweep":
        path.write_text("base:\n  model: lenet300\n  data: synthetic\n  method_options:\n"
                        + "".join("    " + line + "\n" for line in BOMB.splitlines())
                        + "grid: {seed: [0]}\n")
        argv = ["sweep", "--config", str(path), "--sweep-dir", str(tmp_path / "s")]
    elif where == "grid":  # values are split at commas, so one alias stands for the bomb
        argv = ["sweep", "--model", "lenet300", "--data", "synthetic", "--grid",
                "seed=*a", "--sweep-dir", str(tmp_path / "s")]
    else:
        argv = [*TRAIN, f"--{where}", f"x={inline}"]
    start = time.perf_counter()
    code, err = outcome(capsys, [*argv, "--out", str(tmp_path / "run")] if where != "sweep"
                        and where != "grid" else argv)
    assert time.perf_counter() - start < 1.0
    assert_one_line(code, err, "alias")


def test_config_file_not_utf8(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("model: lenet300\ndata: caf\xe9\n".encode("latin-1"))
    code, err = outcome(capsys, ["train", "--config", str(path)])
    assert_one_line(code, err, str(path), "UTF-8")


def test_config_file_is_a_folder(tmp_path, capsys):
    code, err = outcome(capsys, ["train", "--config", str(tmp_path)])
    assert_one_line(code, err, str(tmp_path))


def fake_run(root, summary_text):
    run = root / "run"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("model: m\n")
    (run / "summary.json").write_text(summary_text)
    return run


@pytest.mark.parametrize("summary", ["{not json", "[1, 2]", '{"method": "rigl"}', "\xff"])
def test_report_over_a_broken_run_folder(tmp_path, capsys, summary):
    run = fake_run(tmp_path / "runs", summary)
    code, err = outcome(capsys, ["report", str(tmp_path / "runs"),
                                 "--out", str(tmp_path / "report")])
    assert_one_line(code, err, str(run))


def test_report_out_under_a_file(tmp_path, capsys):
    summary = {"method": "rigl", "density": 0.1, "test_accuracy": 0.5, "model": "m",
               "data": "d", "layer_densities": {"w": 0.1}, "config": {"density": 0.1}}
    fake_run(tmp_path / "runs", json.dumps(summary))
    (tmp_path / "file").write_text("x")
    code, err = outcome(capsys, ["report", str(tmp_path / "runs"),
                                 "--out", str(tmp_path / "file" / "report")])
    assert_one_line(code, err, str(tmp_path / "file"))


def test_sweep_dir_under_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, err = outcome(capsys, ["sweep", "--model", "lenet300", "--data", "synthetic",
                                 "--grid", "seed=0", "--sweep-dir",
                                 str(tmp_path / "file" / "s")])
    assert_one_line(code, err, str(tmp_path / "file"))


def test_argparse_errors_are_one_line_too(capsys):
    code, err = outcome(capsys, ["train", "--nproc", "many"])
    assert_one_line(code, err, "--nproc")


@pytest.mark.parametrize("error", [
    MemoryError(),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate "
                 "memory: you tried to allocate 76800000000 bytes.\nmore"),
])
def test_out_of_memory_is_one_line(tmp_path, capsys, monkeypatch, error):
    from sparsetrain.runner import train

    def build(*args, **kwargs):
        raise error

    monkeypatch.setattr(train, "build_run", build)
    code, err = outcome(capsys, [*TRAIN, "--out", str(tmp_path / "run")])
    assert_one_line(code, err, "out of memory", "--width")


def test_a_bug_still_shows_its_traceback(tmp_path, monkeypatch):
    from sparsetrain.runner import train

    def build(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(train, "build_run", build)
    with pytest.raises(KeyError):
        main([*TRAIN, "--out", str(tmp_path / "run")])
