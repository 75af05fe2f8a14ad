"""Each method against Static over the same seeds, and what the intervals allow one to say.

``compare_to_static(rows)`` sets every row's ``vs_static`` (rows of ``results.summarise``,
whose ``seeds`` map seed -> measure): the paired difference to the Static row of the same kind
of data, model, density and training length (and distribution; a small-dense row, which has
none, is compared when Static has one distribution at its density), with its 95% confidence
interval (``stats.paired_difference``). ``verdicts(rows)`` turns those into sentences that
rank a method above or below Static only where the interval excludes 0.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from .stats import paired_difference

__all__ = ["compare_to_static", "judged_by", "method_label", "verdicts"]


def judged_by(kind: str) -> tuple[str, int]:
    """The summary key rows of ``kind`` are judged by, and +1 if higher is better (-1 for a
    loss)."""
    return ("test_loss", -1) if kind == "sequence" else ("test_accuracy", 1)


def method_label(row: dict[str, Any]) -> str:
    """The method of a row, with its training length when that is not 1 (``rigl 5x``) and
    its variant when it has one (``snip [prune_ablation shuffle]``)."""
    length = row.get("length", 1.0)
    label = row["method"] if length == 1.0 else f"{row['method']} {length:g}x"
    return f"{label} [{row['variant']}]" if row.get("variant") else label


def compare_to_static(rows: list[dict[str, Any]]) -> None:
    """Set each row's ``vs_static``: its paired difference to the Static row of the same kind,
    model, density and length (and distribution; a small-dense row, which has none, is
    compared when there is one Static distribution at its density)."""
    static: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r["method"] == "static":
            static[(r["kind"], r["model"], r["density"], r["length"])].append(r)
    for r in rows:
        if r["method"] in ("static", "dense") or r["seeds"] is None:
            continue
        candidates = static.get((r["kind"], r["model"], r["density"], r["length"]), [])
        if r["distribution"] != "-":
            candidates = [c for c in candidates if c["distribution"] == r["distribution"]]
        if len(candidates) > 1:  # Static in several variants: the same one, else the plain one
            same = [c for c in candidates if c.get("variant") == r.get("variant")]
            candidates = same or [c for c in candidates if not c.get("variant")]
        if len(candidates) == 1 and candidates[0]["seeds"] is not None:
            r["vs_static"] = paired_difference(r["seeds"], candidates[0]["seeds"])


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """One line per (kind, model, density, length) with a Static row: the methods whose 95%
    interval of the paired difference to Static lies above or below 0, and those it cannot
    separate from Static (or that share fewer than two seeds with it)."""
    lines = []
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r["vs_static"] is not None:
            groups[(r["kind"], r["model"], r["density"], r["length"])].append(r)
    for (kind, model, density, length), items in groups.items():
        sign = judged_by(kind)[1]
        better, worse, unclear, few = [], [], [], []
        for r in items:
            d = r["vs_static"]
            name = _label_with_distribution(r, items)
            if d.low is None:
                few.append(name)
            elif not d.excludes_zero:
                unclear.append(name)
            else:
                text = f"{name} ({d.mean:+.4f}, 95% CI {d.low:+.4f} to {d.high:+.4f})"
                (better if d.mean * sign > 0 else worse).append(text)
        at = f"{model} at density {density:.3g}" + (f", {length:g}x" if length != 1.0 else "")
        parts = []
        if better:
            parts.append("better than Static: " + ", ".join(better))
        if worse:
            parts.append("worse than Static: " + ", ".join(worse))
        if unclear:
            parts.append("not distinguishable from Static: " + ", ".join(unclear))
        if few:
            parts.append("fewer than 2 seeds shared with Static, no interval: " + ", ".join(few))
        lines.append(f"{at}: " + "; ".join(parts) + ".")
    return lines


def _label_with_distribution(row: dict[str, Any], items: list[dict[str, Any]]) -> str:
    several = len({r["distribution"] for r in items if r["distribution"] != "-"}) > 1
    label = method_label(row)
    return f"{label} ({row['distribution']})" if several and row["distribution"] != "-" else label
