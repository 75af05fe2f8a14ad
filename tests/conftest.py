"""Small models and training helpers shared by the tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings
from torch import nn

import sparsetrain.backends.csr_ops as csr_ops
import sparsetrain.kernels as kernels_module

# Property-based tests (marked ``fuzz``) run a few dozen examples each in the default suite;
# ``pytest -m fuzz --hypothesis-profile long`` runs them at length.
settings.register_profile("default", max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=3000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("default")


class TinyCNN(nn.Module):
    """Conv (grouped and plain), BatchNorm, Linear: every kind of weight a vision net has."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        x = nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def tiny_cnn() -> nn.Module:
    return TinyCNN()


def batches(n: int, seed: int = 0, batch: int = 8):
    """``n`` fixed batches of (images 2x8x8, labels in 0..4)."""
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, 2, 8, 8, generator=g), torch.randint(0, 5, (batch,), generator=g))
        for _ in range(n)
    ]


def train_step(model, optimizer, sparsifier, x, y):
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    return sparsifier.step()


def save_checkpoint(path, model, optimizer, sparsifier):
    """Save a run as the README shows; return it loaded back with ``weights_only=True``."""
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "sparsifier": sparsifier.state_dict()}, path)
    return torch.load(path, weights_only=True)


def schedule_kwargs(method, delta_t, **if_taken):
    """Keywords for ``make_sparsifier(method, ...)``: the update period (GMP takes ``delta_t``
    as its pruning frequency), plus those of ``if_taken`` (such as ``alpha``) that the method's
    constructor names."""
    import sparsetrain as st
    from sparsetrain.runner.build import accepted_keywords

    taken = accepted_keywords(st.get_method(method))
    return {"delta_t": delta_t, **{k: v for k, v in if_taken.items() if k in taken}}


# The shared data beside the checkout (``../shared/data``), here and in CI. The library never
# looks there: tests that need a file from it get its path from a fixture.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CIFAR10_SAMPLE = SHARED_DATA / "cifar10_sample.npz"


@pytest.fixture
def cifar10_sample(monkeypatch) -> Path:
    """The CIFAR-10 sample beside the checkout, also named by ``$SPARSETRAIN_CIFAR10_SAMPLE``
    for the test's duration; the test is skipped when the file is not there."""
    if not CIFAR10_SAMPLE.is_file():
        pytest.skip(f"the CIFAR-10 sample is not beside this checkout ({CIFAR10_SAMPLE})")
    monkeypatch.setenv("SPARSETRAIN_CIFAR10_SAMPLE", str(CIFAR10_SAMPLE))
    return CIFAR10_SAMPLE


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd-momentum-wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4),
    "sgd-nesterov": lambda p: torch.optim.SGD(
        p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3
    ),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-3),
    "adam-amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}


@pytest.fixture
def model():
    torch.manual_seed(0)
    return tiny_cnn()


@pytest.fixture(params=["compiled", "torch"])
def kernels(request, monkeypatch):
    """The compiled kernels (where they build), or torch's operations in their place; the CSR
    fallback's once-only warning is reset."""
    monkeypatch.setattr(csr_ops, "_WARNED", set())
    if request.param == "torch":
        monkeypatch.setattr(kernels_module, "_KERNELS", False)
    elif kernels_module.compiled_kernels() is None:
        pytest.skip("the compiled kernels cannot be built here")
    return request.param
