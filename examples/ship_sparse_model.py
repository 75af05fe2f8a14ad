"""Train a sparse model in your own loop, ship it as a compact file, and serve it.

LeNet-300-100 on Fashion-MNIST with RigL at density 0.05 (ERK) for a few epochs; then
``st.export_sparse`` writes the weights it keeps (values and indices, no pickle) with the
recipe to build the network again, ``st.load_sparse`` reads them back as an inference model on
the CSR kernels, and the script checks that its predictions are the trained model's and times a
single-example prediction against the same weights on dense layers.

    .venv/bin/python examples/ship_sparse_model.py
    .venv/bin/python examples/ship_sparse_model.py --density 0.02 --out lenet.sparse.safetensors
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import sparsetrain as st


def single_example_ms(model: nn.Module, x: torch.Tensor, n: int = 200) -> float:
    times = []
    with torch.inference_mode():
        for i in range(n):
            start = time.perf_counter()
            model(x[i % len(x)].unsqueeze(0))
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", default="lenet300.sparse.safetensors")
    parser.add_argument("--data", default=None, help="folder of the Fashion-MNIST IDX files")
    args = parser.parse_args()

    data = st.data.load_dataset("fashion-mnist", args.data)
    x_train = data.prepare(data.train_x, train=False)
    x_test = data.prepare(data.test_x, train=False)
    torch.manual_seed(0)
    model = st.models.build_model("lenet300", num_classes=10, input_shape=data.input_shape)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    steps = len(data.train_y) // args.batch_size
    sparsifier = st.RigL(model, opt, density=args.density, total_steps=steps * args.epochs)
    for _ in range(args.epochs):
        order = torch.randperm(len(data.train_y))
        for i in range(steps):
            batch = order[i * args.batch_size:(i + 1) * args.batch_size]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x_train[batch]), data.train_y[batch]).backward()
            sparsifier.step()
    model.eval()
    with torch.no_grad():
        trained = model(x_test)
    accuracy = float((trained.argmax(1) == data.test_y).float().mean())

    path = st.export_sparse(model, sparsifier, args.out, metadata={
        "method": "rigl", "density": args.density, "data": "fashion-mnist",
        "test_accuracy": accuracy})
    dense_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    print(f"trained: test accuracy {accuracy:.4f}; exported to {path} "
          f"({path.stat().st_size / 1e3:.0f} kB, {dense_bytes / 1e3:.0f} kB dense)")

    served = st.load_sparse(path)  # built from the file's recipe: no training code needed
    dense = st.load_sparse(path, backend="dense")
    with torch.inference_mode():
        same = bool((served(x_test).argmax(1) == trained.argmax(1)).all())
    print(f"loaded: {served.fc1}; predictions identical to the trained model's: {same}")
    print(f"one example: {single_example_ms(served, x_test):.3f} ms sparse, "
          f"{single_example_ms(dense, x_test):.3f} ms dense")


if __name__ == "__main__":
    main()
