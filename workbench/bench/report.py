"""Writing a suite's results: one CSV per measurement table, ``figures.csv``,
``summary.md`` (machine, command, one table of every figure), plotly HTML pages (one per
benchmark plus ``summary.html``) and the JSON document ``--json`` prints."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from workbench.bench.core import Figure

if TYPE_CHECKING:
    from workbench.bench.suite import SuiteResult

READING = ("Every figure divides a value by a baseline measured in the same run, next to it (interleaved "
           "repeats, best of each), in the same unit: ratio = value / baseline. For a time (\"x baseline "
           "time\") below 1 is faster than the baseline; for a rate (\"x baseline rate\") above 1 is faster; "
           "for a size, below 1 is smaller.")


def fmt_value(value: float | None, unit: str) -> str:
    """A value with its unit, scaled for reading (ms below one second, GiB for bytes)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit == "s":
        return f"{value * 1e3:,.3g} ms" if value < 1 else f"{value:,.2f} s"
    if unit == "bytes":
        return f"{value / 2**30:,.2f} GiB"
    return f"{value:,.3g} {unit}" if value < 1000 else f"{value:,.0f} {unit}"


def figures_frame(figures: list[Figure]) -> pd.DataFrame:
    """One row per figure: the Figure fields plus ratio and reads_as."""
    cols = ["bench", "name", "sizes", "value", "unit", "baseline_name", "baseline", "ratio", "higher_is_better",
            "reads_as", "note"]
    return pd.DataFrame([f.row() for f in figures], columns=cols)


def read_figures(path: Path) -> list[Figure]:
    """Figures read back from a ``figures.csv``."""
    df = pd.read_csv(path, dtype={"note": str, "sizes": str})
    return [Figure(r.bench, r.name, r.sizes, float(r.value), r.unit, r.baseline_name, float(r.baseline),
                   bool(r.higher_is_better), r.note if isinstance(r.note, str) else "") for r in df.itertuples()]


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def summary_markdown(suite: "SuiteResult") -> str:
    """The summary page: command, machine, the table of every figure, notes."""
    m = suite.machine
    lines = ["# ds4-workbench benchmarks", "",
             f"Command: `{suite.command}`  ",
             f"Mode: {suite.mode}; {len(suite.results)} of {len(suite.planned)} benchmarks run; wall time "
             f"{suite.seconds:,.0f} s (" + ", ".join(f"{r.name} {r.seconds:,.0f} s" for r in suite.results)
             + f"); written {suite.finished}", "",
             "## Machine", "",
             "| CPU | cores | RAM | system | Python | MLX | MLX device | BLAS |",
             "|---|---|---|---|---|---|---|---|",
             f"| {_md_cell(m['cpu'])} | {m['cores']} | {m['ram_gib']} GiB | {_md_cell(m['system'])} | {m['python']} "
             f"| {m['mlx']} | {m['mlx_device']} | {m['blas']} |", "",
             "## Figures", "", READING, "",
             "| benchmark | figure | sizes | value | baseline | baseline value | ratio | reads as | note |",
             "|---|---|---|---:|---|---:|---:|---|---|"]
    for f in suite.figures:
        lines.append(f"| {f.bench} | {_md_cell(f.name)} | {_md_cell(f.sizes)} | {fmt_value(f.value, f.unit)} "
                     f"| {_md_cell(f.baseline_name)} | {fmt_value(f.baseline, f.unit)} | {f.ratio:,.3g} "
                     f"| {f.reads_as} | {_md_cell(f.note)} |")
    notes = [(r.name, n) for r in suite.results for n in r.notes]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {name}: {_md_cell(n)}" for name, n in notes]
    tables = [t for r in suite.results for t in r.tables]
    lines += ["", "## Files", "", "Measurements: " + ", ".join(f"`{t}.csv`" for t in tables)
              + "; every figure: `figures.csv`; charts: " + ", ".join(f"`{r.name}.html`" for r in suite.results
                                                                       if r.charts) + ", `summary.html`.", ""]
    return "\n".join(lines)


def ratio_chart(figures: list[Figure]) -> Any:
    """Horizontal bars of every figure's ratio on a log axis, 1 marked."""
    import plotly.graph_objects as go

    names = [f"{f.name} ({f.reads_as})" for f in figures]
    fig = go.Figure(go.Bar(x=[f.ratio for f in figures], y=names, orientation="h",
                           marker_color=["#2ca02c" if (f.ratio >= 1) == f.higher_is_better else "#d62728"
                                         for f in figures],
                           hovertext=[f"{f.sizes}<br>baseline: {f.baseline_name}" for f in figures]))
    fig.add_vline(x=1, line_dash="dash", line_color="black")
    fig.update_layout(title="Every figure over its baseline (green: better than the baseline)", xaxis_type="log",
                      xaxis_title="ratio = value / baseline", height=max(300, 24 * len(figures) + 120),
                      yaxis_autorange="reversed", template="plotly_white", margin=dict(l=320))
    return fig


def grouped_bars(x: list, series: list[tuple[str, list]], title: str, yaxis_title: str) -> Any:
    """A plotly figure of grouped bars: one trace per ``(name, values)`` over the categories ``x``
    (the shape of most benchmarks' charts)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, values in series:
        fig.add_bar(x=x, y=values, name=name)
    fig.update_layout(title=title, yaxis_title=yaxis_title, barmode="group", template="plotly_white")
    return fig


def _figures_html(figures: list[Figure]) -> str:
    rows = "".join(f"<tr><td style='text-align:left'>{html.escape(f.name)}</td><td style='text-align:left'>"
                   f"{html.escape(f.sizes)}</td><td>{html.escape(fmt_value(f.value, f.unit))}</td>"
                   f"<td style='text-align:left'>{html.escape(f.baseline_name)}</td>"
                   f"<td>{html.escape(fmt_value(f.baseline, f.unit))}</td><td>{f.ratio:,.3g}</td>"
                   f"<td style='text-align:left'>{html.escape(f.reads_as)}</td></tr>" for f in figures)
    return ("<table><tr><th>figure</th><th>sizes</th><th>value</th><th>baseline</th><th>baseline value</th>"
            f"<th>ratio</th><th>reads as</th></tr>{rows}</table><p>{html.escape(READING)}</p>")


def write(suite: "SuiteResult", out_dir: Path) -> list[Path]:
    """Write every output file of ``suite`` into ``out_dir``; return their paths."""
    from workbench.viz import report_html

    out_dir.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    for r in suite.results:
        for table, rows in r.tables.items():
            path = out_dir / f"{table}.csv"
            pd.DataFrame(rows).to_csv(path, index=False)
            files.append(path)
        if r.charts:
            files.append(report_html(r.charts, out_dir / f"{r.name}.html", f"ds4-workbench bench: {r.name}",
                                     _figures_html(r.figures) + "".join(f"<p>{html.escape(n)}</p>" for n in r.notes)))
    path = out_dir / "figures.csv"
    figures_frame(suite.figures).to_csv(path, index=False)
    files.append(path)
    path = out_dir / "summary.md"
    path.write_text(summary_markdown(suite), encoding="utf-8")
    files.append(path)
    if suite.figures:
        files.append(report_html([ratio_chart(suite.figures)], out_dir / "summary.html",
                                 "ds4-workbench benchmarks: every figure over its baseline",
                                 f"<p><code>{html.escape(suite.command)}</code></p>" + _figures_html(suite.figures)))
    return files


def as_json(suite: "SuiteResult") -> dict[str, Any]:
    """The JSON document: machine, command, mode, every figure (with ratio), notes, files."""
    return {"command": suite.command, "mode": suite.mode, "planned": suite.planned, "finished": suite.finished,
            "seconds": suite.seconds,
            "machine": suite.machine, "figures": [f.row() for f in suite.figures],
            "notes": [{"bench": r.name, "note": n} for r in suite.results for n in r.notes],
            "failed": suite.failed, "files": [str(p) for p in suite.files]}


