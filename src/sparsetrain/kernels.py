"""The compiled OpenMP kernels (``backends/csrc/``: ``csr_kernels.cpp``, the products,
``set_kernels.cpp``, active sets and scores, and ``graph_kernels.cpp``, CHT's link
prediction), built with the machine's g++
on first use and cached by torch; ``None`` where they cannot be built, and every caller then
uses torch's own operations (same results, more slowly)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

_KERNELS: Any = None
SOURCES = [Path(__file__).with_name("backends") / "csrc" / f for f in ("csr_kernels.cpp",
                                                                    "set_kernels.cpp",
                                                                    "graph_kernels.cpp")]


def compiled_kernels():
    """The compiled extension module, or ``None``."""
    global _KERNELS
    if _KERNELS is None:
        try:
            from torch.utils.cpp_extension import load

            _KERNELS = load("sparsetrain_csr", [str(s) for s in SOURCES],
                            extra_cflags=["-O3", "-fopenmp", "-march=native"],
                            extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as exc:  # no compiler, no headers, a failed build: fall back
            warnings.warn(f"sparsetrain: the compiled CSR kernels are not available ({exc}); "
                          "using torch's sparse operations, which are slower", RuntimeWarning,
                          stacklevel=2)
            _KERNELS = False
    return _KERNELS or None
