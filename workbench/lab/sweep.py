"""Policies × budgets: a table, the optimum beside them, pictures, and the token strip.

``sweep`` replays a trace for every policy at every budget, adds the optimum (non-
decreasing in the budget: the best schedule at this or any smaller budget) and the
infinite-budget bound, and reports each policy as a fraction of the optimum. ``write``
puts ``sweep.csv``, ``misses.csv`` and ``sweep.html`` (hit tokens, TTFT and bytes written
against the budget, the miss-reason breakdown, the token strip of the first policy at
the smallest budget) in a directory.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench.atomic import tmp_path
from workbench.kv.policy import KVPolicy
from workbench.lab.misses import CAUSES
from workbench.lab.optimum import infinite, optimal, preset_policy
from workbench.lab.replay import Rates, ReplayResult, replay
from workbench.lab.trace import Trace
from workbench.viz import strip_figure


def run_policy(trace: Trace, base: KVPolicy, name: str, budget_mb: float | None, rates: Rates,
               others: Sequence[ReplayResult] = ()) -> ReplayResult:
    """One replay of ``name`` (a preset or ``optimal``) at ``budget_mb``."""
    policy = replace(base, budget_mb=budget_mb)
    if name == "optimal":
        return optimal(trace, policy, rates, others)
    return replay(trace, preset_policy(policy, name), rates, name=name)


def sweep(trace: Trace, base: KVPolicy, policies: Sequence[str], budgets: Sequence[float],
          rates: Rates) -> tuple[pd.DataFrame, dict[tuple[str, float], ReplayResult]]:
    """Summary rows (policy, budget_mb, cached_tokens, hit_ratio, ttft_s, bytes_written,
    fraction_of_optimum, losses...) and every replay, keyed by (policy, budget)."""
    runs: dict[tuple[str, float], ReplayResult] = {}
    rows = []
    best_so_far: ReplayResult | None = None
    for b in sorted(budgets):
        here = [run_policy(trace, base, p, b, rates) for p in policies if p != "optimal"]
        for r in here:
            runs[(r.policy, b)] = r
        opt = optimal(trace, replace(base, budget_mb=b), rates, here)
        if best_so_far is not None and _cached(best_so_far) > _cached(opt):
            opt = replace(best_so_far, budget_mb=b, schedule=best_so_far.schedule + " (smaller budget)")
        best_so_far = opt
        runs[("optimal", b)] = opt
        for r in here + [opt]:
            rows.append(_row(r))
    inf = infinite(trace, base, rates)
    top = max([inf] + [r for (p, _), r in runs.items() if p == "optimal"], key=_cached)
    bound = _row(inf)
    bound.update(cached_tokens=_cached(top), bound_source="infinite replay" if top is inf else f"optimal {top.budget_mb} MiB")
    rows.append(bound)
    df = pd.DataFrame(rows)
    opt_by_budget = {b: _cached(runs[("optimal", b)]) for b in budgets}
    df["fraction_of_optimum"] = [
        (row.cached_tokens / opt_by_budget[row.budget_mb] if opt_by_budget.get(row.budget_mb) else 1.0)
        if row.policy != "infinite" else float("nan") for row in df.itertuples()]
    return df, runs


def _cached(r: ReplayResult) -> int:
    return sum(q.cached_tokens for q in r.requests)


def _row(r: ReplayResult) -> dict:
    s = r.summary()
    row = {k: s[k] for k in ("policy", "budget_mb", "schedule", "requests", "prompt_tokens", "cached_tokens",
                             "hit_ratio", "disk_hits", "live_hits", "ttft_s", "bytes_written", "bytes_read",
                             "saves", "evictions")}
    row.update({f"lost_{c}": s["losses"].get(c, 0) for c in CAUSES})
    return row


def misses_frame(result: ReplayResult) -> pd.DataFrame:
    """Per request: source, cached and prompt tokens, tokens lost per cause, explanation."""
    rows = []
    for r in result.requests:
        row = {"request": r.request, "conversation": r.conversation, "source": r.source,
               "prompt_tokens": r.prompt_tokens, "cached_tokens": r.cached_tokens, "miss_reason": r.miss_reason}
        row.update({c: r.losses.get(c, 0) for c in CAUSES})
        row["explanation"] = r.explanation
        rows.append(row)
    return pd.DataFrame(rows)


def sweep_figure(df: pd.DataFrame) -> go.Figure:
    """Hit tokens, TTFT and bytes written against the budget, one line per policy."""
    fig = make_subplots(rows=1, cols=3, subplot_titles=("cached tokens", "TTFT (s, estimated)", "bytes written (MiB)"))
    finite = df[df.policy != "infinite"]
    for name, g in finite.groupby("policy", sort=False):
        dash = "dash" if name == "optimal" else None
        for col, (y, scale) in enumerate((("cached_tokens", 1), ("ttft_s", 1), ("bytes_written", 1 / 2**20)), 1):
            fig.add_trace(go.Scatter(x=g.budget_mb, y=g[y] * scale, name=name, legendgroup=name, showlegend=col == 1,
                                     mode="lines+markers", line={"dash": dash},
                                     hovertemplate=f"{name}<br>%{{x}} MiB<br>%{{y:,.2f}}<extra></extra>"), 1, col)
    inf = df[df.policy == "infinite"]
    if len(inf):
        fig.add_hline(y=float(inf.cached_tokens.iloc[0]), line_dash="dot", annotation_text="infinite budget",
                      row=1, col=1)
    fig.update_xaxes(title_text="budget (MiB)")
    fig.update_layout(height=380, margin={"t": 40, "l": 40, "r": 20, "b": 40})
    return fig


def misses_figure(df: pd.DataFrame) -> go.Figure:
    """Tokens lost per cause, per policy and budget (stacked)."""
    finite = df[df.policy != "infinite"]
    labels = [f"{p} @ {b:g}" for p, b in zip(finite.policy, finite.budget_mb)]
    fig = go.Figure()
    for c in CAUSES:
        fig.add_bar(x=labels, y=finite[f"lost_{c}"], name=c, hovertemplate=f"{c}: %{{y:,}} tokens<extra></extra>")
    fig.update_layout(barmode="stack", height=380, yaxis_title="prompt tokens not reused",
                      margin={"t": 30, "l": 40, "r": 20, "b": 80})
    return fig


def token_strip(result: ReplayResult, generated: Sequence[int] | None = None) -> go.Figure:
    """One bar per request: disk hit / live hit / prefilled / generated tokens, with a tick
    at every checkpoint the request saved (``viz.strip_figure``)."""
    reqs = result.requests
    labels = [f"#{r.request} {r.conversation}" for r in reqs]
    parts = {"disk": [r.cached_tokens if r.source == "disk" else 0 for r in reqs],
             "live": [r.cached_tokens if r.source == "live" else 0 for r in reqs],
             "prefilled": [r.prompt_tokens - r.cached_tokens for r in reqs],
             "generated": list(generated) if generated is not None else [0] * len(reqs)}
    ticks = [(label, s["tokens"], f"{s['reason']} save, {s['tokens']:,} tokens, {s['bytes'] / 2**20:.1f} MiB")
             for label, r in zip(labels, reqs) for s in r.saves if s["status"] == "saved"]
    return strip_figure(labels, parts, ticks)


def write(out_dir: str | os.PathLike, df: pd.DataFrame, strip_of: ReplayResult,
          generated: Sequence[int] | None = None) -> list[Path]:
    """Write sweep.csv, misses.csv and sweep.html into ``out_dir`` (each atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    html = "\n".join([
        "<html><head><meta charset='utf-8'><title>cache lab sweep</title></head><body>",
        "<h2>Policies against the budget</h2>", sweep_figure(df).to_html(full_html=False, include_plotlyjs=True),
        "<h2>Tokens not reused, by cause</h2>", misses_figure(df).to_html(full_html=False, include_plotlyjs=False),
        f"<h2>Token strip: {strip_of.policy} at {strip_of.budget_mb} MiB</h2>",
        token_strip(strip_of, generated).to_html(full_html=False, include_plotlyjs=False),
        "<h2>Table</h2>", df.to_html(index=False, float_format=lambda x: f"{x:.4g}"), "</body></html>"])
    files = {"sweep.csv": df.to_csv(index=False), "misses.csv": misses_frame(strip_of).to_csv(index=False),
             "sweep.html": html}
    paths = []
    for name, text in files.items():
        final = out / name
        tmp = tmp_path(final)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, final)
        paths.append(final)
    return paths
