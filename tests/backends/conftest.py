"""What the CSR tests share (the kernels fixture, compiled or torch, is in tests/conftest.py)."""

import pytest


#: Silences the warning that the compiled kernels are not available (the "torch" runs).
quiet = pytest.mark.filterwarnings("ignore:sparsetrain. the compiled CSR kernels")
