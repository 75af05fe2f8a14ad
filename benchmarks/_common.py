"""What the benchmark scripts share."""

from __future__ import annotations

from pathlib import Path


def write_result(lines: list[str], out: Path) -> str:
    """Write the Markdown ``lines`` to ``out`` (under benchmarks/results/), print and return it."""
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return text
