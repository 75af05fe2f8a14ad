"""What the CSR tests share: running with the compiled kernels and with torch's operations."""

import pytest

import sparsetrain.backends.csr_ops as csr_ops
import sparsetrain.kernels as kernels_module

#: Silences the warning that the compiled kernels are not available (the "torch" runs).
quiet = pytest.mark.filterwarnings("ignore:sparsetrain. the compiled CSR kernels")


@pytest.fixture(params=["compiled", "torch"])
def kernels(request, monkeypatch):
    """The compiled kernels (where they build), or torch's sparse operations in their place;
    the fallback's once-only warning is reset."""
    monkeypatch.setattr(csr_ops, "_WARNED", set())
    if request.param == "torch":
        monkeypatch.setattr(kernels_module, "_KERNELS", False)
    elif kernels_module.compiled_kernels() is None:
        pytest.skip("the compiled CSR kernels cannot be built here")
    return request.param
