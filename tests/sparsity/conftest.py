"""What the sparsity tests share: running with the compiled kernels and with torch's operations."""

import pytest

import sparsetrain.kernels as kernels_module


@pytest.fixture(params=["compiled", "torch"])
def kernels(request, monkeypatch):
    """The compiled kernels (where they build), or torch's operations in their place."""
    if request.param == "torch":
        monkeypatch.setattr(kernels_module, "_KERNELS", False)
    elif kernels_module.compiled_kernels() is None:
        pytest.skip("the compiled kernels cannot be built here")
    return request.param
