"""Every method under DistributedDataParallel: all replicas keep identical masks and weights.

One spawn of two CPU workers (gloo, TCP rendezvous on 127.0.0.1) runs every registered method in
turn: a small CNN wrapped in ``DistributedDataParallel``, the sparsifier built with the same seed
on each rank, ~30 steps with ``delta_t=5`` on different random data per rank. After the
sparsifier is built and after every step the ranks exchange their masks and parameters with
``all_gather_object`` and check them for bitwise equality, and check that the number of active
weights of every layer is as expected (unchanged for the fixed-budget methods, the schedule's
count for gradual magnitude pruning) and that no inactive weight is non-zero. Each rank writes
what it found to a JSON file; the tests below read them and report per method.

A negative control runs the same check on SET built with ``seed=rank``: the check must see the
masks (and hence the weights) differ, which shows it can fail.
"""

from __future__ import annotations

import datetime
import json
import socket
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import sparsetrain as st
from sparsetrain.sparsity.structure import fixed_count
from tests.conftest import TinyCNN, schedule_kwargs

WORLD_SIZE = 2
STEPS = 30
DELTA_T = 5
DENSITY = 0.2
JOIN_TIMEOUT_S = 120.0
COLLECTIVE_TIMEOUT_S = 60.0
MAX_ERRORS = 10
PAIRS = st.supported_pairs()
CONTROL = "control:set-seed-per-rank"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _snapshot(model: nn.Module, sparsifier) -> dict:
    """Masks and parameters by name; for CSR layers the dense weight under the mask's name."""
    params = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    params.update({n: sparsifier.backend.dense_weight(n).cpu().clone()
                   for n in sparsifier.names})
    return {
        "masks": {n: m.detach().cpu().clone() for n, m in sparsifier.masks.items()},
        "params": params,
    }


def _compare(gathered: list[dict], step: int, counts: dict[str, int]) -> list[str]:
    """Differences between the ranks' snapshots, and broken invariants, as readable lines."""
    errors = []
    ref = gathered[0]
    for rank, other in enumerate(gathered[1:], start=1):
        for kind in ("masks", "params"):
            if set(other[kind]) != set(ref[kind]):
                errors.append(f"step {step}: rank {rank} has other {kind} names than rank 0")
                continue
            for name, tensor in ref[kind].items():
                if not torch.equal(tensor, other[kind][name]):
                    if kind == "masks":
                        detail = f"{int((tensor != other[kind][name]).sum())} positions differ"
                    else:
                        diff = (tensor - other[kind][name]).abs().max().item()
                        detail = f"max abs difference {diff:.3g}"
                    errors.append(f"step {step}: {kind[:-1]} {name!r} differs between rank 0 "
                                  f"and rank {rank} ({detail})")
    for rank, snap in enumerate(gathered):
        for name, mask in snap["masks"].items():
            active = int(mask.sum())
            if active != counts[name]:
                errors.append(f"step {step}: rank {rank} layer {name!r} has {active} active "
                              f"weights, {counts[name]} expected")
            outside = int(torch.count_nonzero(snap["params"][name][~mask]))
            if outside:
                errors.append(f"step {step}: rank {rank} layer {name!r} has {outside} non-zero "
                              "weights outside its mask")
    return errors


def _run_method(method: str, rank: int, seed: int, backend: str = "masked") -> dict:
    torch.manual_seed(1234)  # the same initial model on every rank
    options = dict(density=DENSITY, distribution="erk", total_steps=STEPS, seed=seed,
                   **schedule_kwargs(method, DELTA_T, alpha=0.5))
    if backend == "csr":  # the layers are converted first, then the model is wrapped
        model = TinyCNN()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        sp = st.make_sparsifier(method, model, opt, backend="csr", **options)
        model = DDP(model)
    else:
        model = DDP(TinyCNN())
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        sp = st.make_sparsifier(method, model, opt, **options)
    named = model.module if backend == "csr" else model  # the names the masks use
    data = torch.Generator().manual_seed(1000 + rank)  # different data on every rank
    counts = {n: int(m.sum()) for n, m in sp.masks.items()}
    errors: list[str] = []
    topology_changes = 0
    losses = []

    def check(step: int) -> None:
        gathered = [None] * WORLD_SIZE
        dist.all_gather_object(gathered, _snapshot(named, sp))
        errors.extend(_compare(gathered, step, counts))

    check(0)
    for t in range(1, STEPS + 1):
        before = {n: m.clone() for n, m in sp.masks.items()}
        x = torch.randn(16, 2, 8, 8, generator=data)
        y = torch.randint(0, 5, (16,), generator=data)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        sp.step()
        losses.append(loss.item())
        if not sp.fixed_budget and sp.is_update_step(t):
            counts = sp.scheduled_counts(t) or sp.active_counts()
        if any(not torch.equal(before[n], m) for n, m in sp.masks.items()):
            topology_changes += 1
        check(t)
    densities = st.layer_densities(TinyCNN(), DENSITY, "erk")  # names without "module."
    prefix = "" if backend == "csr" else "module."
    budget = {n: fixed_count(sp.structure, sp.backend.shape(n),
                             round(densities[n[len(prefix):]] * sp.backend.numel(n)))
              for n in sp.masks}
    local_losses = [None] * WORLD_SIZE
    dist.all_gather_object(local_losses, losses)
    return {
        "errors": errors[:MAX_ERRORS],
        "n_errors": len(errors),
        "steps": sp.step_count,
        "topology_changes": topology_changes,
        "update_steps": [t for t in range(1, STEPS + 1) if sp.is_update_step(t)],
        "active_counts": counts,  # at the end
        "forward_counts": sp.forward_counts(),
        "budget_counts": budget,
        "scheduled_counts": sp.scheduled_counts(STEPS),
        "scheduled_total": sp.scheduled_total(STEPS),
        "data_differs": local_losses[0] != local_losses[1],
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    out = Path(out_dir) / f"rank{rank}.json"
    result: dict = {"rank": rank, "methods": {}}
    try:
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE,
            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        )
        # under a process group a backend may provide less (the CSR backend keeps its counts)
        here = set(st.supported_pairs())
        for m, b in PAIRS:
            if (m, b) not in here:
                result["methods"][f"{m}@{b}"] = {
                    "skipped": f"{m} is not available on backend {b!r} under torch.distributed"}
        runs = ([(f"{m}@{b}", m, 0, b) for m, b in PAIRS if (m, b) in here]
                + [(CONTROL, "set", rank, "masked")])
        for i, (name, method, seed, backend) in enumerate(runs):
            try:
                result["methods"][name] = _run_method(method, rank, seed=seed, backend=backend)
            except Exception:
                # The ranks may now be out of step in their collectives: run nothing more.
                result["methods"][name] = {"fatal": traceback.format_exc()}
                for later, *_ in runs[i + 1:]:
                    result["methods"][later] = {"fatal": f"not run: {name!r} failed before it"}
                break
    except BaseException:
        result["fatal"] = traceback.format_exc()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        out.write_text(json.dumps(result))


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    """Run the workers once; return rank 0's results per method, or the reason there are none."""
    out_dir = tmp_path_factory.mktemp("ddp")
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, str(out_dir)), daemon=True)
             for r in range(WORLD_SIZE)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    problems = []
    for rank, p in enumerate(procs):
        if p.is_alive():
            p.terminate()
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
            problems.append(f"rank {rank} did not finish within {JOIN_TIMEOUT_S:.0f} s")
    results = {}
    for rank, p in enumerate(procs):
        path = out_dir / f"rank{rank}.json"
        if not path.exists():
            problems.append(f"rank {rank} wrote no result (exit code {p.exitcode})")
            continue
        results[rank] = json.loads(path.read_text())
        if "fatal" in results[rank]:
            problems.append(f"rank {rank} failed:\n{results[rank]['fatal']}")
    if problems:
        return {"problem": "\n".join(problems)}
    # Both ranks compare the same gathered data, so they must report the same findings.
    methods = {}
    for name, res in results[0]["methods"].items():
        other = results[1]["methods"].get(name, {"fatal": "no result"})
        if "skipped" in res:
            methods[name] = res
        elif "fatal" in res or "fatal" in other:
            methods[name] = {"fatal": "\n".join(
                f"rank {r}: {x['fatal']}" for r, x in enumerate((res, other)) if "fatal" in x)}
        elif other["errors"] != res["errors"]:
            methods[name] = {"fatal": "ranks 0 and 1 disagree about what they found"}
        else:
            methods[name] = res
    return methods


def _result(ddp_results, name):
    if "problem" in ddp_results:
        pytest.fail(f"the distributed workers failed:\n{ddp_results['problem']}", pytrace=False)
    if name not in ddp_results:
        pytest.fail(f"no result for {name!r}", pytrace=False)
    if "fatal" in ddp_results[name]:
        pytest.fail(f"{name} failed in the workers:\n{ddp_results[name]['fatal']}", pytrace=False)
    if "skipped" in ddp_results[name]:
        pytest.skip(ddp_results[name]["skipped"])
    return ddp_results[name]


@pytest.mark.parametrize("method,backend", PAIRS)
def test_replicas_stay_identical_under_ddp(ddp_results, method, backend):
    """Every method on every backend: the replicas hold the same masks and weights after every
    step (on the CSR backend RigL gathers the saved activations and output gradients of every
    rank, so its dense gradient is the replicas' average and every rank grows the same)."""
    res = _result(ddp_results, f"{method}@{backend}")
    assert res["steps"] == STEPS
    assert res["data_differs"], "the ranks must train on different data for the test to mean much"
    assert res["n_errors"] == 0, (
        f"{method}: {res['n_errors']} problems under DDP, the first ones:\n"
        + "\n".join(res["errors"])
    )
    if res["scheduled_counts"] is not None:  # where the method fixes every layer's count
        assert res["forward_counts"] == res["budget_counts"], "the budget must hold at the end"
    if res["scheduled_total"] is not None:
        assert sum(res["active_counts"].values()) == res["scheduled_total"]
    if method == "static":
        assert res["topology_changes"] == 0
    elif method == "gmp":  # start_step int(0.2 * 30) = 6, end_step int(0.75 * 30) = 22
        assert res["update_steps"] == [11, 16, 21, 22]
        assert res["topology_changes"] == 4, "GMP must prune at each of its pruning steps"
    else:  # every DELTA_T steps for the methods of the RigL paper; their own for the others
        if method in ("set", "rigl", "snfs", "srigl"):
            assert res["update_steps"] == [5, 10, 15, 20]
        assert res["topology_changes"] > 0, f"{method} never changed its masks"


def test_check_detects_replicas_that_diverge(ddp_results):
    """Negative control: SET seeded differently per rank gives different masks and weights."""
    res = _result(ddp_results, CONTROL)
    assert res["n_errors"] > 0, "the check did not notice masks built with different seeds"
    assert any("mask" in e and "step 0:" in e for e in res["errors"]), res["errors"]
    assert not any("active weights" in e or "outside its mask" in e for e in res["errors"]), (
        "different seeds must change which weights are active, not how many"
    )
