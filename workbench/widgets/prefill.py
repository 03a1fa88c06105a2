"""``PrefillPanel``: prefill a prompt into a session with live progress, see the next-token
distribution, decode a few tokens, reset.

    panel = PrefillPanel(session)          # tokenizer read from the session's GGUF
    panel                                   # type a prompt or pick a workload, Prefill

Every button is one library call: ``session.prefill(tokens, chunk, progress)``,
``session.decode(n, sampler, stop=[eos], on_token)``, ``session.reset()``. Prefill
appends to whatever the session already holds. The progress callback fires after each
layer of each chunk; the bar counts prompt tokens and the rate is tokens/s so far.
"""

from __future__ import annotations

import html
import time
from typing import Callable

import ipywidgets as widgets
import numpy as np
import pandas as pd

from workbench.chat import render_messages, render_single
from workbench.engine import restrict
from workbench.sampling import Sampler, greedy, top_tokens
from workbench.session import PrefillStats, Progress, Session
from workbench.tokenizer import Tokenizer
from workbench.widgets.common import (
    Panel, WidgetError, float_value, int_value, pre_html, table_html, tokenizer_of, visible_text,
)
from workbench.workloads import WORKLOADS

CHUNKS = (64, 256, 1024, 2048)
MAX_DECODE = 4096  # tokens one Decode click may generate
MAX_TEMPERATURE = 5.0
TOP_K = 8
TAIL_CHARS = 1200  # characters of the session text shown
SOURCES = {
    "chat prompt (ds4 template)": "prompt",
    "rendered text, as is": "raw",
    "agent workload: first request": "agent",
    "multi-user workload: first request": "multi-user",
    "long-document workload: first request": "long-document",
}


def first_request_text(workload: str, ctx: int) -> str:
    """The rendered prompt of the first request of ``workload`` (default parameters)."""
    w = WORKLOADS[workload]()
    request = w.conversations[w.schedule[0]].next_request()
    return render_messages(request.messages, tools=request.tools, ctx=ctx)


def token_label(tokenizer: Tokenizer, token_id: int) -> str:
    """A token's text, quoted, with control characters visible."""
    return "“" + visible_text(tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")) + "”"


class PrefillPanel(Panel):
    """Prefill, inspect and decode on one session. ``last_stats`` is the last
    :class:`~workbench.session.PrefillStats`, ``top_next`` the (id, probability) list shown,
    ``generated`` the ids of the last Decode."""

    def __init__(self, session: Session, tokenizer: Tokenizer | None = None) -> None:
        super().__init__("Prefill and decode")
        self.session = session
        self.tokenizer = tokenizer if tokenizer is not None else tokenizer_of(session)
        self.last_stats: PrefillStats | None = None
        self.top_next: list[tuple[int, float]] = []
        self.generated: list[int] = []
        self._text_mask: np.ndarray | None = None
        self.source = widgets.Dropdown(options=list(SOURCES), value="chat prompt (ds4 template)", description="input",
                                       layout=widgets.Layout(width="26em"))
        self.prompt = widgets.Textarea(value="Explain how a KV cache speeds up a chat server.",
                                       placeholder="a prompt (or rendered text with ds4's special tokens)",
                                       layout=widgets.Layout(width="100%", height="8em"))
        chunk = session.state.prefill_chunk if session.state.prefill_chunk in CHUNKS else CHUNKS[-1]
        self.chunk = widgets.Dropdown(options=list(CHUNKS), value=chunk, description="chunk",
                                      layout=widgets.Layout(width="12em"))
        self.prefill_button = self.button("Prefill", self.prefill, icon="play", style="primary", long=True,
                                          tooltip="append the prompt's tokens to the session")
        self.progress = widgets.IntProgress(value=0, min=0, max=1, description="prefill",
                                            layout=widgets.Layout(width="24em"))
        self.rate = widgets.HTML("")
        self.top_table = widgets.HTML("")
        self.n_decode = widgets.IntText(value=16, description="tokens", tooltip=f"1..{MAX_DECODE}",
                                        layout=widgets.Layout(width="11em"))
        self.temperature = widgets.FloatText(value=0.0, step=0.1, description="temperature",
                                             tooltip=f"0 = greedy, at most {MAX_TEMPERATURE:g}",
                                             style={"description_width": "initial"},
                                             layout=widgets.Layout(width="11em"))
        self.whole_chars = widgets.Checkbox(value=True, description="whole characters only", indent=False,
                                            tooltip="sample only tokens that are whole UTF-8 characters "
                                                    "(random synthetic models otherwise emit broken bytes)",
                                            layout=widgets.Layout(width="auto"))
        self.decode_button = self.button("Decode", lambda: self.decode(), icon="forward", long=True,
                                         tooltip="generate tokens from the current logits")
        self.reset_button = self.button("Reset", self.reset, icon="trash", style="warning",
                                        tooltip="forget every token of the session")
        self.output = widgets.HTML("")
        self.tokens_label = widgets.HTML("")
        self.session_text = widgets.HTML("")
        self.stale = [self.rate, self.output]
        self.source.observe(lambda _c: self.guarded(self._fill_from_source), names="value")
        self.children = [
            self.title,
            widgets.HBox([self.source, self.chunk]),
            self.prompt,
            widgets.HBox([self.prefill_button, self.stop_button, self.progress, self.rate]),
            self.error,
            self.top_table,
            widgets.HBox([self.n_decode, self.temperature, self.whole_chars, self.decode_button, self.reset_button]),
            self.output,
            self.tokens_label,
            self.session_text,
        ]
        self._show_session()

    def __repr__(self) -> str:
        return f"PrefillPanel(tokens={self.session.n_tokens}, ctx={self.session.ctx})"

    def sessions(self) -> list[Session]:
        return [self.session]

    # ---- actions -----------------------------------------------------------------------------
    def prompt_tokens(self) -> list[int]:
        """The token ids the Prefill button would append."""
        text = self.prompt.value
        if not text:
            raise WidgetError("prefill: the prompt is empty")
        if SOURCES[self.source.value] == "prompt":
            text = render_single(text, ctx=self.session.ctx)
        return self.tokenizer.encode_rendered(text)

    def prefill(self) -> PrefillStats:
        """Append the prompt's tokens to the session, in chunks of the chosen size."""
        tokens = self.prompt_tokens()
        self.progress.max, self.progress.value, self.progress.bar_style = max(len(tokens), 1), 0, ""
        self.rate.value = f"{len(tokens):,} tokens …"
        try:
            stats = self.session.prefill(tokens, chunk=int(self.chunk.value), progress=self._on_progress)
        except BaseException:
            self.progress.bar_style = "danger"
            raise
        self.last_stats = stats
        self.progress.value, self.progress.bar_style = self.progress.max, "success"
        self.rate.value = (f"{stats.tokens:,} tokens in {stats.seconds:.2f} s · <b>{stats.tokens_per_s:,.0f} tok/s</b>"
                           f" · {stats.chunks} chunk{'s' if stats.chunks != 1 else ''} of ≤{int(self.chunk.value)}")
        self._show_top()
        self._show_session()
        return stats

    def decode(self, n: int | None = None) -> list[int]:
        """Generate up to ``n`` (default: the tokens box) tokens, stopping at EOS; the text
        appears as it is generated."""
        n = int_value(self.n_decode, "tokens", 1, MAX_DECODE) if n is None else n
        sample = self._sampler()
        room = self.session.ctx - self.session.n_tokens
        if room <= 0:
            raise WidgetError(f"decode: the context is full ({self.session.n_tokens:,} of {self.session.ctx:,} "
                              "tokens); Reset, or load the model with a larger ctx")
        if n > room:
            raise WidgetError(f"tokens: {n:,} would overflow the context ({self.session.n_tokens:,} of "
                              f"{self.session.ctx:,} tokens used, room for {room:,}); ask for fewer, Reset, "
                              "or load the model with a larger ctx")
        self.generated = []
        t0 = time.perf_counter()

        def shown(token: int) -> None:
            self.generated.append(token)
            self._show_generated(time.perf_counter() - t0)

        self.session.decode(n, sample, stop=[self.tokenizer.eos], on_token=shown)
        self._show_generated(time.perf_counter() - t0, done=True, stopped=len(self.generated) < n
                             and self.generated[-1:] != [self.tokenizer.eos])
        self._show_top()
        self._show_session()
        return self.generated

    def reset(self) -> None:
        """Forget every token of the session."""
        self.session.reset()
        self.last_stats, self.top_next, self.generated = None, [], []
        self.progress.value, self.progress.bar_style = 0, ""
        self.rate.value = self.top_table.value = self.output.value = ""
        self._show_session()

    # ---- helpers --------------------------------------------------------------------------------
    def _sampler(self) -> Callable:
        temperature = float_value(self.temperature, "temperature", 0.0, MAX_TEMPERATURE)
        pick = greedy if temperature <= 0 else Sampler(temperature=temperature)
        if not self.whole_chars.value:
            return pick
        if self._text_mask is None:
            self._text_mask = self.tokenizer.text_token_mask()
        return restrict(self._text_mask, pick)

    def _fill_from_source(self) -> None:
        kind = SOURCES[self.source.value]
        if kind in WORKLOADS:
            self.prompt.value = first_request_text(kind, self.session.ctx)

    def _on_progress(self, p: Progress) -> None:
        self.progress.max = max(p.total, 1)
        self.progress.value = p.done
        rate = p.done / p.elapsed_s if p.elapsed_s > 0 else 0.0
        self.rate.value = f"{p.done:,} / {p.total:,} tokens · {rate:,.0f} tok/s · {p.elapsed_s:.2f} s"

    def _show_top(self) -> None:
        logits = self.session.logits
        if logits is None:
            self.top_next, self.top_table.value = [], ""
            return
        self.top_next = top_tokens(logits, TOP_K)
        top = self.top_next[0][1]
        df = pd.DataFrame([{"rank": i + 1, "id": t, "token": token_label(self.tokenizer, t), "probability": p,
                            "relative to the first": "█" * max(1, round(20 * p / top))}
                           for i, (t, p) in enumerate(self.top_next)])
        self.top_table.value = ("<div style='font-size:12px;color:#555;margin-top:4px'>most likely next tokens</div>"
                                + table_html(df, max_height="none", float_format="{:.4f}"))

    def _show_generated(self, seconds: float, done: bool = False, stopped: bool = False) -> None:
        ids = [t for t in self.generated if t != self.tokenizer.eos]
        text = self.tokenizer.decode_text(ids)
        stop = " + EOS" if self.generated and self.generated[-1] == self.tokenizer.eos else ""
        rate = len(self.generated) / seconds if seconds > 0 else 0.0
        head = (f"<div style='font-size:12px;color:#555'>generated {len(self.generated)} token"
                f"{'s' if len(self.generated) != 1 else ''}{stop} · {rate:,.1f} tok/s"
                f"{' · stopped' if stopped else '' if done else ' …'}</div>")
        self.output.value = head + pre_html(text)

    def _show_session(self) -> None:
        n, ctx = self.session.n_tokens, self.session.ctx
        self.tokens_label.value = (f"<b>{n:,}</b> / {ctx:,} tokens in the session "
                                   f"<span style='color:#777'>({100 * n / ctx:.1f}% of the context)</span>")
        if n:
            text = self.tokenizer.decode_text(self.session.tokens)
            tail = ("…" if len(text) > TAIL_CHARS else "") + text[-TAIL_CHARS:]
            self.session_text.value = pre_html(tail, end=True)
        else:
            self.session_text.value = f"<i style='color:#777'>{html.escape('empty session')}</i>"
