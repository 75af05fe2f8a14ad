"""Reports of finished runs: tables like the RigL paper's, plots, Markdown and HTML.

``write_report(paths, out_dir)`` reads every run folder under ``paths`` (``results``: a folder
holding a ``summary.json``; folders without one are unfinished and listed as such; a summary
that cannot be read or lacks what the report shows is a ``ConfigError`` that names the file)
and writes ``report.md``, ``report.html`` and the PNG plots of ``plots``.

Runs on each kind of data get a table of their own (``TABLES``): on classification data the
test accuracy; on sequence data (byte-level text, ``--data text``) the validation loss in nats
per byte, the mean cross-entropy of predicting each held-out byte from the bytes before it in
its sequence (lower is better; bits per byte = nats / ln 2), and the next-byte accuracy. Both
with mean ± standard deviation over the seeds, and training and inference FLOPs relative to
dense (a multiply-add counts as 2 FLOPs). The FLOPs include attention's products and softmax
(``sparsetrain.flops``), which sparse weights do not make cheaper: on ``gpt-mini`` the
inference FLOPs relative to dense stay above the density.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any, Callable, Iterable

from .comparison import method_label, verdicts
from .folder import SUMMARY
from .plots import make_plots
from .results import KINDS, bits, collect_runs, data_descriptions, summarise

__all__ = ["TABLES", "collect_runs", "format_table", "format_verdicts", "summarise",
           "write_report"]


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}x"


def _spread(mean: str, std: str) -> Callable[[dict[str, Any]], str]:
    return lambda r: f"{r[mean]:.4f} ± {r[std]:.4f} ({r['n']})"


def _vs_static(row: dict[str, Any]) -> str:
    d = row["vs_static"]
    if d is None:
        return "-"
    if d.low is None:
        return f"{d.mean:+.4f} (1)"
    return f"{d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}] ({d.n})"


Column = tuple[str, Callable[[dict[str, Any]], str]]
_FIRST: list[Column] = [("model", lambda r: r["model"]), ("method", method_label),
                        ("distribution", lambda r: r["distribution"]),
                        ("density", lambda r: f"{r['density']:.3g}")]
_FLOPS: list[Column] = [("train FLOPs vs dense", lambda r: _ratio(r["train_flops"])),
                        ("inference FLOPs vs dense", lambda r: _ratio(r["inference_flops"])),
                        ("s/epoch", lambda r: "-" if r.get("epoch_seconds") is None
                         else f"{r['epoch_seconds']:.2f}")]
#: The columns of the table of each kind of data (the first three are text, left-aligned).
TABLES: dict[str, list[Column]] = {
    "classification": _FIRST + [("accuracy (mean ± std, n)", _spread("accuracy", "std")),
                                ("vs Static, paired [95% CI] (n)", _vs_static)] + _FLOPS,
    "sequence": _FIRST + [
        ("validation loss, nats/byte (mean ± std, n)", _spread("loss", "loss_std")),
        ("vs Static, paired [95% CI] (n)", _vs_static),
        ("bits/byte", lambda r: f"{bits(r['loss']):.4f}"),
        ("next-byte accuracy (mean ± std)", lambda r: f"{r['accuracy']:.4f} ± {r['std']:.4f}"),
    ] + _FLOPS,
}
_LEFT = 3
#: What ``sparsetrain analyze`` writes, in the order a report links it.
ANALYSIS_FILES = [
    ("analysis.md", "analysis: mask overlap, barriers, exploration (tables)"),
    ("lines.png", "loss along lines from initialisation and between solutions"),
    ("layer_density.png", "per-layer density over time"),
    ("grad_norm.png", "gradient norm through training"),
    ("grad_norm_layers.png", "gradient norm per layer"),
]


def _tables(rows: list[dict[str, Any]]) -> list[tuple[list[Column], list[dict[str, Any]]]]:
    """(columns, rows) for each kind of data in ``rows``; the classification columns alone
    when there are none."""
    tables = [(TABLES[k], [r for r in rows if r["kind"] == k]) for k in KINDS]
    return [t for t in tables if t[1]] or [(TABLES[KINDS[0]], [])]


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as Markdown tables, one per kind of data."""
    tables = []
    for columns, chosen in _tables(rows):
        lines = ["| " + " | ".join(h for h, _ in columns) + " |",
                 "|" + "|".join("---" if i < _LEFT else "---:" for i in range(len(columns)))
                 + "|"]
        lines += ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in chosen]
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def format_verdicts(rows: list[dict[str, Any]]) -> str:
    """What the intervals allow one to say against Static, a line per density (empty when no
    row has a Static row to compare with)."""
    lines = verdicts(rows)
    if not lines:
        return ""
    return ("Against Static over the same seeds (a method is ranked only where the 95% interval "
            "of the paired difference excludes 0):\n" + "\n".join(f"- {x}" for x in lines))


def _intro(finished: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    models = sorted({r["summary"].get("model", "?") for r in finished})
    data = sorted({r["summary"].get("data", "?") for r in finished})
    kinds = {r["kind"] for r in rows}
    text = f"{len(finished)} finished runs of {', '.join(models)} on {', '.join(data)}. "
    if "classification" in kinds:
        text += ("Accuracy is the test accuracy at the end of training (mean ± standard "
                 "deviation over seeds, n runs); ")
    if "sequence" in kinds:
        text += ("Validation loss is the cross-entropy of predicting each held-out byte from "
                 "the bytes before it, in nats per byte at the end of training (mean ± "
                 "standard deviation over seeds, n runs; lower is better; bits per byte = "
                 "nats / ln 2), next-byte accuracy the fraction of bytes predicted right; ")
    text += ("'vs Static' is the mean over seeds of the difference to Static run with the same "
             "seed, at the same density, with its 95% confidence interval (Student's t over the "
             "n paired seeds; no interval for n = 1); ")
    text += "FLOPs count a multiply-add as 2 and are relative to the dense model"
    if "sequence" in kinds:
        text += (" (they include attention's products and softmax, which sparse weights do not "
                 "make cheaper)")
    return text + "."


def analysis_links(analysis: Path | None, out_dir: Path) -> list[tuple[str, str]]:
    """(relative path, what it shows) of the files ``sparsetrain analyze`` wrote to
    ``analysis``, as seen from ``out_dir``."""
    if analysis is None or not (Path(analysis) / "analysis.md").is_file():
        return []
    found = []
    for name, what in ANALYSIS_FILES:
        if (Path(analysis) / name).is_file():
            found.append((os.path.relpath(Path(analysis) / name, out_dir), what))
    return found


def write_report(paths: Iterable[str | Path], out_dir: str | Path, *,
                 title: str | None = None, analysis: Path | None = None) -> Path:
    """Write ``report.md``, ``report.html`` and the plots to ``out_dir``; return report.md.
    ``analysis``: the folder where ``sparsetrain analyze`` wrote about the same runs, linked
    from the report."""
    runs = collect_runs(paths)
    finished = [r for r in runs if r["summary"] is not None]
    if not finished:
        raise ValueError(f"no finished runs (folders with a {SUMMARY}) in the given paths")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = summarise(runs)
    made = make_plots(rows, finished, out_dir)
    title = title or "Sparse training report"
    intro = _intro(finished, rows)
    data = data_descriptions(finished)
    unfinished = [r["folder"].name for r in runs if r["summary"] is None]
    verdict = format_verdicts(rows)
    md = [f"# {title}", "", intro, "", format_table(rows), ""]
    if verdict:
        md += [verdict, ""]
    if data:
        md += ["Data: " + "; ".join(data), ""]
    for name, caption in made:
        md += [f"![{name}]({name})", "", caption, ""]
    links = analysis_links(analysis, out_dir)
    if links:
        md += ["## Analysis", ""] + [f"- [{what}]({path})" for path, what in links] + [""]
    md += ["## Runs", ""] + [f"- `{r['folder'].name}`" for r in finished]
    if unfinished:
        md += ["", "Not finished (left out): " + ", ".join(f"`{n}`" for n in unfinished)]
    (out_dir / "report.md").write_text("\n".join(md) + "\n")
    (out_dir / "report.html").write_text(_html(title, intro, rows, data, made, finished,
                                               unfinished, verdicts(rows), links))
    return out_dir / "report.md"


def _html(title, intro, rows, data, made, finished, unfinished, verdict_lines, links) -> str:
    e = html.escape
    tables = "".join(
        "<table><tr>" + "".join(f"<th>{e(h)}</th>" for h, _ in columns) + "</tr>"
        + "".join("<tr>" + "".join(f"<td>{e(cell(r))}</td>" for _, cell in columns) + "</tr>"
                  for r in chosen) + "</table>"
        for columns, chosen in _tables(rows))
    described = f"<p>Data: {e('; '.join(data))}</p>" if data else ""
    if verdict_lines:
        described = ("<p>Against Static over the same seeds (ranked only where the 95% interval "
                     "excludes 0):</p><ul>" + "".join(f"<li>{e(x)}</li>" for x in verdict_lines)
                     + "</ul>" + described)
    figures = "".join(f'<figure><img src="{e(n)}" alt="{e(n)}"><figcaption>{e(c)}</figcaption>'
                      "</figure>" for n, c in made)
    runs = "".join(f"<li><code>{e(r['folder'].name)}</code></li>" for r in finished)
    if links:
        figures += ("<h2>Analysis</h2><ul>" + "".join(
            f'<li><a href="{e(path)}">{e(what)}</a></li>' for path, what in links) + "</ul>")
    left = (f"<p>Not finished (left out): {e(', '.join(n for n in unfinished))}</p>"
            if unfinished else "")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;"
             "padding:4px 8px;text-align:right}td:nth-child(-n+3),th{text-align:left}"
             "img{max-width:100%}figure{margin:2em 0}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title>"
            f"<style>{style}</style></head><body><h1>{e(title)}</h1><p>{e(intro)}</p>"
            f"{tables}{described}{figures}<h2>Runs</h2><ul>{runs}</ul>{left}"
            "</body></html>\n")
