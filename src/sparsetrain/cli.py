"""The ``sparsetrain`` command line.

    sparsetrain train --model lenet300 --data fashion-mnist --method rigl --density 0.05 \\
        --distribution erk --epochs 20 --batch-size 128 --lr 0.1 --seed 0 --out runs/example
    sparsetrain train --config configs/cifar10_wrn22_rigl.yaml --resume runs/x
    sparsetrain list                      # models, data sets and methods
    sparsetrain export runs/x             # the trained model as a compact safetensors file
    sparsetrain predict runs/x/model.sparse.safetensors   # its accuracy and speed

Every setting is a ``--option`` and a key of the YAML file given with ``--config``; options on
the command line override the file. Errors in the input end the command with a one-line message
and exit status 2; an interrupted run (Ctrl-C) writes a checkpoint and exits with status 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from . import checks
from .runner.sweep import PRESETS
from .runner.config import (
    ConfigError,
    TrainConfig,
    load_yaml,
    make_config,
    normalise_key,
    parse_yaml,
    unknown_key_error,
)
from .runner.folder import config_path
from .cli_deploy import add_commands as add_deploy_commands

HELP = {
    "model": "model name (see `sparsetrain list`)",
    "data": "data set name (see `sparsetrain list`)",
    "method": "sparse training method, 'dense', or pruning at initialisation (snip, grasp, "
              "synflow)",
    "density": "fraction of the sparsified weights kept, in (0, 1]",
    "distribution": "layer densities: uniform, er or erk",
    "structure": "unstructured (default), N:M (e.g. 2:4: N active in every M inputs; density "
                 "N/M), fan-in (the same count in every output unit) or block:RxC (e.g. "
                 "block:4x4); csr runs block layers on block kernels",
    "width": "width multiplier of the model",
    "dense_layers": "parameter names or glob patterns kept dense",
    "sparsify_embeddings": "sparsify position embeddings too (kept dense by default)",
    "delta_t": "steps between mask updates",
    "alpha": "initial drop fraction of the mask updates",
    "t_end": "fraction of training after which the mask stops changing",
    "backend": "masked (dense weights times masks) or csr (Linear layers stored as CSR, time "
               "and memory scale with density; static, set, rigl and pruning at init)",
    "method_options": "extra keyword arguments of the method, as KEY=VALUE (repeatable)",
    "prune_scope": "pruning at initialisation: global or layer",
    "prune_iterations": "pruning at initialisation: rounds (SynFlow: 100 by default)",
    "prune_batches": "pruning at initialisation: training batches used for the scores",
    "prune_ablation": "pruning at initialisation, a sanity check: 'shuffle' moves the active "
                      "weights to random places in each layer (same counts), 'reinit' draws "
                      "the weights afresh under the pruned masks",
    "length": "training-length multiplier (RigL paper's 2x, 5x): trains epochs * LENGTH epochs "
              "(a whole number) with every schedule stretched alike (learning rate, t_end, "
              "GMP's start and end); delta_t stays",
    "lr_schedule": "cosine, step, multistep or constant",
    "lr_milestones": "multistep: fractions of training (<= 1) or epochs (times --length)",
    "warmup_epochs": "linear learning-rate warm-up, in epochs (times --length)",
    "clip_grad_norm": "clip the gradients to this norm of the active ones (the sparsifier's "
                      "clip_grad_norm_; dense runs: every gradient); off by default",
    "augment": "random crop and flip (default: on for 32x32 colour images)",
    "train_size": "train on the first N training examples only",
    "data_dir": "folder holding the data set files",
    "data_options": "options of the data set, as KEY=VALUE (repeatable; e.g. synthetic's "
                    "n_train=512)",
    "device": "auto, cpu or cuda[:N]",
    "checkpoint_every": "steps between checkpoints (0: only at epoch ends)",
    "log_every": "steps between training-metrics lines",
    "progress": "progress bar per epoch",
    "tensorboard": "also log to TensorBoard event files in RUN_FOLDER/tensorboard (needs pip "
                   "install 'sparsetrain[tensorboard]')",
    "check_masks": "under torchrun: compare a fingerprint of the masks across processes after "
                   "every update and stop if they differ",
    "out": "run folder (default: derived from the settings, under --runs-dir)",
    "runs_dir": "where derived run folders go",
}


def _add_setting(parser: argparse.ArgumentParser, f: dataclasses.Field) -> None:
    flag = "--" + f.name.replace("_", "-")
    kwargs: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS,
                                  help=HELP.get(f.name))
    if "bool" in str(f.type):
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
    elif f.name in ("method_options", "data_options"):
        parser.add_argument(flag[:-1], action="append", metavar="KEY=VALUE", **kwargs)
    elif str(f.type).startswith("list"):
        parser.add_argument(flag, nargs="*", metavar="VALUE", **kwargs)
    else:
        parser.add_argument(flag, metavar=f.name.upper(), **kwargs)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # a one-line message and status 2, with a hint on options
        hint = f" (`{self.prog} --help` lists the options)"
        if "unrecognized arguments" in message:
            unknown = message.split(":", 1)[1].split()
            for item in unknown:
                if item.startswith("--"):
                    name = normalise_key(item[2:].split("=", 1)[0])
                    if name not in TrainConfig.keys():
                        message, hint = str(unknown_key_error(item, "the command line")), ""
                        break
        self.exit(2, f"sparsetrain: error: {_one_line(message)}{hint}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sparsetrain", description="Train sparse neural networks.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = commands.add_parser("train", help="train a model with a sparse training method",
                                description="Train a model; every option is also a YAML key.")
    train.add_argument("--config", type=Path, help="YAML file of settings")
    train.add_argument("--resume", type=Path, metavar="RUN_FOLDER",
                       help="continue the run in this folder from its checkpoint")
    train.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                       help="with --resume: change a learning-rate setting of the run from "
                            "its checkpoint on (lr, lr_schedule, lr_milestones, lr_gamma, "
                            "lr_step_epochs, warmup_epochs; repeatable); recorded in "
                            "config.yaml and metrics.jsonl")
    train.add_argument("--nproc", type=int, default=1, metavar="N",
                       help="train on N processes of this machine (data parallel, started "
                            "through torchrun); --batch-size stays the total batch")
    for f in dataclasses.fields(TrainConfig):
        _add_setting(train, f)
    sweep = commands.add_parser(
        "sweep", help="train a grid of runs, then write a report",
        description="Train every cell of a grid (finished cells are skipped), then report. "
                    "Training options given here are shared by every cell.")
    sweep.add_argument("--config", type=Path, help="YAML sweep file with 'base' and 'grid'")
    sweep.add_argument("--preset", choices=sorted(PRESETS), help="a ready-made sweep")
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                       help="a setting and its values (repeatable)")
    sweep.add_argument("--sweep-dir", type=Path, default=None,
                       help="folder of the runs (default: runs/sweep-<preset or file name>)")
    sweep.add_argument("--jobs", type=int, default=1, help="runs trained in parallel")
    sweep.add_argument("--report-dir", type=Path, default=None,
                       help="where the report goes (default: <sweep-dir>/report)")
    sweep.add_argument("--no-analysis", action="store_true",
                       help="skip `sparsetrain analyze` of the runs (written to "
                            "<sweep-dir>/analysis and linked from the report)")
    for f in dataclasses.fields(TrainConfig):
        if f.name not in ("out", "runs_dir"):
            _add_setting(sweep, f)
    report = commands.add_parser("report", help="write a report of finished runs")
    report.add_argument("runs", nargs="+", type=Path, help="run folders or folders of runs")
    report.add_argument("--out", type=Path, default=Path("reports/latest"))
    report.add_argument("--title", default=None)
    analyze = commands.add_parser(
        "analyze", help="mask overlap, loss along lines and gradient flow of finished runs",
        description="Write analysis.md with plots: the overlap of the final masks across seeds "
                    "and methods, the training loss along the lines from initialisation to "
                    "solution and between solutions, the weights ever active, the per-layer "
                    "density over time, and the gradient norms logged through training.")
    analyze.add_argument("runs", nargs="+", type=Path, help="run folders or folders of runs")
    analyze.add_argument("--out", type=Path, default=Path("reports/analysis"))
    analyze.add_argument("--no-lines", action="store_true",
                         help="leave out the loss along lines (it rebuilds the runs of the "
                              "lowest seed and evaluates 2048 training examples at 11 points)")
    reproduce = commands.add_parser(
        "reproduce", help="train the runs behind the papers' claims and write the claims table",
        description="Train every run of the claims table that is not finished yet (about "
                    "90 minutes on 2 cores from scratch), then measure each claim and write "
                    "the table (docs/RESULTS.md).")
    reproduce.add_argument("--runs-dir", type=Path, default=Path("runs/reproduce"),
                           help="folder of the runs (default: runs/reproduce)")
    reproduce.add_argument("--results", type=Path, default=Path("docs/RESULTS.md"),
                           help="the claims table written (default: docs/RESULTS.md)")
    reproduce.add_argument("--jobs", type=int, default=2, help="runs trained in parallel")
    reproduce.add_argument("--cifar10-sample", default=None, metavar="PATH",
                           help="cifar10_sample.npz or its folder (default: "
                                "$SPARSETRAIN_CIFAR10_SAMPLE)")
    reproduce.add_argument("--no-train", action="store_true",
                           help="only measure the claims on the runs already finished")
    reproduce.add_argument("--no-analysis", action="store_true",
                           help="skip `sparsetrain analyze` of the runs (written to the "
                                "results file's folder, analysis/, and linked from it)")
    commands.add_parser("list", help="list the models, data sets and methods")
    add_deploy_commands(commands)
    return parser


def _key_values(items: list[str], flag: str) -> dict[str, Any]:
    options = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{flag} takes KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        options[key.strip()] = parse_yaml(value, f"the value of {flag} {key.strip()}")
    return options


def resolve_config(args: argparse.Namespace) -> tuple[TrainConfig, bool]:
    """The run's settings and whether to resume, from --config, --resume and the options."""
    given = _given_settings(args)
    layers = []
    if args.resume is not None:
        saved = config_path(args.resume)
        if not saved.is_file():
            raise ConfigError(f"nothing to resume in {args.resume}: it has no {saved.name} "
                              "(is it a sparsetrain run folder?)")
        if args.config is None:
            layers.append(load_yaml(saved))  # the run's own settings, checked against the
            # checkpoint's when the run is built: other settings are refused there
        given["out"] = str(args.resume)
    if args.config is not None:
        layers.append(load_yaml(args.config))
    layers.append(given)
    layers.append(overrides(args))
    return make_config(*layers), args.resume is not None


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings that ``--override KEY=VALUE`` changes on resume, by their names."""
    items = getattr(args, "override", None) or []
    if items and args.resume is None:
        raise ConfigError("--override changes the settings of a run being resumed; use it with "
                          "--resume RUN_FOLDER (for a new run, give the options themselves)")
    return {normalise_key(k): v for k, v in _key_values(items, "--override").items()}


def _given_settings(args: argparse.Namespace) -> dict[str, Any]:
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if hasattr(args, f.name)}
    for key in ("method_options", "data_options"):
        if key in given:
            given[key] = _key_values(given[key], "--" + key[:-1].replace("_", "-"))
    return given


def _check_jobs(jobs: int) -> None:
    try:
        checks.positive_int(jobs, "--jobs", fix="--jobs is the number of runs trained at the "
                            "same time; 1 trains them one after the other")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _sweep(args: argparse.Namespace) -> int:
    from .runner.report import format_table, summarise, collect_runs, write_report
    from .runner.sweep import expand_grid, read_sweep_file, run_sweep

    base: dict[str, Any] = {}
    grid: dict[str, Any] = {}
    exclude: list[Any] = []
    name = "grid"
    if args.preset:
        base, grid = dict(PRESETS[args.preset]["base"]), dict(PRESETS[args.preset]["grid"])
        exclude = list(PRESETS[args.preset].get("exclude", []))
        name = args.preset
    if args.config:
        file_base, file_grid, file_exclude = read_sweep_file(args.config)
        base.update(file_base)
        grid.update(file_grid)
        exclude += file_exclude
        name = args.config.stem
    base.update(_given_settings(args))
    for item in args.grid:
        if "=" not in item:
            raise ConfigError(f"--grid takes KEY=V1,V2,..., got {item!r}")
        key, values = item.split("=", 1)
        grid[key] = [parse_yaml(v, f"a value of --grid {key.strip()}")
                     for v in values.split(",") if v.strip()]
    if not grid:
        raise ConfigError("nothing to sweep: give --preset, --config or --grid KEY=V1,V2")
    _check_jobs(args.jobs)
    cells = expand_grid(base, grid, exclude)
    sweep_dir = args.sweep_dir or Path("runs") / f"sweep-{name}"
    folders = run_sweep(cells, sweep_dir, jobs=args.jobs)
    report_dir = args.report_dir or sweep_dir / "report"
    analysis = None
    if not args.no_analysis:
        from .runner.analyze import write_analysis

        analysis = write_analysis(folders, sweep_dir / "analysis").parent
    path = write_report(folders, report_dir, title=f"Sweep {name}", analysis=analysis)
    rows = summarise(collect_runs(folders))
    print("\n" + format_table(rows))
    print(_verdicts(rows) + f"\nreport written to {path}"
          + (f"\nanalysis written to {analysis / 'analysis.md'}" if analysis else ""))
    return 0


def _report(args: argparse.Namespace) -> int:
    from .runner.report import format_table, summarise, collect_runs, write_report

    runs = collect_runs(args.runs)
    path = write_report(args.runs, args.out, title=args.title)
    rows = summarise(runs)
    print(format_table(rows))
    print(_verdicts(rows) + f"\nreport written to {path}")
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from .runner.analyze import write_analysis

    path = write_analysis(args.runs, args.out, lines=not args.no_lines)
    print(f"analysis written to {path}")
    return 0


def _reproduce(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .runner.reproduce import train_all, write_results

    _check_jobs(args.jobs)
    if not args.no_train:
        train_all(args.runs_dir, jobs=args.jobs, cifar10_sample=args.cifar10_sample)
    command = "sparsetrain reproduce" + "".join(
        f" {a}" for a in argv[1:] if a not in ("--no-train", "--no-analysis"))
    analysis = args.results.parent / "analysis"  # linked when there, even if not rewritten
    if not args.no_analysis:
        from .runner.analyze import write_analysis

        write_analysis([args.runs_dir], analysis)
    path, counts = write_results(args.runs_dir, args.results, command, analysis=analysis)
    print("claims: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print(f"claims table written to {path}")
    return 0


def _verdicts(rows) -> str:
    from .runner.report import format_verdicts

    text = format_verdicts(rows)
    return f"\n{text}\n" if text else ""


def _list() -> int:
    from .data import available_datasets
    from .methods import available_methods
    from .models import available_models
    from .runner.config import PRUNE_AT_INIT_METHODS
    from .sparsity.structure import STRUCTURE_EXAMPLES

    print("models:   " + ", ".join(available_models()))
    print("data:     " + ", ".join(available_datasets()))
    print("methods:  dense, " + ", ".join(available_methods()) + " (dynamic and gradual), "
          + ", ".join(PRUNE_AT_INIT_METHODS) + " (pruning at initialisation)")
    print("structures: " + ", ".join(STRUCTURE_EXAMPLES.values())
          + " (any N:M and block:RxC; --structure)")
    return 0


def _without_nproc(argv: Sequence[str]) -> list[str]:
    result, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--nproc":
            skip = True
        elif not item.startswith("--nproc="):
            result.append(item)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.command == "list":
        return _list()
    if args.command == "train" and args.nproc != 1:
        try:
            checks.positive_int(args.nproc, "--nproc", fix="--nproc is the number of "
                                "training processes on this machine, e.g. --nproc 2")
        except ValueError as exc:
            print(f"sparsetrain: error: {exc}", file=sys.stderr)
            return 2
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:  # not yet under torchrun
            from .runner.distributed import launch

            return launch(_without_nproc(argv), args.nproc)
    from .runner.folder import run_folder
    from .runner.interrupt import exit_status
    from .runner.sweep import SweepStopped
    from .runner.train import Trainer

    try:
        if args.command in ("sweep", "report"):
            return _sweep(args) if args.command == "sweep" else _report(args)
        if args.command == "analyze":
            return _analyze(args)
        if args.command in ("export", "predict"):
            from .cli_deploy import run

            return run(args)
        if args.command == "reproduce":
            return _reproduce(args, argv)
        config, resume = resolve_config(args)
        out = run_folder(config)
        _check_out(out)
        trainer = Trainer(config, out, resume=resume, changed=overrides(args))
        where = (f"{trainer.dist.world} processes ({trainer.device})" if trainer.dist.active
                 else str(trainer.device))
        trainer.log(f"sparsetrain: {config.model} on {config.data} with {config.method} at "
                    f"density {config.density}, {config.trained_epochs()} epochs"
                    f"{f' (length {config.length:g})' if config.length != 1 else ''} "
                    f"({trainer.total_steps} steps) on {where}; run folder {out}")
        summary = trainer.train()
    except SweepStopped as exc:
        print(f"sparsetrain: {exc}", file=sys.stderr)
        return exit_status(exc.signum)
    except KeyboardInterrupt:
        print("sparsetrain: stopped", file=sys.stderr)
        return 130
    except Exception as exc:  # the expected failures end in one line, the others in a trace
        message = _input_error(exc)
        if message is None:
            raise
        print(f"sparsetrain: error{_rank_suffix()}: {message}", file=sys.stderr)
        return 2
    finally:
        _leave_process_group()
    return 0 if summary is not None else exit_status(trainer.stopped_by)


def _check_out(out: Path) -> None:
    """``ConfigError`` unless the run folder ``out`` is a folder or can be made one."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"the run folder {out} is a file, not a folder; pass another --out")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"cannot make the run folder {out}: {parent} is a file, not a "
                                  "folder; pass another --out")
            return


def _input_error(exc: Exception) -> str | None:
    """The one-line message of an expected failure (bad input, a file that cannot be read or
    written, too little memory), or ``None`` for a bug."""
    import torch

    from .data import DataFileError
    from .runner.train import TrainingError

    if isinstance(exc, (ConfigError, DataFileError, TrainingError, ValueError)):
        message = str(exc)
    elif isinstance(exc, OSError):
        paths = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
        message = (f"cannot use {paths}: {exc.strerror or exc}; check the path and its "
                   "permissions" if paths else f"{exc.strerror or exc}")
    elif isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)) or (
            isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)):
        message = ("out of memory: " + (str(exc).splitlines() or [type(exc).__name__])[0]
                   + "; try a smaller --width, --batch-size or data set")
    else:
        return None
    return _one_line(message) or type(exc).__name__


def _one_line(message: str) -> str:
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())


def _rank_suffix() -> str:
    import torch.distributed as dist

    return f" (rank {dist.get_rank()})" if dist.is_available() and dist.is_initialized() else ""


def _leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
