"""The ``export`` and ``predict`` commands of the ``sparsetrain`` command line.

    sparsetrain export runs/x --out model.sparse.safetensors     # compact, no pickle
    sparsetrain export runs/x --format onnx --out model.onnx     # for onnxruntime
    sparsetrain predict model.sparse.safetensors --data fashion-mnist
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_commands(commands) -> None:
    """Add ``export`` and ``predict`` to the subcommands ``commands``."""
    from .runner.export import FORMATS

    export = commands.add_parser(
        "export", help="write a finished run's model as a sparse model file (or ONNX)",
        description="Write the model of a finished run: 'safetensors' (default) stores each "
                    "sparse weight compactly (values and indices) with the model's recipe and a "
                    "checksum, for sparsetrain.load_sparse and `sparsetrain predict`; 'onnx' "
                    "stores the model on dense layers with zeros, for onnxruntime. A Markdown "
                    "model card is written beside the file.")
    export.add_argument("run", type=Path, metavar="RUN_FOLDER", help="a finished run's folder")
    export.add_argument("--out", type=Path, default=None,
                        help="file to write (default: RUN_FOLDER/" + FORMATS["safetensors"]
                             + ", or RUN_FOLDER/" + FORMATS["onnx"] + " with --format onnx)")
    export.add_argument("--format", default="safetensors", metavar="FORMAT",
                        help=f"{' or '.join(FORMATS)} (default: safetensors)")
    predict = commands.add_parser(
        "predict", help="accuracy and speed of a sparse model file on a data set",
        description="Load a file written by `sparsetrain export` (or st.export_sparse), "
                    "measure its accuracy on the data set's test split, its latency at batch 1 "
                    "and its throughput at --batch-size, on the CSR kernels and, unless "
                    "--no-dense, on dense layers holding the same weights.")
    predict.add_argument("model", type=Path, metavar="MODEL_FILE",
                         help="a .safetensors file written by `sparsetrain export`")
    predict.add_argument("--data", default=None,
                         help="data set (default: the one the model was trained on)")
    predict.add_argument("--data-dir", default=None, help="folder holding the data set files")
    predict.add_argument("--batch-size", type=int, default=256,
                         help="batch of the throughput measurement and of evaluation")
    predict.add_argument("--no-dense", action="store_true",
                         help="skip the comparison with dense layers")


def run(args: argparse.Namespace) -> int:
    """Run ``export`` or ``predict`` (errors propagate to the caller, which reports them)."""
    if args.command == "export":
        from .runner.export import export_run

        out, card, checked = export_run(args.run, args.out, format=args.format)
        print(f"exported {args.run} to {out} ({out.stat().st_size / 1e6:.3f} MB; {checked}); "
              f"model card {card}")
        return 0
    from . import checks
    from .deploy.predict import format_result, predict

    checks.positive_int(args.batch_size, "--batch-size", fix="e.g. --batch-size 256")
    result = predict(args.model, args.data, data_dir=args.data_dir,
                     batch_size=args.batch_size, compare_dense=not args.no_dense)
    print(format_result(result))
    return 0
