"""Claims of the papers, measured on finished runs: each one a paired comparison over seeds,
a correlation, or a count of collapsed layers, with a verdict.

A claim selects runs by their settings (``Arms``: every given setting must be equal in the
run's ``config``; settings not given may be anything, so a selection must name all that
differ between the runs of a folder). Verdicts:

- ``A > B`` (``test="superior"``): *holds* when the 95% interval of the paired difference
  A - B (same seeds) lies above 0, *does not hold* when it lies below 0, else *inconclusive*.
- ``A >= B`` (``test="at-least"``): *holds* when the interval lies above 0, or contains 0
  and lies above ``-MARGIN`` (no loss larger than the margin is compatible with the runs);
  *does not hold* when it lies below 0; else *inconclusive* (too few seeds, or too much
  spread, to tell).
- a correlation claim: Pearson's r over runs, with the interval of Fisher's z transform;
  *holds* when it lies above 0, *does not hold* below 0.
- the collapse claim: the fraction of runs whose final masks leave some layer empty.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from .config import ConfigError, saved_setting
from .stats import Difference, paired_difference

#: The loss of accuracy that an ``A >= B`` claim tolerates when the interval contains 0.
MARGIN = 0.005
HOLDS, FAILS, UNCLEAR = "holds", "does not hold", "inconclusive"


@dataclass(frozen=True)
class Claim:
    """One row of the claims table: ``kind`` is ``"superior"``, ``"at-least"``,
    ``"correlation"`` or ``"collapse"``; ``a`` and ``b`` select the runs compared (for a
    correlation, ``a`` selects every run of it; for a collapse claim, ``a`` is the method
    claimed to avoid it and ``others`` the methods that may not)."""

    claim: str
    source: str
    setting: str
    kind: str
    a: Mapping[str, Any]
    b: Mapping[str, Any] = field(default_factory=dict)
    others: tuple[Mapping[str, Any], ...] = ()
    metric: str = "test_accuracy"


@dataclass
class Measured:
    claim: Claim
    text: str
    verdict: str
    n: int


def matches(summary: Mapping[str, Any], selector: Mapping[str, Any]) -> bool:
    """Whether the run of ``summary`` has every setting of ``selector`` (``density`` is not
    compared for dense runs)."""
    config = summary.get("config", {})
    for key, value in selector.items():
        if key == "density" and config.get("method") == "dense":
            continue
        have = saved_setting(config, key)
        if isinstance(value, tuple):  # one of several values
            if not any(_equal(have, v) for v in value):
                return False
        elif not _equal(have, value):
            return False
    return True


def _equal(have: Any, value: Any) -> bool:
    if have == value:
        return True
    numbers = (int, float)
    return (isinstance(have, numbers) and isinstance(value, numbers) and not isinstance(
        have, bool) and not isinstance(value, bool) and math.isclose(have, value))


def select(summaries: Iterable[Mapping[str, Any]], selector: Mapping[str, Any]
           ) -> list[Mapping[str, Any]]:
    return [s for s in summaries if matches(s, selector)]


def by_seed(runs: list[Mapping[str, Any]], metric: str, what: str) -> dict[int, float]:
    """seed -> ``metric`` of ``runs``; a ``ConfigError`` when two runs share a seed (the
    selection ``what`` does not tell them apart)."""
    values: dict[int, float] = {}
    for s in runs:
        seed = int(s["config"]["seed"])
        if seed in values:
            raise ConfigError(f"two finished runs of {what} have seed {seed}: the claim's "
                              "selection must name the setting in which they differ")
        values[seed] = float(s[metric])
    return values


def verdict(d: Difference, kind: str) -> str:
    if d.low is None:
        return UNCLEAR
    if d.low > 0:
        return HOLDS
    if d.high < 0:
        return FAILS
    if kind == "at-least" and d.low >= -MARGIN:
        return HOLDS
    return UNCLEAR


def correlation(x: list[float], y: list[float]) -> tuple[float, float | None, float | None]:
    """Pearson's r with its 95% interval (Fisher's z transform; none below 4 points or when
    r is +-1 or undefined)."""
    if len(x) < 2 or statistics.pstdev(x) == 0 or statistics.pstdev(y) == 0:
        return math.nan, None, None
    r = statistics.correlation(x, y)
    if len(x) < 4 or abs(r) >= 1:
        return r, None, None
    z, se = math.atanh(r), 1 / math.sqrt(len(x) - 3)
    return r, math.tanh(z - 1.959964 * se), math.tanh(z + 1.959964 * se)


def collapsed(summary: Mapping[str, Any]) -> bool:
    """Whether some sparsified layer of the run ended with at most one active weight: empty,
    or holding only the one weight that global pruning keeps in a layer it would otherwise
    empty (``selection.select_global``), which leaves the layer all but cut. From
    ``layer_active_counts`` where the summary has them, else from ``layer_densities`` (an
    empty layer only)."""
    counts = summary.get("layer_active_counts")
    if isinstance(counts, Mapping) and counts:
        return any(v <= 1 for v in counts.values())
    return any(v == 0 for v in summary.get("layer_densities", {}).values())


def measure(claim: Claim, summaries: list[Mapping[str, Any]]) -> Measured:
    """``claim`` measured on the finished runs ``summaries``."""
    if claim.kind in ("superior", "at-least"):
        a = by_seed(select(summaries, claim.a), claim.metric, claim.claim)
        b = by_seed(select(summaries, claim.b), claim.metric, claim.claim)
        if not a or not b:
            return Measured(claim, "no runs (train them first)", UNCLEAR, 0)
        d = paired_difference(a, b)
        if d is None:
            return Measured(claim, "the two sets of runs share no seed", UNCLEAR, 0)
        mean_a = statistics.fmean(a.values())
        mean_b = statistics.fmean(b.values())
        interval = ("no interval (fewer than 2 shared seeds)" if d.low is None else
                    f"95% CI {d.low:+.4f} to {d.high:+.4f}")
        text = f"{mean_a:.4f} vs {mean_b:.4f}: {d.mean:+.4f}, {interval}"
        return Measured(claim, text, verdict(d, claim.kind), d.n)
    if claim.kind == "correlation":
        runs = select(summaries, claim.a)
        x = [float(s["ever_active_fraction"]) for s in runs]
        y = [float(s[claim.metric]) for s in runs]
        r, low, high = correlation(x, y)
        if low is None:
            return Measured(claim, f"r = {r:.2f} over {len(runs)} runs, no interval",
                            UNCLEAR, len(runs))
        text = (f"r = {r:+.2f} (95% CI {low:+.2f} to {high:+.2f}) over {len(runs)} runs; "
                f"ever-active {min(x):.3f} to {max(x):.3f}")
        return Measured(claim, text, HOLDS if low > 0 else FAILS if high < 0 else UNCLEAR,
                        len(runs))
    if claim.kind == "collapse":
        mine = select(summaries, claim.a)
        theirs = [(o.get("method", "?"), select(summaries, o)) for o in claim.others]
        count = sum(map(collapsed, mine))
        parts = [f"{claim.a.get('method', '?')} {count}/{len(mine)}"] + [
            f"{name} {sum(map(collapsed, runs))}/{len(runs)}" for name, runs in theirs]
        accuracy = ", ".join(f"{name} {statistics.fmean(s['test_accuracy'] for s in runs):.3f}"
                             for name, runs in [(claim.a.get("method", "?"), mine), *theirs]
                             if runs)
        text = (f"runs with a layer of at most one weight: {', '.join(parts)}; accuracy "
                f"{accuracy}")
        others_collapse = any(collapsed(s) for _, runs in theirs for s in runs)
        if not mine:
            return Measured(claim, "no runs (train them first)", UNCLEAR, 0)
        result = FAILS if count else HOLDS if others_collapse else UNCLEAR
        return Measured(claim, text, result, len(mine))
    raise ValueError(f"unknown kind of claim {claim.kind!r}")


def claims_table(measured: list[Measured]) -> list[str]:
    """The markdown table of ``measured`` claims."""
    lines = ["| claim | source | measured | model and data | n | verdict |",
             "|---|---|---|---|---:|---|"]
    for m in measured:
        lines.append(f"| {m.claim.claim} | {m.claim.source} | {m.text} | {m.claim.setting} | "
                     f"{m.n} | **{m.verdict}** |")
    return lines
