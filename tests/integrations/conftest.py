"""Shared by the integration tests: one intra-op thread for their tiny models."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """The models here are tiny: a second intra-op thread only adds waiting (tens of times
    slower on a busy two-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
