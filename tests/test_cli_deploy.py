"""``sparsetrain export`` and ``sparsetrain predict``: a finished run to a sparse model file (or
ONNX) with its card, the file's accuracy and speed, and one line with status 2 for bad input."""

import json
import shlex

import pytest
import torch

import sparsetrain as st
from sparsetrain.cli import main
from sparsetrain.deploy.card import card_path
from sparsetrain.runner import Trainer, make_config
from sparsetrain.runner.export import export_run, train_command
from tests.test_cli_errors import assert_one_line, outcome

SYNTHETIC = {"n_train": 96, "n_test": 40, "input_shape": [1, 6, 6], "num_classes": 4}


def train(folder, **overrides):
    settings = dict(model="lenet300", data="synthetic", data_options=SYNTHETIC, method="rigl",
                    density=0.2, epochs=2, batch_size=32, lr=0.05, delta_t=2,
                    checkpoint_every=0, progress=False, device="cpu", out=str(folder))
    settings.update(overrides)
    trainer = Trainer(make_config(settings), folder, log=lambda m: None)
    summary = trainer.train()
    trainer.model.eval()
    return trainer, summary


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs") / "rigl"
    trainer, summary = train(folder)
    x = trainer.data.prepare(trainer.data.test_x, train=False)
    with torch.no_grad():
        output = trainer.model(x)
    return folder, summary, x, output


def test_export_writes_the_file_and_its_card(run, capsys):
    folder, summary, x, output = run
    assert main(["export", str(folder)]) == 0
    path = folder / "model.sparse.safetensors"
    assert f"exported {folder} to {path}" in capsys.readouterr().out
    content = st.read_sparse(path)
    assert content.recipe == {"model": "lenet300", "num_classes": 4, "input_shape": [1, 6, 6],
                              "width": 1.0}
    for key in ("method", "density", "data", "test_accuracy", "train_flops",
                "inference_flops", "layer_densities", "config", "input_mean", "input_std"):
        assert key in content.info, key
    assert content.info["test_accuracy"] == summary["test_accuracy"]
    model = st.load_sparse(path)
    with torch.inference_mode():
        assert torch.allclose(model(x), output, rtol=1e-5, atol=1e-6)
    card = (folder / "model.sparse.md").read_text()
    for fragment in ("# lenet300, rigl at density 0.2", "- **Method**: rigl",
                     "- **Data set**: synthetic",
                     f"- **Test accuracy**: {summary['test_accuracy']:.4f}",
                     "- **Training FLOPs**", "- **Inference FLOPs**", "| `fc1.weight` | 300x36 |",
                     "sparsetrain train --model lenet300 --data synthetic --method rigl "
                     "--density 0.2 --delta-t 2 --epochs 2 --batch-size 32 --lr 0.05"):
        assert fragment in card, fragment
    for name, density in summary["layer_densities"].items():
        assert f"| `{name}` |" in card and f"| {density:.4f} |" in card


def test_the_cards_command_trains_the_same_settings(run):
    folder, summary, *_ = run
    command = train_command(summary["config"])
    from sparsetrain.cli import build_parser, resolve_config

    args = build_parser().parse_args(shlex.split(command)[1:])
    config, _ = resolve_config(args)
    assert config.semantic_dict() == make_config(summary["config"]).semantic_dict()


def test_export_onnx(run, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnxruntime

    folder, _, x, output = run
    out = tmp_path / "model.onnx"
    assert main(["export", str(folder), "--format", "onnx", "--out", str(out)]) == 0
    assert "onnxruntime's outputs within" in capsys.readouterr().out
    assert card_path(out).is_file()
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    got = session.run(None, {name: x.numpy()})[0]
    assert torch.allclose(torch.from_numpy(got), output, rtol=1e-4, atol=1e-5)


def test_predict(run, capsys):
    folder, summary, *_ = run
    path = folder / "model.sparse.safetensors"
    if not path.exists():
        assert main(["export", str(folder)]) == 0
    capsys.readouterr()
    assert main(["predict", str(path), "--batch-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "on synthetic (test split)" in out
    assert f"csr  : accuracy {summary['test_accuracy']:.4f} (40 predictions)" in out
    assert f"dense: accuracy {summary['test_accuracy']:.4f}" in out
    assert "sparse vs dense" in out
    assert main(["predict", str(path), "--no-dense"]) == 0
    assert "dense:" not in capsys.readouterr().out


def test_predict_result(run):
    from sparsetrain.deploy.predict import predict

    folder, summary, *_ = run
    path = folder / "model.sparse.safetensors"
    if not path.exists():
        main(["export", str(folder)])
    result = predict(path, batch_size=8, singles=5, compare_dense=False)
    assert result["csr"]["accuracy"] == summary["test_accuracy"]
    assert result["csr"]["latency_ms"] > 0 and result["csr"]["throughput"] > 0


def test_bad_input(run, tmp_path, capsys):
    folder, *_ = run
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((folder / "config.yaml").read_text())
    cases = [
        (["export", str(tmp_path / "nowhere")], "is not a sparsetrain run folder"),
        (["export", str(unfinished)], "holds no finished run"),
        (["export", str(folder), "--format", "zip"], "unknown export format 'zip'"),
        (["export", str(folder), "--out", str(tmp_path)], "is a folder"),
        (["predict", str(tmp_path / "none.safetensors")], "does not exist"),
        (["predict", str(folder / "config.yaml")], "not a complete safetensors file"),
        (["predict", str(folder / "model.sparse.safetensors"), "--batch-size", "0"],
         "--batch-size must be a positive integer"),
        (["predict", str(folder / "model.sparse.safetensors"), "--data", "nope"],
         "unknown data set 'nope'"),
    ]
    if not (folder / "model.sparse.safetensors").exists():
        assert main(["export", str(folder)]) == 0
    for argv, fragment in cases:
        code, err = outcome(capsys, argv)
        assert_one_line(code, err, fragment)


def test_predict_refuses_data_of_another_shape(run):
    from sparsetrain.deploy.predict import predict

    folder, *_ = run
    path = folder / "model.sparse.safetensors"
    if not path.exists():
        main(["export", str(folder)])
    other = dict(SYNTHETIC, input_shape=[1, 5, 5])
    with pytest.raises(st.SparseFileError, match="takes inputs of shape \\(1, 6, 6\\) with 4 "
                                                 "classes.*has \\(1, 5, 5\\) with 4"):
        predict(path, "synthetic", data_options=other)


def test_a_pruned_and_a_dense_run_export(tmp_path):
    for method in ("snip", "dense"):
        trainer, summary = train(tmp_path / method, method=method, epochs=1)
        path, card, checked = export_run(tmp_path / method)
        assert checked == "read back and checked"
        content = st.read_sparse(path)
        assert bool(content.sparse) == (method != "dense")
        assert json.loads(json.dumps(content.info))["method"] == method
        assert card.is_file()
