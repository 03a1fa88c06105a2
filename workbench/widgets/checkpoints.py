"""``CheckpointManager``: the KV checkpoints of a store, and a session to save from and restore into.

    manager = CheckpointManager(KVStore("kv"), session)
    manager                                  # table, Save / Restore / Delete / Inspect / Verify

Each button is one library call a script could make: ``store.entries()``,
``store.save(session.snapshot(), tokenizer.decode(session.tokens), reason)``,
``store.load(entry, session.layout, session.ctx)`` + ``session.restore(state)``,
``store.verify(session.layout)``; Inspect is ``kv.inspection.inspect_file`` (header, text,
payload row counts) and plots the payload bytes per layer
(``viz.kv_bytes_by_layer(inspection.breakdown)``). Delete is
``store.remove(entry)``, only while "confirm" is pressed.
"""

from __future__ import annotations

import datetime
import html
import time
from pathlib import Path

import ipywidgets as widgets
import pandas as pd
import plotly.graph_objects as go

from workbench.kv.errors import KVFormatError
from workbench.kv.header import KVHeader, SaveReason
from workbench.kv.index import Entry
from workbench.kv.inspection import inspect_file, stored_text
from workbench.kv.maintenance import VerifyReport
from workbench.kv.store import KVStore, SaveResult
from workbench.session import Session
from workbench.tokenizer import Tokenizer
from workbench import viz
from workbench.widgets.common import (LEGEND_BELOW, MIB, Panel, WidgetError, pre_html, refit, table_html,
                                      tokenizer_of, visible_text)

PREVIEW_CHARS = 72  # tail of the stored text shown in the table
INSPECT_CHARS = 2000  # tail of the stored text shown by Inspect
SAVE_REASONS = [r.name.lower() for r in SaveReason if r is not SaveReason.UNKNOWN]


def _when(unix_s: int) -> str:
    return datetime.datetime.fromtimestamp(unix_s).strftime("%Y-%m-%d %H:%M:%S") if unix_s else ""


def entries_frame(entries: list[Entry]) -> pd.DataFrame:
    """One row per checkpoint (e.g. ``store.entries()``, most recently used first): name
    (SHA-1 prefix), tokens, MiB, reason, hits, last used, text (the tail of the stored text)."""
    rows = []
    for e in entries:
        try:
            tail = stored_text(e.path, e.header).decode("utf-8", errors="replace")[-PREVIEW_CHARS:]
            preview = "…" + visible_text(tail)
        except KVFormatError as err:  # removed or truncated since the listing
            preview = f"(unreadable: {err})"
        rows.append({"name": e.sha[:12], "tokens": e.tokens, "MiB": e.file_size / MIB,
                     "reason": e.header.reason.name.lower(), "hits": e.header.hits,
                     "last used": _when(e.header.last_used), "text": preview})
    return pd.DataFrame(rows, columns=["name", "tokens", "MiB", "reason", "hits", "last used", "text"])


def header_frame(h: KVHeader) -> pd.DataFrame:
    """A .kv header as (field, value) rows."""
    rows = [("tokens", f"{h.tokens:,}"), ("save reason", h.reason.name.lower()), ("hits", h.hits),
            ("context", f"{h.ctx:,}"), ("created", _when(h.created_at)), ("last used", _when(h.last_used)),
            ("routed expert bits", h.quant_bits), ("model id", h.model_id), ("ABI", h.abi_name),
            ("flags", f"{h.ext_flags:#04x}"),
            ("text", f"{h.text_bytes:,} bytes"), ("payload", f"{h.payload_bytes:,} bytes"),
            ("file", f"{h.file_size:,} bytes ({h.file_size / MIB:,.2f} MiB)")]
    return pd.DataFrame([(k, str(v)) for k, v in rows], columns=["field", "value"])


class CheckpointManager(Panel):
    """Browse a :class:`~workbench.kv.store.KVStore` and move states between it and a session.

    ``entries`` is the table shown (DataFrame, see :func:`entries_frame`); ``last_save``,
    ``verify_reports`` and ``inspected`` (the per-layer byte rows) hold the last results."""

    def __init__(self, store: KVStore, session: Session, tokenizer: Tokenizer | None = None) -> None:
        super().__init__("KV checkpoints")
        self.store = store
        self.session = session
        self.tokenizer = tokenizer if tokenizer is not None else tokenizer_of(session)
        self.entries = entries_frame([])
        self.last_save: SaveResult | None = None
        self.verify_reports: list[VerifyReport] = []
        self.inspected: list[dict] = []
        self._by_sha: dict[str, Entry] = {}
        self.refresh_button = self.button("Refresh", self.refresh, icon="refresh")
        self.verify_button = self.button("Verify all", self.verify, icon="check-circle",
                                         tooltip="read every byte of every checkpoint and run every check")
        self.table = widgets.HTML("")
        self.others = widgets.HTML("")
        self.selected = widgets.Dropdown(options=[], description="checkpoint", layout=widgets.Layout(width="34em"))
        self.inspect_button = self.button("Inspect", self.inspect, icon="search")
        self.restore_button = self.button("Restore", self.restore, icon="download", style="info",
                                          tooltip="load the checkpoint into the session (replaces its state)")
        self.delete_button = self.button("Delete", self.delete, icon="trash", style="danger",
                                         tooltip="remove the file (press 'confirm' first)")
        self.confirm = widgets.ToggleButton(value=False, description="confirm", icon="exclamation-triangle",
                                            tooltip="arm Delete for one click", layout=widgets.Layout(width="auto"))
        self.reason = widgets.Dropdown(options=SAVE_REASONS, value="continued", description="reason",
                                       layout=widgets.Layout(width="16em"))
        self.save_button = self.button("Save session", self.save, icon="save", style="primary",
                                       tooltip="save the session's state under its decoded text")
        self.header_table = widgets.HTML("")
        self.text_preview = widgets.HTML("")
        self.layer_plot = go.FigureWidget(layout=dict(height=320, template="plotly_white",
                                                      margin=dict(l=60, r=20, t=40, b=40)))
        self.inspect_box = widgets.VBox([widgets.HBox([self.header_table, self.text_preview]), self.layer_plot],
                                        layout=widgets.Layout(display="none"))
        self.header_table.layout.width = "40%"
        self.text_preview.layout.width = "60%"
        self.verify_table = widgets.HTML("")
        self.children = [
            self.title,
            widgets.HBox([self.refresh_button, self.verify_button, self.status]),
            self.table, self.others,
            widgets.HBox([self.selected, self.inspect_button, self.restore_button, self.delete_button, self.confirm]),
            widgets.HBox([self.reason, self.save_button]),
            self.error,
            self.verify_table,
            self.inspect_box,
        ]
        self.guarded(self.refresh)

    def __repr__(self) -> str:
        return f"CheckpointManager(dir={str(self.store.dir)!r}, checkpoints={len(self.entries)})"

    # ---- actions ----------------------------------------------------------------------------
    def refresh(self) -> pd.DataFrame:
        """Re-read the directory; returns the table shown."""
        current = self.selected.value
        entries = self.store.entries()
        self._by_sha = {e.sha: e for e in entries}
        self.entries = entries_frame(entries)
        self.table.value = table_html(self.entries, max_height="16em", clip=("text",))
        others = self.store.others()
        self.others.value = "" if not others else (
            "<div style='font-size:12px;color:#7a5b00'>other files counted against the budget: "
            + "; ".join(html.escape(f"{o.path.name} ({o.kind}: {o.problem})") for o in others) + "</div>")
        self.selected.options = [(f"{e.sha[:12]} · {e.tokens:,} tokens · {e.header.reason.name.lower()}", e.sha)
                                 for e in entries]
        if entries:
            self.selected.value = current if current in self._by_sha else entries[0].sha
        budget = self.store.budget_bytes
        used = self.store.total_bytes()
        self.set_status(f"{len(entries)} checkpoint{'s' if len(entries) != 1 else ''} · {used / MIB:,.2f} MiB"
                        + (f" of {budget / MIB:,.0f} MiB budget" if budget else "") + f" · {self.store.dir}")
        return self.entries

    def save(self) -> SaveResult:
        """Save the session's state under the text of its tokens, with the chosen reason."""
        if not self.session.n_tokens:
            raise WidgetError("save: the session holds no tokens; prefill something first")
        text = self.tokenizer.decode(self.session.tokens)
        result = self.store.save(self.session.snapshot(), text, SaveReason[self.reason.value.upper()])
        self.last_save = result
        self.refresh()
        if result.path.stem in self._by_sha:
            self.selected.value = result.path.stem
        evicted = f"; evicted {len(result.evicted)}" if result.evicted else ""
        if result.saved:
            self.set_status(f"saved {self.session.n_tokens:,} tokens, {result.bytes / MIB:,.2f} MiB in "
                            f"{result.seconds:.2f} s as {result.path.name}{evicted}")
        else:
            self.set_status(f"not saved ({result.status}: {result.detail}){evicted}")
        return result

    def restore(self) -> int:
        """Load the selected checkpoint into the session; returns its token count."""
        entry = self._selected()
        t0 = time.perf_counter()
        state, _text = self.store.load(entry, self.session.layout, self.session.ctx,
                                       prefill_chunk=self.session.state.prefill_chunk)
        self.session.restore(state)
        self.refresh()
        self.set_status(f"restored {state.n_tokens:,} tokens from {entry.path.name} "
                        f"in {time.perf_counter() - t0:.2f} s")
        return state.n_tokens

    def delete(self) -> Path:
        """Remove the selected checkpoint file (only while 'confirm' is pressed)."""
        entry = self._selected()
        if not self.confirm.value:
            raise WidgetError(f"delete {entry.path.name}: press 'confirm' first")
        self.confirm.value = False
        self.store.remove(entry)
        self.inspect_box.layout.display = "none"
        self.refresh()
        self.set_status(f"deleted {entry.path.name}")
        return entry.path

    def inspect(self) -> KVHeader:
        """Show the selected checkpoint's header, text and payload bytes per layer."""
        entry = self._selected()
        ins = inspect_file(entry.path, self.session.layout, must_fit=False)  # a foreign layout is inferred
        header, text, rows = ins.header, ins.text.decode("utf-8", errors="replace"), ins.breakdown
        self.inspected = rows
        fixed = sum(r["bytes"] for r in rows if r["layer"] < 0)
        self.header_table.value = (table_html(header_frame(header), max_height="none")
                                   + f"<div style='font-size:12px;color:#555'>tokens, logits and header: "
                                     f"{fixed / MIB:,.2f} MiB (not plotted)</div>")
        tail = ("…" if len(text) > INSPECT_CHARS else "") + text[-INSPECT_CHARS:]
        self.text_preview.value = (f"<div style='font-size:12px;color:#555'>stored text ({len(text):,} characters; "
                                   f"the end)</div>" + pre_html(tail, end=True))
        fig = viz.kv_bytes_by_layer([r for r in rows if r["layer"] >= 0])
        fig.update_layout(title=f"{entry.sha[:12]}: KV payload per layer ({header.tokens:,} tokens)", height=320,
                          **LEGEND_BELOW)
        with self.layer_plot.batch_update():
            self.layer_plot.data = []
            self.layer_plot.add_traces(list(fig.data))
            self.layer_plot.update_layout(fig.layout.to_plotly_json())
        self.inspect_box.layout.display = None
        refit(self.layer_plot)
        self.set_status(f"inspected {entry.path.name}")
        return header

    def verify(self) -> list[VerifyReport]:
        """Check every checkpoint end to end against the session's layout."""
        reports = self.store.verify(layout=self.session.layout)
        self.verify_reports = reports
        df = pd.DataFrame([{"file": r.path.name, "ok": "✓" if r.ok else "✗", "checksum": r.checksum,
                            "problem": r.error} for r in reports], columns=["file", "ok", "checksum", "problem"])
        bad = sum(not r.ok for r in reports)
        self.verify_table.value = (f"<div style='font-size:12px;color:{'#8a1f11' if bad else '#1e6b30'}'>verified "
                                   f"{len(reports)} file{'s' if len(reports) != 1 else ''}: {bad} failed</div>"
                                   + table_html(df, max_height="12em", wrap=("problem",),
                                                bad_rows=pd.Series([not r.ok for r in reports], dtype=bool)))
        self.refresh()
        return reports

    # ---- helpers ------------------------------------------------------------------------------
    def _selected(self) -> Entry:
        sha = self.selected.value
        if sha is None:
            raise WidgetError("no checkpoint selected (the store is empty?)")
        if sha not in self._by_sha:
            raise WidgetError(f"checkpoint {sha[:12]} is no longer in {self.store.dir}; Refresh")
        return self._by_sha[sha]
