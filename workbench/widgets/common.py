"""What every workbench widget shares: a panel base with an error box, guarded buttons,
scrollable HTML tables and the tokenizer of a session's file.

A button's handler never lets an exception escape into the kernel: the panel catches
it (``KeyboardInterrupt`` included, so an interrupted prefill says so) and shows it in
its :class:`ErrorBox`, and clears the status line and the result lines it names as stale
(no "✓ valid" beside the error of the next file). A
:class:`~workbench.errors.WorkbenchError` shows as its own message, which names the file
and the problem; anything else shows its type and message with the traceback folded
underneath.

Long actions (prefill, decode, workloads) run, in the ``ds4-workbench`` kernel, on one
background worker thread, so the panel's **Stop** button can be clicked meanwhile: it
sets the session's ``stop`` flag, which ends a prefill at the next layer or chunk and a
decode at the next token (:mod:`workbench.session`). That needs the notebook's MLX
arrays on a stream the worker may use (:mod:`workbench.mlxthreads`, set up by the
kernel at start); elsewhere (scripts, tests, other kernels) they run at once and
:meth:`Panel.stop` still works from a callback or another thread. Number boxes are plain
text boxes validated by the action: a value out of range is an error that says the
range, never silently clamped.
"""

from __future__ import annotations

import html
import queue
import threading
import traceback
from typing import Any, Callable

import ipywidgets as widgets
import pandas as pd
import plotly.graph_objects as go

from workbench import mlxthreads
from workbench.errors import WorkbenchError
from workbench.gguf.reader import GGUFFile
from workbench.tokenizer import Tokenizer

MIB = 1024 * 1024

# one scoped style block: the widget HTML is not inside JupyterLab's rendered-HTML styles
TABLE_CSS = (
    "<style>"
    ".ds4wb-scroll{overflow:auto;border:1px solid #e0e0e0;border-radius:4px}"
    ".ds4wb-table{border-collapse:collapse;font-size:12px;font-family:var(--jp-code-font-family,monospace);width:100%;"
    "line-height:1.35}"
    ".ds4wb-table th{position:sticky;top:0;background:#f5f5f5;text-align:left;padding:3px 8px;"
    "border-bottom:1px solid #ccc;white-space:nowrap}"
    ".ds4wb-table td{padding:2px 8px;border-bottom:1px solid #eee;white-space:nowrap;vertical-align:top}"
    ".ds4wb-table td.ds4wb-wrap{white-space:pre-wrap;word-break:break-all;max-width:48em}"
    ".ds4wb-table td.ds4wb-clip{max-width:36em;overflow:hidden;text-overflow:ellipsis}"
    ".ds4wb-table tr.ds4wb-bad td{background:#fdecea}"
    ".ds4wb-pre{white-space:pre-wrap;word-break:break-all;font-family:var(--jp-code-font-family,monospace);"
    "font-size:12px;background:#fafafa;border:1px solid #e0e0e0;border-radius:4px;padding:6px;margin:0;"
    "max-height:14em;overflow:auto}"
    ".ds4wb-tail{display:flex;flex-direction:column-reverse;overflow:auto;max-height:14em;border:1px solid #e0e0e0;"
    "border-radius:4px}"
    ".ds4wb-tail .ds4wb-pre{max-height:none;overflow:visible;border:0}"
    "</style>"
)


class WidgetError(WorkbenchError):
    """A request a widget cannot act on (the message names the control and the problem)."""


def describe(err: BaseException) -> tuple[str, str]:
    """(one-line message, traceback text or "") for showing ``err`` to a person."""
    if isinstance(err, KeyboardInterrupt):
        return "interrupted (the operation was stopped; a prefill leaves the session as it was)", ""
    if isinstance(err, WorkbenchError):
        return str(err), ""
    if isinstance(err, OSError) and err.strerror:
        where = f"{err.filename}: " if err.filename else ""
        return f"{where}{err.strerror}", ""
    detail = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    return f"{type(err).__name__}: {err}", detail


class ErrorBox(widgets.HTML):
    """A red message box, hidden while there is nothing to show.

    ``message`` is the plain text shown (empty when hidden)."""

    def __init__(self) -> None:
        super().__init__(value="", layout=widgets.Layout(display="none"))
        self.add_class("ds4wb-error")
        self.message = ""

    @property
    def shown(self) -> bool:
        return self.layout.display != "none"

    def show(self, err: BaseException | str) -> None:
        message, detail = (err, "") if isinstance(err, str) else describe(err)
        self.message = message
        folded = (f"<details><summary>traceback</summary><pre style='white-space:pre-wrap;font-size:11px'>"
                  f"{html.escape(detail)}</pre></details>") if detail else ""
        self.value = ("<div style='background:#fdecea;border:1px solid #f5c2c0;color:#8a1f11;border-radius:4px;"
                      "padding:6px 10px;margin:4px 0;white-space:pre-wrap'>"
                      f"<b>⚠</b> {html.escape(message)}{folded}</div>")
        self.layout.display = None

    def clear(self) -> None:
        self.message = ""
        self.value = ""
        self.layout.display = "none"


def in_kernel() -> bool:
    """True inside a Jupyter kernel (where a busy handler blocks every other click)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


class _Worker:
    """One daemon thread running the panels' long actions in order. One long-lived
    thread, not one per action: MLX aborts the process at exit when a thread that ran
    MLX work ended before it."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="workbench-widgets", daemon=True)
                self._thread.start()
        self._jobs.put(job)

    def _loop(self) -> None:
        mlxthreads.adopt_shared_stream()
        while True:
            self._jobs.get()()  # jobs are guarded: they never raise


WORKER = _Worker()


def int_value(box: widgets.Widget, name: str, lo: int, hi: int) -> int:
    """The integer in a text box, checked against ``lo..hi`` (a WidgetError saying the
    range otherwise: a value is never clamped silently)."""
    try:
        value = int(box.value)
    except (TypeError, ValueError):
        raise WidgetError(f"{name}: {box.value!r} is not a whole number") from None
    if not lo <= value <= hi:
        raise WidgetError(f"{name}: {value:,} is outside {lo:,}..{hi:,}")
    return value


def float_value(box: widgets.Widget, name: str, lo: float, hi: float) -> float:
    """The finite number in a box, checked against ``lo..hi`` (WidgetError otherwise)."""
    try:
        value = float(box.value)
    except (TypeError, ValueError):
        raise WidgetError(f"{name}: {box.value!r} is not a number") from None
    if not lo <= value <= hi:  # also refuses nan
        raise WidgetError(f"{name}: {value:g} is outside {lo:g}..{hi:g}")
    return value


class Panel(widgets.VBox):
    """Base of the workbench widgets: a VBox with a status line, an error box and buttons
    whose handlers run guarded (buttons disabled while one runs, errors shown, not raised).

    ``stale`` lists result widgets cleared when an action fails; ``background`` (default:
    in a kernel whose MLX stream is shared) runs long actions on the worker thread;
    ``idle`` is set while no long action runs; ``stopping`` is set by Stop until the next
    long action starts."""

    def __init__(self, title: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.title = widgets.HTML(f"<b style='font-size:14px'>{html.escape(title)}</b>")
        self.status = widgets.HTML("")
        self.error = ErrorBox()
        self.stale: list[widgets.HTML] = []
        self.background = in_kernel() and mlxthreads.shared()
        self.idle = threading.Event()
        self.idle.set()
        self.stopping = threading.Event()
        self.stop_button = widgets.Button(description="Stop", icon="stop", disabled=True, button_style="danger",
                                          tooltip="stop the running prefill, decode or workload at the next "
                                                  "layer, chunk or token", layout=widgets.Layout(width="auto"))
        self.stop_button.on_click(lambda _b: self.stop())
        self._buttons: list[widgets.Button] = []
        self.add_class("ds4wb-panel")
        self.layout.border = "1px solid #ddd"
        self.layout.padding = "6px 10px"
        self.layout.margin = "4px 0"

    def button(self, description: str, action: Callable[[], None], icon: str = "", tooltip: str = "",
               style: str = "", long: bool = False) -> widgets.Button:
        """A button that runs ``action()`` guarded (see :meth:`guarded`); a ``long`` one
        through :meth:`start`, so that :meth:`stop` can end it."""
        b = widgets.Button(description=description, icon=icon, tooltip=tooltip or description, button_style=style,
                           layout=widgets.Layout(width="auto"))
        b.on_click(lambda _b: self.start(action) if long else self.guarded(action))
        self._buttons.append(b)
        return b

    def start(self, action: Callable[[], None]) -> None:
        """Run a long action with Stop enabled: on the worker thread when ``background``,
        else now."""
        self.idle.clear()
        self.stopping.clear()
        if self.background:
            WORKER.submit(lambda: self._run_long(action))
        else:
            self._run_long(action)

    def _run_long(self, action: Callable[[], None]) -> None:
        self.stop_button.disabled = False
        try:
            self.guarded(action)
        finally:
            self.stop_button.disabled = True
            self.idle.set()

    def stop(self) -> None:
        """Ask the running long action to stop (at the next layer, chunk, token or request)."""
        self.stopping.set()
        self.set_status("stopping …")
        for session in self.sessions():
            session.stop.set()

    def sessions(self) -> list[Any]:
        """The sessions Stop signals (panels that run one override this)."""
        return []

    def guarded(self, action: Callable[[], None]) -> bool:
        """Run ``action()`` with the buttons disabled; show any exception in the error box.
        Returns True when it completed."""
        self.error.clear()
        was = [b.disabled for b in self._buttons]
        for b in self._buttons:
            b.disabled = True
        try:
            action()
            return True
        except (Exception, KeyboardInterrupt) as err:  # a UI handler must not die: show it
            self.status.value = ""
            for w in self.stale:
                w.value = ""
            self.error.show(err)
            return False
        finally:
            for b, d in zip(self._buttons, was):
                b.disabled = d

    def set_status(self, text: str) -> None:
        """Show ``text`` (plain, escaped) in the status line."""
        self.status.value = f"<span style='color:#333'>{html.escape(text)}</span>"


def table_html(df: pd.DataFrame, max_height: str = "22em", wrap: tuple[str, ...] = (), clip: tuple[str, ...] = (),
               bad_rows: pd.Series | None = None, float_format: str = "{:,.2f}") -> str:
    """``df`` as an escaped HTML table in a scroll box with a sticky header.

    ``wrap`` names columns whose cells wrap (long messages), ``clip`` columns cut to one
    line with an ellipsis (text previews); ``bad_rows`` (bool, aligned with ``df``) tints
    those rows red."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    rows = []
    bad = list(bad_rows) if bad_rows is not None else [False] * len(df)
    for flag, row in zip(bad, df.to_dict("records")):  # per-column types (iterrows would upcast ints)
        cells = []
        for col in df.columns:
            text = html.escape(_cell(row[col], float_format))
            cls = (" class='ds4wb-wrap'" if col in wrap else
                   f" class='ds4wb-clip' title='{text}'" if col in clip else "")
            cells.append(f"<td{cls}>{text}</td>")
        rows.append(f"<tr{' class=ds4wb-bad' if flag else ''}>{''.join(cells)}</tr>")
    body = "".join(rows) or f"<tr><td colspan={len(df.columns)} style='color:#888'>(none)</td></tr>"
    return (f"{TABLE_CSS}<div class='ds4wb-scroll' style='max-height:{max_height}'>"
            f"<table class='ds4wb-table'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>")


def _cell(value: Any, float_format: str) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if isinstance(value, float):
        return float_format.format(value)
    return str(value)


def pre_html(text: str, end: bool = False) -> str:
    """``text`` escaped in a scrollable monospace block; with ``end`` the block opens
    scrolled to its last line (for the tail of a transcript)."""
    block = f"<pre class='ds4wb-pre'>{html.escape(text)}</pre>"
    return TABLE_CSS + (f"<div class='ds4wb-tail'>{block}</div>" if end else block)


def size_text(n: int) -> str:
    """A byte count in the unit that keeps it readable: B, KiB, MiB or GiB."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:,} B"


def visible_text(text: str) -> str:
    """Control characters made visible (newline as ⏎) for one-line previews."""
    return text.replace("\r", "␍").replace("\n", "⏎").replace("\t", "⇥")


# narrow figures: the legend below the tick labels, the x title left to the ticks
LEGEND_BELOW = dict(legend=dict(orientation="h", yref="container", y=0, yanchor="bottom", x=0, font=dict(size=11)),
                    margin=dict(l=55, r=10, t=40, b=105), xaxis_title=None)


def refit(fig: go.FigureWidget) -> None:
    """Make every displayed view of ``fig`` size itself to its container.

    A FigureWidget view is drawn before its output is laid out on the page, at plotly's
    700 px default width, and never measures its container afterwards on its own; a
    relayout that turns ``autosize`` on does. Two messages, since an unchanged value is
    not sent."""
    fig.layout.autosize = False
    fig.layout.autosize = True


def tokenizer_of(session: Any) -> Tokenizer:
    """The tokenizer stored in the GGUF file the session was loaded from."""
    if getattr(session, "path", None) is None:
        raise WidgetError("the session was not loaded from a file: pass tokenizer=")
    with GGUFFile(session.path) as f:
        return Tokenizer.from_gguf(f)
