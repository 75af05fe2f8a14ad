"""`sparsetrain train` on several processes (torch.distributed, gloo, 2 CPU processes).

One spawn of two workers runs every scenario in turn; each rank writes what it saw (final weights
and masks, mask fingerprints, errors) to files that the tests below compare with single-process
runs made here:

- a 2-process run with the total batch 2b is the 1-process run with batch 2b (Static: the same
  weights within float tolerance);
- RigL and SET (masked and CSR backends) end with identical masks and weights on both ranks;
- a run interrupted on 1 process resumes on 2, and one interrupted on 2 resumes on 1;
- replicas whose masks diverge stop the run with a clear error (the mask check);
- `sparsetrain train --nproc 2` starts torchrun and writes one set of logs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from sparsetrain.runner import Trainer, make_config

SYNTHETIC = {"n_train": 256, "n_test": 64, "input_shape": [1, 8, 8], "num_classes": 4}
WORLD = 2
JOIN_TIMEOUT_S = 240.0


def config(**overrides):
    settings = dict(model="lenet300", data="synthetic", data_options=SYNTHETIC, method="static",
                    density=0.2, epochs=3, batch_size=32, lr=0.05, delta_t=3, log_every=4,
                    checkpoint_every=0, progress=False, device="cpu")
    settings.update(overrides)
    return make_config(settings)


def quiet(_message):
    pass


def final_state(trainer) -> dict:
    return {"model": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
            "masks": {} if trainer.sparsifier is None else {
                k: v.clone() for k, v in trainer.sparsifier.masks.items()},
            "fingerprint": None if trainer.sparsifier is None
            else trainer.sparsifier.mask_fingerprint()}


# name -> (config overrides, run folder, resume?, stop at step, rank-1 sabotage)
SCENARIOS = {
    # 31 = shares of 15 and 16: the loss weighting must make DDP's average the batch's mean
    "static": (dict(method="static", batch_size=31), "static", False, None, False),
    "rigl": (dict(method="rigl"), "rigl", False, None, False),
    "set-csr": (dict(method="set", backend="csr"), "set-csr", False, None, False),
    "rigl-csr": (dict(method="rigl", backend="csr"), "rigl-csr", False, None, False),
    "rigl-stopped": (dict(method="rigl"), "rigl-2to1", False, 10, False),
    "rigl-resumed": (dict(method="rigl"), "rigl-1to2", True, None, False),
    "diverged": (dict(method="set"), "diverged", False, None, True),
}


def _worker(rank: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    root = Path(root)
    import torch.distributed as dist

    for name, (overrides, folder, resume, stop_at, sabotage) in SCENARIOS.items():
        result: dict = {}
        try:
            trainer = Trainer(config(**overrides), root / folder, resume=resume, log=quiet)
            if sabotage and rank == 1:  # this replica grows elsewhere: masks diverge
                trainer.sparsifier.seed = 12345

            def stop(t, stop_at=stop_at):
                if stop_at is not None and t.state.step == stop_at:
                    t.request_stop()

            trainer.train(on_step=stop)
            result["step"] = trainer.state.step
            torch.save(final_state(trainer), root / f"{name}.rank{rank}.pt")
        except Exception as exc:
            result["error"] = f"{type(exc).__name__}: {exc}"
            result["traceback"] = traceback.format_exc()
        (root / f"{name}.rank{rank}.json").write_text(json.dumps(result))
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp-train")
    # the run that the workers resume on 2 processes: interrupted here, on 1
    first = Trainer(config(method="rigl"), root / "rigl-1to2", log=quiet)
    first.train(on_step=lambda t: t.request_stop() if t.state.step == 7 else None)
    assert first.state.step == 7
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, str(root)), daemon=True)
             for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
    return root


def result(root: Path, name: str, rank: int = 0, expect_error: bool = False):
    path = root / f"{name}.rank{rank}.json"
    if not path.exists():
        pytest.fail(f"rank {rank} wrote no result for {name!r} (a worker crashed or hung)")
    found = json.loads(path.read_text())
    if "error" in found and not expect_error:
        pytest.fail(f"{name} failed on rank {rank}:\n{found['traceback']}", pytrace=False)
    return found


def state(root: Path, name: str, rank: int = 0) -> dict:
    result(root, name, rank)
    return torch.load(root / f"{name}.rank{rank}.pt", weights_only=True)


def assert_close_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"weight {k}")


def test_two_processes_train_as_one_process_with_the_whole_batch(runs, tmp_path):
    single = Trainer(config(method="static", batch_size=31), tmp_path / "one", log=quiet)
    single.train()
    two = state(runs, "static")
    assert_close_weights(two["model"], final_state(single)["model"])
    assert all(torch.equal(two["masks"][n], m) for n, m in single.sparsifier.masks.items())
    metrics = (runs / "static" / "metrics.jsonl").read_text().splitlines()
    single_metrics = (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == len(single_metrics), "rank 0 alone writes the metrics"
    for a, b in zip(metrics, single_metrics):
        a, b = json.loads(a), json.loads(b)
        assert a["step"] == b["step"] and a["kind"] == b["kind"]
        for key in ("loss", "accuracy", "test_accuracy", "test_loss"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key


@pytest.mark.parametrize("name", ["rigl", "set-csr", "rigl-csr"])
def test_replicas_end_with_identical_masks_and_weights(runs, name):
    r0, r1 = state(runs, name, 0), state(runs, name, 1)
    assert result(runs, name)["step"] == 24
    assert torch.equal(r0["fingerprint"], r1["fingerprint"])
    assert all(torch.equal(r0["masks"][n], r1["masks"][n]) for n in r0["masks"])
    assert all(torch.equal(r0["model"][k], r1["model"][k]) for k in r0["model"])
    initial = Trainer(config(**SCENARIOS[name][0]), runs / "fresh", log=quiet).sparsifier
    assert any(not torch.equal(r0["masks"][n], m) for n, m in initial.masks.items()), (
        "the masks must have moved for the test to mean much")


def test_resume_on_another_number_of_processes(runs, tmp_path):
    straight = Trainer(config(method="rigl"), tmp_path / "straight", log=quiet)
    straight.train()
    expected = final_state(straight)
    # interrupted on 2 processes at step 10, resumed here on 1
    assert result(runs, "rigl-stopped")["step"] == 10
    resumed = Trainer(config(method="rigl"), runs / "rigl-2to1", resume=True, log=quiet)
    assert resumed.state.step == 10
    resumed.train()
    got = final_state(resumed)
    assert_close_weights(got["model"], expected["model"])
    assert torch.equal(got["fingerprint"], expected["fingerprint"])
    # interrupted here on 1 process at step 7, resumed on 2
    other = state(runs, "rigl-resumed")
    assert result(runs, "rigl-resumed")["step"] == 24
    assert_close_weights(other["model"], expected["model"])
    assert torch.equal(other["fingerprint"], expected["fingerprint"])


def test_diverging_masks_stop_the_run_with_a_clear_error(runs):
    for rank in range(WORLD):
        found = result(runs, "diverged", rank, expect_error=True)
        assert "error" in found, "replicas with different masks must not train on"
        assert "different masks after the update at step 3" in found["error"]


def test_cli_nproc_starts_torchrun(tmp_path):
    out = tmp_path / "cli"
    command = [sys.executable, "-m", "sparsetrain", "train", "--model", "lenet300", "--data",
               "synthetic", "--data-option", "n_train=128", "--data-option", "n_test=32",
               "--data-option", "input_shape=[1,8,8]", "--method", "rigl", "--epochs", "1",
               "--batch-size", "32", "--delta-t", "2", "--no-progress", "--out", str(out),
               "--nproc", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on 2 processes" in done.stdout
    assert done.stdout.count("done: test accuracy") == 1, "rank 0 alone reports"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len({line for line in lines}), "no line written twice"
