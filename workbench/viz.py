"""Plotly figures, each built from a DataFrame (engine records, store entries, layouts).

Every function takes plain data and returns a ``go.Figure``; widgets wrap them in
``go.FigureWidget`` and update them live. Column names are those of
:mod:`workbench.telemetry` unless stated otherwise.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd
import plotly.graph_objects as go

from workbench.atomic import atomic_write
from workbench.spec.statelayout import StateLayout

MIB = 1024 * 1024
SOURCE_COLORS = {"live": "#2ca02c", "disk": "#1f77b4", "none": "#bbbbbb"}
KIND_COLORS = {"raw window": "#9467bd", "compressed": "#1f77b4", "indexer": "#ff7f0e", "frontiers": "#7f7f7f"}
REASON_COLORS = {"cold": "#1f77b4", "continued": "#17becf", "evict": "#d62728", "shutdown": "#8c564b"}


def _requests(df: pd.DataFrame) -> pd.DataFrame:
    req = df[df["event"] == "request"].copy()
    req["label"] = [f"#{int(r)} {c}".strip() for r, c in zip(req["request"], req["conversation"])]
    return req


def _layout(fig: go.Figure, title: str, x: str, y: str) -> go.Figure:
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, template="plotly_white",
                      legend=dict(orientation="h", y=-0.2), margin=dict(l=60, r=20, t=50, b=60))
    return fig


def tokens_per_request(df: pd.DataFrame) -> go.Figure:
    """Stacked bars per request: cached tokens (coloured by source) + suffix prefilled + generated."""
    req = _requests(df)
    fig = go.Figure()
    for source in ("live", "disk"):
        part = req["cached_tokens"].where(req["source"] == source, 0)
        fig.add_bar(x=req["label"], y=part, name=f"cached ({source})", marker_color=SOURCE_COLORS[source])
    fig.add_bar(x=req["label"], y=req["suffix_tokens"], name="suffix prefill", marker_color="#ff7f0e")
    fig.add_bar(x=req["label"], y=req["generated_tokens"], name="generated", marker_color="#c7c7c7")
    fig.update_layout(barmode="stack")
    return _layout(fig, "Tokens per request: reused vs prefilled vs generated", "request", "tokens")


STRIP_COLORS = {"disk": SOURCE_COLORS["disk"], "live": SOURCE_COLORS["live"], "prefilled": "#ff7f0e",
                "generated": "#c7c7c7"}


def strip_figure(labels: Sequence[str], parts: dict[str, Sequence[float]],
                 ticks: Sequence[tuple[str, float, str]]) -> go.Figure:
    """The token strip: one horizontal bar per request, ``parts`` (disk, live, prefilled,
    generated: tokens per request) stacked, and a tick at each (label, tokens, hover text)."""
    fig = go.Figure()
    for name in ("disk", "live", "prefilled", "generated"):
        fig.add_bar(y=list(labels), x=list(parts.get(name, [0] * len(labels))), name=name, orientation="h",
                    marker_color=STRIP_COLORS[name], hovertemplate=f"{name}: %{{x:,}} tokens<extra></extra>")
    fig.add_scatter(x=[t[1] for t in ticks], y=[t[0] for t in ticks], mode="markers", name="checkpoint",
                    marker=dict(symbol="line-ns-open", size=14, color="black", line=dict(width=2)),
                    text=[t[2] for t in ticks], hovertemplate="%{text}<extra></extra>")
    fig.update_layout(barmode="stack", yaxis=dict(autorange="reversed"), height=max(260, 22 * len(labels) + 120))
    return _layout(fig, "Token strip: where each prompt token came from, and the checkpoints", "tokens", "")


def token_strip(df: pd.DataFrame) -> go.Figure:
    """The token strip of an engine's records: cached tokens by source, prefilled, generated,
    with a tick at every checkpoint saved while serving the request."""
    req = _requests(df)
    labels = list(req["label"])
    parts = {source: list(req["cached_tokens"].where(req["source"] == source, 0).fillna(0)) for source in ("disk", "live")}
    parts["prefilled"] = list(req["suffix_tokens"].fillna(0))
    parts["generated"] = list(req["generated_tokens"].fillna(0))
    label_of = dict(zip(req["request"], labels))
    saved = df["reason"].isin(list(REASON_COLORS))  # "cold", not "cold skipped: ..." or "cold failed: ..."
    saves = df[(df["event"] == "save") & saved & df["request"].isin(label_of)]
    ticks = [(label_of[r], t, f"{why} save, {t:,.0f} tokens") for r, t, why in
             zip(saves["request"], saves["tokens"], saves["reason"])]
    return strip_figure(labels, parts, ticks)


def ttft_breakdown(df: pd.DataFrame) -> go.Figure:
    """Time to first token split into lookup / restore / suffix prefill / saves, vs full prefill."""
    req = _requests(df)
    fig = go.Figure()
    for col, name, color in (("lookup_s", "lookup", "#7f7f7f"), ("restore_s", "restore", "#1f77b4"),
                             ("prefill_s", "suffix prefill", "#ff7f0e"), ("save_s", "saves on the path", "#d62728")):
        fig.add_bar(x=req["label"], y=req[col].fillna(0), name=name, marker_color=color)
    fig.add_scatter(x=req["label"], y=req["full_prefill_s"], mode="markers", name="full prefill (estimate)",
                    marker=dict(symbol="line-ew-open", size=28, color="black", line=dict(width=3)))
    fig.update_layout(barmode="stack")
    return _layout(fig, "Time to first token vs a full prefill", "request", "seconds")


def event_timeline(df: pd.DataFrame) -> go.Figure:
    """Cache events over time: saves by reason, hits by source, misses, evictions, failures."""
    ev = df[~df["event"].isin(["request", "progress"])].copy()
    ev["lane"] = [f"{e}: {r or s}" if e in ("save", "hit") else e
                  for e, r, s in zip(ev["event"], ev["reason"], ev["source"])]
    ev["tokens"] = ev["tokens"].fillna(0)
    biggest = max(float(ev["tokens"].max()) if len(ev) else 0.0, 1.0)
    fig = go.Figure()
    for lane, part in ev.groupby("lane", sort=True):
        reason = lane.split(": ")[-1]
        color = REASON_COLORS.get(reason) or SOURCE_COLORS.get(reason) or ("#d62728" if "fail" in lane else "#444")
        size = 8 + 12 * part["tokens"] / biggest
        fig.add_scatter(x=part["time_s"], y=[lane] * len(part), mode="markers", name=lane,
                        marker=dict(size=size, color=color),
                        text=[f"request {r}<br>{t:.0f} tokens<br>{Path(p).name}" if p else f"request {r}"
                              for r, t, p in zip(part["request"], part["tokens"], part["path"])],
                        hoverinfo="text+x")
    return _layout(fig, "Cache events", "seconds since start", "")


def save_restore_vs_size(df: pd.DataFrame, raw_write_bps: float | None = None,
                         raw_read_bps: float | None = None) -> go.Figure:
    """Save and restore seconds against checkpoint size, with the raw-disk lines (bytes/s)."""
    saves = df[(df["event"] == "save") & df["save_s"].notna()]
    hits = df[(df["event"] == "hit") & df["restore_s"].notna()]
    fig = go.Figure()
    fig.add_scatter(x=saves["bytes"] / MIB, y=saves["save_s"], mode="markers", name="save")
    fig.add_scatter(x=hits["bytes"] / MIB, y=hits["restore_s"], mode="markers", name="restore",
                    marker_symbol="diamond")
    top = float(pd.concat([saves["bytes"], hits["bytes"]]).max() or 0) / MIB
    for bps, name in ((raw_write_bps, "raw sequential write"), (raw_read_bps, "raw sequential read")):
        if bps and top:
            fig.add_scatter(x=[0, top], y=[0, top * MIB / bps], mode="lines", name=name, line=dict(dash="dot"))
    return _layout(fig, "Checkpoint save / restore time vs size", "checkpoint size (MiB)", "seconds")


def disk_usage(df: pd.DataFrame) -> go.Figure:
    """Bytes in the cache directory over time, against the budget."""
    d = df[df["disk_bytes"].notna()]
    fig = go.Figure()
    fig.add_scatter(x=d["time_s"], y=d["disk_bytes"] / MIB, mode="lines+markers", line_shape="hv", name="on disk")
    budget = df["budget_bytes"].dropna()
    if len(budget):
        fig.add_hline(y=float(budget.iloc[-1]) / MIB, line_dash="dash", line_color="#d62728",
                      annotation_text="budget")
    return _layout(fig, "Disk cache use", "seconds since start", "MiB")


def kv_bytes_by_layer(rows: Iterable[dict]) -> go.Figure:
    """Stacked bars of KV bytes per layer and kind (rows: layer, ratio, kind, bytes)."""
    df = pd.DataFrame(list(rows))
    fig = go.Figure()
    for kind, part in df.groupby("kind", sort=False):
        fig.add_bar(x=[f"L{l} (r{r})" for l, r in zip(part["layer"], part["ratio"])], y=part["bytes"] / MIB,
                    name=kind, marker_color=KIND_COLORS.get(kind))
    fig.update_layout(barmode="stack")
    return _layout(fig, "KV state per layer", "layer (compression ratio)", "MiB")


def kv_bytes_vs_context(layout: StateLayout, lengths: Sequence[int]) -> go.Figure:
    """KV bytes by kind (summed over layers) as the context grows, from the layout alone."""
    recs = []
    for T in lengths:
        for row in layout.layer_bytes_at(T):
            recs.append({"tokens": T, **row})
    df = pd.DataFrame(recs).groupby(["tokens", "kind"], as_index=False, sort=False)["bytes"].sum()
    fig = go.Figure()
    for kind, part in df.groupby("kind", sort=False):
        fig.add_scatter(x=part["tokens"], y=part["bytes"] / MIB, stackgroup="kv", name=kind,
                        line_color=KIND_COLORS.get(kind))
    return _layout(fig, f"KV state vs context length ({layout.n_layer} layers)", "tokens", "MiB")


def prefix_tree(entries: pd.DataFrame) -> go.Figure:
    """Cached checkpoints as an icicle: a checkpoint's parent is the longest other one whose text
    is a prefix of its text. ``entries`` columns: ``name``, ``tokens``, ``text`` (str or bytes),
    optional ``reason`` and ``hits``."""
    rows = entries.reset_index(drop=True)
    texts = [t.encode() if isinstance(t, str) else bytes(t) for t in rows["text"]]
    ids, parents, values, labels, hover = [], [], [], [], []
    for i, t in enumerate(texts):
        best = None
        for j, u in enumerate(texts):
            if j != i and len(u) < len(t) and t.startswith(u) and (best is None or len(u) > len(texts[best])):
                best = j
        ids.append(str(rows["name"][i]))
        parents.append("cache" if best is None else str(rows["name"][best]))
        values.append(int(rows["tokens"][i]))
        labels.append(f"{str(rows['name'][i])[:8]} · {int(rows['tokens'][i])} tok")
        extra = "".join(f"<br>{c}: {rows[c][i]}" for c in ("reason", "hits") if c in rows)
        preview = html.escape(texts[i][-80:].decode("utf-8", "replace"))
        hover.append(f"{rows['name'][i]}<br>{int(rows['tokens'][i])} tokens{extra}<br>…{preview}")
    fig = go.Figure(go.Icicle(ids=["cache"] + ids, parents=[""] + parents, values=[0] + values,
                              labels=["cache"] + labels, branchvalues="remainder",
                              hovertext=["all checkpoints"] + hover, hoverinfo="text"))
    fig.update_layout(title="Cached prefixes (a child extends its parent's text)", margin=dict(l=10, r=10, t=50, b=10))
    return fig


def report_html(figures: Sequence[go.Figure], path: str | Path, title: str = "ds4-workbench report",
                intro_html: str = "") -> Path:
    """Write a self-contained HTML page (plotly.js inlined once) with the figures in order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;"
             "text-align:right}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>", intro_html]
    for i, fig in enumerate(figures):
        parts.append(fig.to_html(full_html=False, include_plotlyjs=(i == 0)))
    parts.append("</body></html>")
    with atomic_write(path) as f:
        f.write("\n".join(parts).encode("utf-8"))
    return path
