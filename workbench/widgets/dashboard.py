"""``CacheDashboard``: an engine's telemetry drawn live, and a control that runs a workload.

    dash = CacheDashboard(engine)          # engine = Engine(session, store, policy)
    dash                                    # summary, checkpoint table, five live plots, Run workload
    dash.run(workloads.agent_session(turns=4))

Under the summary, the store's checkpoints (``KVStore.usage``): per entry its layout,
parent and depth, its own bytes against the bytes of the state it stands for (logical:
the same state as one flat ``.kv`` file; the rest is shared with its ancestors), and the
total logical bytes against the bytes on disk.

The dashboard appends a listener to ``engine.recorder.listeners``; the figures a row
changes (requests: tokens per request and time to first token; cache events: the event
timeline; rows with a disk size: disk usage) are rebuilt from ``engine.records`` through
the ``workbench.viz`` functions, inside one ``FigureWidget.batch_update()`` per figure,
when that request's own row arrives: the engine records it after taking the request's
timings, so drawing never inflates the lookup or save times it plots. Run workload drives ``engine.complete``
through a :class:`workbench.workloads.Workload`; by default replies are sampled
greedily among whole-character tokens (``workbench.engine.restrict``), so that a
synthetic model's replies replay byte-exactly when the client sends them back.
"""

from __future__ import annotations

import html
from typing import Any, Callable

import ipywidgets as widgets
import numpy as np
import pandas as pd
import plotly.graph_objects as go

from workbench import viz
from workbench.engine import Completion, Engine, restrict
from workbench.kv.chainstore import EntryBytes
from workbench.session import Cancelled, Progress
from workbench.widgets.common import LEGEND_BELOW, MIB, Panel, int_value, refit
from workbench.workloads import WORKLOADS, Workload

FIGURE_HEIGHT = 370
MAX_LENGTH = 64  # turns (or chunks) of one workload run
MAX_SEED = 10**6
CHAIN_ROWS = 10  # entries listed in the checkpoint table (most recently used first)
# the keyword that sets a workload's length: its turns, or a document's chunks
LENGTH_PARAMETER = {"agent": "turns", "multi-user": "turns", "long-document": "chunks", "coding-agent": "turns"}



# legends below the tick labels; none where the lanes or the single line say it all
STYLES = {
    "tokens": LEGEND_BELOW,
    "ttft": LEGEND_BELOW,
    "timeline": dict(showlegend=False, margin=dict(l=110, r=10, t=40, b=45)),
    "disk": dict(showlegend=False, margin=dict(l=55, r=10, t=40, b=45)),
    "strip": LEGEND_BELOW,
}
PLOTS = {  # name -> (figure builder, which rows change it)
    "tokens": (viz.tokens_per_request, "request"),
    "ttft": (viz.ttft_breakdown, "request"),
    "timeline": (viz.event_timeline, "event"),
    "disk": (viz.disk_usage, "disk"),
    "strip": (viz.token_strip, "request"),
}


def build_workload(name: str, length: int, seed: int = 0) -> Workload:
    """``WORKLOADS[name]`` with ``length`` turns (chunks for the long document)."""
    if name not in WORKLOADS:
        raise KeyError(f"unknown workload {name!r}; expected one of {sorted(WORKLOADS)}")
    return WORKLOADS[name](seed=seed, **{LENGTH_PARAMETER[name]: length})


def sync_figure(target: go.FigureWidget, source: go.Figure, height: int = FIGURE_HEIGHT,
                last_layout: dict | None = None) -> dict:
    """Make ``target`` show ``source`` in one batched update: traces are updated in place
    when the trace list has the same kinds and names, replaced otherwise; the layout is
    sent only when it differs from ``last_layout``. Returns the layout sent (for the next call)."""
    layout = source.layout.to_plotly_json()
    same = [(t.type, t.name) for t in target.data] == [(t.type, t.name) for t in source.data]
    if not same:
        target.data = []
    with target.batch_update():
        if same:
            for old, new in zip(target.data, source.data):
                old.update(new.to_plotly_json(), overwrite=True)
        else:
            target.add_traces(list(source.data))
        if layout != last_layout:
            target.update_layout(layout, overwrite=True)
            target.update_layout(height=height)
    return layout


def summarize(df: pd.DataFrame) -> dict[str, Any]:
    """Headline numbers of engine records: requests, share by source (live / disk / none),
    tokens reused, saves and MiB written, disk use, and mean TTFT against the mean
    full-prefill estimate over the requests that reused a prefix (seconds)."""
    req = df[df["event"] == "request"]
    saves = df[df["event"] == "save"]
    written = saves[saves["reason"].isin(["cold", "continued", "evict", "shutdown"])]
    reused = req[req["source"] != "none"]
    n = len(req)
    disk = df["disk_bytes"].dropna()
    budget = df["budget_bytes"].dropna()
    return {
        "requests": n,
        "by_source": {s: int((req["source"] == s).sum()) for s in ("live", "disk", "none")},
        "hit_rate": {s: float((req["source"] == s).mean()) if n else 0.0 for s in ("live", "disk")},
        "reused_tokens": int(req["cached_tokens"].sum()),
        "prompt_tokens": int(req["prompt_tokens"].sum()),
        "saves": {r: int((written["reason"] == r).sum()) for r in ("cold", "continued", "evict", "shutdown")},
        "saved_mib": float(written["bytes"].sum()) / MIB,
        "disk_mib": float(disk.iloc[-1]) / MIB if len(disk) else 0.0,
        "budget_mib": float(budget.iloc[-1]) / MIB if len(budget) else float("nan"),
        "reused_ttft_s": float(reused["ttft_s"].mean()) if len(reused) else float("nan"),
        "reused_full_prefill_s": float(reused["full_prefill_s"].mean()) if len(reused) else float("nan"),
    }


def summary_html(s: dict[str, Any]) -> str:
    """The summary line(s) of :func:`summarize`'s numbers."""
    if not s["requests"]:
        return "<i style='color:#777'>no requests yet: run a workload or call engine.complete(...)</i>"
    src = s["by_source"]

    def pct(source: str) -> float:
        return 100 * src[source] / s["requests"]

    saves = ", ".join(f"{v} {k}" for k, v in s["saves"].items() if v) or "none"
    reuse = 100 * s["reused_tokens"] / s["prompt_tokens"] if s["prompt_tokens"] else 0.0
    budget = f" of {s['budget_mib']:,.0f}" if s["budget_mib"] == s["budget_mib"] else ""
    line1 = (f"<b>{s['requests']}</b> requests · hits: <span style='color:{viz.SOURCE_COLORS['live']}'>"
             f"<b>live {pct('live'):.0f}%</b></span> ({src['live']}), "
             f"<span style='color:{viz.SOURCE_COLORS['disk']}'><b>disk {pct('disk'):.0f}%</b></span> ({src['disk']}), "
             f"miss {pct('none'):.0f}% ({src['none']}) · {reuse:.0f}% of prompt tokens reused")
    line2 = (f"saves: {saves} · <b>{s['saved_mib']:,.2f} MiB</b> written · disk {s['disk_mib']:,.2f}{budget} MiB")
    ttft, full = s["reused_ttft_s"], s["reused_full_prefill_s"]
    if ttft == ttft and full == full and ttft > 0:
        line2 += (f" · reused requests: mean TTFT <b>{ttft:.3f} s</b> vs full prefill ≈ {full:.3f} s "
                  f"(<b>{full / ttft:.1f}×</b>)")
    return f"<div style='line-height:1.6'>{line1}<br>{line2}</div>"


def chain_html(rows: list[EntryBytes], disk_bytes: int, limit: int = CHAIN_ROWS) -> str:
    """The checkpoint table of :meth:`KVStore.usage` rows (the first ``limit``) and the
    total line: logical bytes (every entry as a flat file) against ``disk_bytes``."""
    if not rows:
        return "<i style='color:#777'>no checkpoints on disk yet</i>"
    logical, own = sum(r.logical for r in rows), sum(r.own for r in rows)
    chained = sum(r.chained for r in rows)
    ratio = f" ({disk_bytes / logical:.2f}×)" if logical else ""
    head = (f"<b>{len(rows)}</b> checkpoints ({chained} chained, {len(rows) - chained} flat): "
            f"logical <b>{logical / MIB:,.2f} MiB</b> as flat files, on disk <b>{disk_bytes / MIB:,.2f} MiB</b>"
            f"{ratio}; chains share {max(logical - own, 0) / MIB:,.2f} MiB")
    cells = "".join(
        f"<tr><td><code>{r.sha[:10]}</code></td><td>{'chain' if r.chained else 'flat'}</td>"
        f"<td><code>{r.parent[:10] if r.parent else '-'}</code></td><td>{r.depth if r.chained else '-'}</td>"
        f"<td>{r.tokens:,}</td><td>{r.own / MIB:,.2f}</td><td>{r.logical / MIB:,.2f}</td>"
        f"<td>{r.shared / MIB:,.2f}</td></tr>" for r in rows[:limit])
    more = f"<tr><td colspan=8><i>… {len(rows) - limit} more</i></td></tr>" if len(rows) > limit else ""
    return (f"<div style='font-size:12px;line-height:1.5'>{head}<table style='font-size:12px'>"
            "<tr><th>entry</th><th>layout</th><th>parent</th><th>depth</th><th>tokens</th><th>own MiB</th>"
            f"<th>logical MiB</th><th>shared MiB</th></tr>{cells}{more}</table></div>")


class CacheDashboard(Panel):
    """Live plots of an :class:`~workbench.engine.Engine`'s records plus a workload runner.

    ``figures`` maps ``tokens``, ``ttft``, ``timeline``, ``disk`` to their
    ``go.FigureWidget``; ``stats`` is the last :func:`summarize` result; ``checkpoints``
    the store's checkpoint table (:func:`chain_html`); ``sampler``
    (default: greedy over ``tokenizer.text_token_mask()``) samples every reply."""

    def __init__(self, engine: Engine, sampler: Callable[[Any], int] | None = None) -> None:
        super().__init__("KV cache dashboard")
        self.engine = engine
        self._sampler = sampler
        self.stats: dict[str, Any] = summarize(engine.records)
        self.figures = {name: go.FigureWidget() for name in PLOTS}
        self._layouts: dict[str, dict] = {}
        self._dirty: set[str] = set()
        for fig in self.figures.values():
            fig.layout.height = FIGURE_HEIGHT
        self.summary = widgets.HTML("")
        self.checkpoints = widgets.HTML("")
        self.workload = widgets.Dropdown(options=list(WORKLOADS), value="agent", description="workload",
                                         layout=widgets.Layout(width="18em"))
        self.length = widgets.IntText(value=4, description="turns", tooltip=f"1..{MAX_LENGTH}",
                                      layout=widgets.Layout(width="10em"))
        self.seed = widgets.IntText(value=0, description="seed", tooltip=f"0..{MAX_SEED:,}",
                                    layout=widgets.Layout(width="10em"))
        self.run_button = self.button("Run workload", self.run_selected, icon="play", style="primary", long=True,
                                      tooltip="send the workload's requests through engine.complete")
        self.redraw_button = self.button("Redraw", self.redraw, icon="refresh",
                                         tooltip="rebuild the plots from engine.records and fit them to the page")
        self.requests_bar = widgets.IntProgress(value=0, min=0, max=1, description="requests",
                                                layout=widgets.Layout(width="20em"))
        self.prefill_bar = widgets.IntProgress(value=0, min=0, max=1, description="prefill",
                                               layout=widgets.Layout(width="20em"))
        self.last = widgets.HTML("")
        self.workload.observe(self._relabel_length, names="value")
        # two figures a row; each in a box that may shrink below the figure's drawn width
        # (min-width 0), so plotly sizes the figure to the column instead of overflowing it
        cells = [widgets.VBox([self.figures[name]], layout=widgets.Layout(flex="1 1 0%", min_width="0"))
                 for name in PLOTS]
        self.plots = widgets.VBox([widgets.HBox(cells[i:i + 2], layout=widgets.Layout(width="100%"))
                                   for i in range(0, len(cells), 2)])
        self.plots.add_class("ds4wb-dashboard-plots")
        self.children = [
            self.title,
            self.summary,
            self.checkpoints,
            widgets.HBox([self.workload, self.length, self.seed, self.run_button, self.stop_button,
                          self.redraw_button]),
            widgets.HBox([self.requests_bar, self.prefill_bar, self.status]),
            self.last,
            self.error,
            self.plots,
        ]
        self.redraw()
        engine.recorder.listeners.append(self._on_row)

    def __repr__(self) -> str:
        return f"CacheDashboard(requests={self.stats['requests']})"

    # ---- actions -------------------------------------------------------------------------------
    def sessions(self) -> list[Any]:
        return [self.engine.session]

    def run_selected(self) -> list[Completion]:
        """Run the workload chosen in the controls (their values checked, not clamped)."""
        length = int_value(self.length, self.length.description, 1, MAX_LENGTH)
        return self.run(build_workload(self.workload.value, length, int_value(self.seed, "seed", 0, MAX_SEED)))

    def run(self, workload: Workload) -> list[Completion]:
        """Send every request of ``workload`` through ``engine.complete``; the plots follow
        live. Returns the completions in order."""
        sample = self.sampler()
        done: list[Completion] = []
        self.requests_bar.max, self.requests_bar.value, self.requests_bar.bar_style = max(len(workload), 1), 0, ""
        outer = self.engine.progress

        def progress(p: Progress) -> None:
            self.prefill_bar.max, self.prefill_bar.value = max(p.total, 1), p.done
            if outer is not None:
                outer(p)

        def complete(request: Any) -> str:
            if self.stopping.is_set():
                raise Cancelled(f"stopped: {workload.name} after {len(done)} of {len(workload)} requests")
            self.set_status(f"{workload.name}: {request.conversation} turn {request.turn} …")
            out = self.engine.complete(messages=request.messages, tools=request.tools, max_tokens=request.max_tokens,
                                       sampler=sample, conversation=request.conversation)
            done.append(out)
            self.requests_bar.value = len(done)
            u, t = out.usage, out.timings
            self.last.value = (f"<span style='font-size:12px'>last: <b>{html.escape(request.conversation)}</b> "
                               f"turn {request.turn} · source <b>{u.source}</b> · {u.cached_tokens:,} cached + "
                               f"{u.cache_write_tokens:,} prefilled · TTFT {t.ttft_s:.3f} s"
                               f" (full prefill ≈ {t.full_prefill_s:.3f} s)</span>")
            return out.text

        self.engine.progress = progress
        try:
            for _ in workload.run(complete):
                pass
        except BaseException:
            self.requests_bar.bar_style = "danger"
            raise
        finally:
            self.engine.progress = outer
        self.requests_bar.bar_style = "success"
        self.set_status(f"{workload.name}: {len(done)} requests done")
        return done

    def sampler(self) -> Callable[[Any], int]:
        """The sampler used for replies (built on first use)."""
        if self._sampler is None:
            self._sampler = restrict(self.engine.tokenizer.text_token_mask())
        return self._sampler

    def redraw(self, which: tuple[str, ...] = tuple(PLOTS)) -> None:
        """Rebuild the named figures and the summary from ``engine.records``, and the
        checkpoint table from the store, and fit the figures to the page. A figure that fails to build does not stop the others; the
        first failure is raised afterwards."""
        df = self.engine.records
        failed: list[Exception] = []
        for name in which:
            try:
                fig = PLOTS[name][0](df).update_layout(**STYLES[name])
                self._layouts[name] = sync_figure(self.figures[name], fig, last_layout=self._layouts.get(name))
                refit(self.figures[name])
            except Exception as err:  # draw the others, then report the first failure
                failed.append(err)
        self.stats = summarize(df)
        self.summary.value = summary_html(self.stats)
        store = self.engine.store
        if store is not None:
            try:
                self.checkpoints.value = chain_html(store.usage(self.engine.session.layout), store.total_bytes())
            except Exception as err:  # a directory gone or unreadable: the plots still drew
                failed.append(err)
        if failed:
            raise failed[0]

    def close(self) -> None:
        """Stop listening to the engine and close the widget."""
        if self._on_row in self.engine.recorder.listeners:
            self.engine.recorder.listeners.remove(self._on_row)
        super().close()

    # ---- live updates ---------------------------------------------------------------------------
    def _on_row(self, row: dict) -> None:
        """Recorder listener: note the figures ``row`` changes and redraw them when the
        request's own row arrives (after the engine has taken its timings, so drawing never
        counts as lookup or save time) or at once for rows outside a request (shutdown
        saves). Never raises into the engine."""
        self._dirty.update(name for name, (_, kind) in PLOTS.items()
                           if (kind == "request" and row["event"] == "request")
                           or (kind == "event" and row["event"] not in ("request", "progress"))
                           or (kind == "disk" and _present(row.get("disk_bytes"))))
        if row["event"] != "request" and row.get("request", -1) >= 0:
            return
        which, self._dirty = tuple(self._dirty), set()
        try:
            self.redraw(which)
        except Exception as err:  # a drawing problem must not fail the request being served
            self.error.show(err)

    def _relabel_length(self, change: dict) -> None:
        self.length.description = "chunks" if LENGTH_PARAMETER[change["new"]] == "chunks" else "turns"


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and np.isnan(value))
