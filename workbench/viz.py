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
    """Time to first token split into lookup / restore / suffix prefill / saves, vs full prefill.

    The parts differ by orders of magnitude (a lookup takes microseconds, a prefill
    seconds), so they stand side by side on a log axis in milliseconds: stacked on a
    linear axis, only the prefill would be visible. Zero parts are left out."""
    req = _requests(df)
    fig = go.Figure()
    for col, name, color in (("lookup_s", "lookup", "#7f7f7f"), ("restore_s", "restore", "#1f77b4"),
                             ("prefill_s", "suffix prefill", "#ff7f0e"), ("save_s", "saves on the path", "#d62728")):
        ms = (req[col].astype(float) * 1000).where(req[col] > 0)
        fig.add_bar(x=req["label"], y=ms, name=name, marker_color=color,
                    hovertemplate="%{x}<br>" + name + ": %{y:.2f} ms<extra></extra>")
    fig.add_scatter(x=req["label"], y=req["full_prefill_s"].astype(float) * 1000, mode="markers",
                    name="full prefill (estimate)", hovertemplate="%{x}<br>full prefill: %{y:.1f} ms<extra></extra>",
                    marker=dict(symbol="line-ew-open", size=28, color="black", line=dict(width=3)))
    fig.update_layout(barmode="group", yaxis_type="log")
    return _layout(fig, "Time to first token by part vs a full prefill (log scale)", "request", "milliseconds")


def event_timeline(df: pd.DataFrame) -> go.Figure:
    """Cache events over time: saves by reason, hits by source, misses, evictions, failures.

    A request that missed the live state but hit the disk is a disk hit, not a miss: the
    "miss" lane shows only requests that found no prefix anywhere (prefilled cold)."""
    cold = set(df.loc[(df["event"] == "request") & (df["source"] == "none"), "request"])
    ev = df[~df["event"].isin(["request", "progress"]) & ((df["event"] != "miss") | df["request"].isin(cold))].copy()
    ev = ev[~((ev["event"] == "miss") & ev.duplicated(["event", "request"], keep="last"))]
    ev["lane"] = [f"{e}: {r or s}" if e in ("save", "hit") else "miss (prefilled cold)" if e == "miss" else e
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
                        text=[f"request {r}<br>{t:,.0f} tokens" + (f", {b / MIB:,.2f} MiB" if b == b and b else "")
                              + (f"<br>{Path(p).name}" if p else "")
                              for r, t, b, p in zip(part["request"], part["tokens"], part["bytes"], part["path"])],
                        hovertemplate="%{text}<br>at %{x:.2f} s<extra></extra>")
    return _layout(fig, "Cache events", "seconds since start", "")


def save_restore_vs_size(df: pd.DataFrame, raw_write_bps: float | None = None,
                         raw_read_bps: float | None = None) -> go.Figure:
    """Save and restore seconds against checkpoint size, with the raw-disk lines (bytes/s)."""
    saves = df[(df["event"] == "save") & df["save_s"].notna()]
    hits = df[(df["event"] == "hit") & df["restore_s"].notna()]
    fig = go.Figure()
    fig.add_scatter(x=saves["bytes"] / MIB, y=saves["save_s"], mode="markers", name="save",
                    hovertemplate="save: %{x:.2f} MiB in %{y:.4f} s<extra></extra>")
    fig.add_scatter(x=hits["bytes"] / MIB, y=hits["restore_s"], mode="markers", name="restore",
                    marker_symbol="diamond", hovertemplate="restore: %{x:.2f} MiB in %{y:.4f} s<extra></extra>")
    top = float(pd.concat([saves["bytes"], hits["bytes"]]).max() or 0) / MIB
    for bps, name in ((raw_write_bps, "raw sequential write"), (raw_read_bps, "raw sequential read")):
        if bps and top:
            fig.add_scatter(x=[0, top], y=[0, top * MIB / bps], mode="lines", name=name, line=dict(dash="dot"))
    return _layout(fig, "Checkpoint save / restore time vs size", "checkpoint size (MiB)", "seconds")


def disk_usage(df: pd.DataFrame) -> go.Figure:
    """Bytes in the cache directory over time, against the budget."""
    d = df[df["disk_bytes"].notna()]
    fig = go.Figure()
    fig.add_scatter(x=d["time_s"], y=d["disk_bytes"] / MIB, mode="lines+markers", line_shape="hv", name="on disk",
                    hovertemplate="%{y:,.2f} MiB at %{x:.2f} s<extra></extra>")
    top = float(d["disk_bytes"].max()) / MIB if len(d) else 0.0
    budget = df["budget_bytes"].dropna()
    if len(budget):  # the axis follows the data; a far budget is named, not drawn at scale
        b = float(budget.iloc[-1]) / MIB
        if b <= 2 * top or not top:
            fig.add_hline(y=b, line_dash="dash", line_color="#d62728", annotation_text=f"budget {b:,.0f} MiB")
        else:
            fig.add_annotation(xref="paper", yref="paper", x=1, y=1, showarrow=False, xanchor="right",
                               text=f"budget {b:,.0f} MiB ({b / top:,.0f}x the peak use, off the scale)",
                               font=dict(color="#d62728"))
            fig.update_yaxes(range=[0, top * 1.15])
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


def kv_bytes_vs_context(layout: StateLayout, lengths: Sequence[int], model: str = "") -> go.Figure:
    """KV bytes by kind (summed over layers) as the context grows, from the layout alone.
    ``model`` names whose layout it is in the title (say so when it is not the model at hand)."""
    recs = []
    for T in lengths:
        for row in layout.layer_bytes_at(T):
            recs.append({"tokens": T, **row})
    df = pd.DataFrame(recs).groupby(["tokens", "kind"], as_index=False, sort=False)["bytes"].sum()
    fig = go.Figure()
    for kind, part in df.groupby("kind", sort=False):
        fig.add_scatter(x=part["tokens"], y=part["bytes"] / MIB, stackgroup="kv", name=kind,
                        line_color=KIND_COLORS.get(kind))
    for tr in fig.data:
        tr.hovertemplate = f"{tr.name}: %{{y:,.1f}} MiB at %{{x:,}} tokens<extra></extra>"
    whose = f"{model}, " if model else ""
    return _layout(fig, f"KV state vs context length ({whose}{layout.n_layer} layers)", "tokens", "MiB")


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
    reasons = [str(rows["reason"][i]) if "reason" in rows else "" for i in range(len(rows))]
    hits = [int(rows["hits"][i]) if "hits" in rows else 0 for i in range(len(rows))]
    labels = [f"{lab}<br>{r}{f' · {h} hits' if h else ''}" if r or h else lab
              for lab, r, h in zip(labels, reasons, hits)]
    colors = ["#ffffff"] + [REASON_COLORS.get(r, "#bbbbbb") for r in reasons]
    edges = ["#444"] + ["#2ca02c" if h else "#ffffff" for h in hits]  # a green frame: it served a hit
    fig = go.Figure(go.Icicle(ids=["cache"] + ids, parents=[""] + parents, values=[0] + values,
                              labels=["cache"] + labels, branchvalues="remainder",
                              marker=dict(colors=colors, line=dict(color=edges, width=[1] + [3 if h else 1 for h in hits])),
                              hovertext=["all checkpoints"] + hover, hoverinfo="text"))
    legend = " · ".join(f"<span style='color:{c}'>■</span> {r}" for r, c in REASON_COLORS.items())
    fig.update_layout(title=f"Cached prefixes (a child extends its parent's text): colour = save reason ({legend}), "
                            "green frame = served a hit", title_font_size=13, margin=dict(l=10, r=10, t=50, b=10))
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
