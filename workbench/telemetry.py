"""Engine telemetry: one row per request and per cache event, as a pandas DataFrame.

The engine records its own facts (requests, live-state hits and misses) with
``Recorder.record``; everything the disk store did reaches the rows through one path:
the store's typed events (``workbench.kv.events``), which the engine subscribes to and
hands to ``Recorder.record_event``, mapped by ``kv_row`` (saved / skipped / failed
saves -> ``save``, evictions -> ``evict``, loads -> disk ``hit``, lookup misses -> disk
``miss``, failed loads -> ``load_failed``). The dashboard and the demo read these rows.

Columns (missing values are NaN / empty):

==================== ===========================================================================
``seq``              event number, 0-based, in engine order
``time_s``           seconds since the engine started
``event``            ``request`` | ``hit`` | ``miss`` | ``save`` | ``evict`` | ``load_failed`` | ``progress``
``request``          number of the request the event belongs to (-1: none, e.g. a shutdown save)
``conversation``     workload conversation id (empty outside workloads)
``source``           request / hit: where the reused prefix came from: ``live`` | ``disk`` | ``none``
``reason``           save: ``cold`` | ``continued`` | ``evict`` | ``shutdown`` (else ``<reason> exists|skipped|
                     failed: <why>``); evict: the evicted file's save reason; miss: why the live state or
                     the disk could not serve (``text-mismatch``, ``no-prefix-match``, ...); load_failed: the
                     error
``prompt_tokens``    request: tokens of the effective prompt (reused + prefilled)
``cached_tokens``    request: tokens reused from the live state or a disk checkpoint
``suffix_tokens``    request: tokens actually prefilled (ds4's ``cache_write_tokens``)
``generated_tokens`` request: tokens decoded
``lookup_s``         request: seconds spent finding a reusable prefix (live and disk)
``restore_s``        request / hit: seconds to load a disk checkpoint into the session
``prefill_s``        request: seconds of suffix prefill
``decode_s``         request: seconds of decoding
``ttft_s``           request: time to first token = lookup + restore + prefill (+ saves on the path)
``full_prefill_s``   request: estimated seconds a full prefill of the prompt would take
                     (prompt tokens / the engine's measured cold prefill rate)
``save_s``           save / request: seconds spent writing checkpoints
``tokens``           save / evict / hit: tokens in the checkpoint
``bytes``            save / evict / hit: size of the checkpoint file
``path``             save / evict / hit / load_failed: the checkpoint file
``disk_bytes``       bytes in the cache directory after the event
``budget_bytes``     the cache's disk budget (NaN: unlimited)
``total``            progress / request: prompt tokens of the request (llama.cpp's ``prompt_progress``)
``cache``            progress / request: of them, reused from the live state or disk
``processed``        progress / request: prompt tokens in the state so far (cache included)
``time_ms``          progress / request: milliseconds since the request started
==================== ===========================================================================
"""

from __future__ import annotations

import time
from typing import Any

import pandas as pd

from workbench.kv.events import Evicted, KVEvent, LoadFailed, Loaded, Miss, Saved, SaveFailed, SaveSkipped

COLUMNS = [
    "seq", "time_s", "event", "request", "conversation", "source", "reason",
    "prompt_tokens", "cached_tokens", "suffix_tokens", "generated_tokens",
    "lookup_s", "restore_s", "prefill_s", "decode_s", "ttft_s", "full_prefill_s", "save_s",
    "tokens", "bytes", "path", "disk_bytes", "budget_bytes", "total", "cache", "processed", "time_ms",
]
EVENTS = ("request", "hit", "miss", "save", "evict", "load_failed", "progress")
_TEXT = {"event", "conversation", "source", "reason", "path"}


def kv_row(event: KVEvent) -> tuple[str, dict[str, Any]] | None:
    """The telemetry row of a store event: (row event, columns); None for events that make
    no row (lookup hits: the load that follows does; renames, sweeps, quarantines)."""
    if isinstance(event, Saved):
        return "save", dict(reason=event.reason, tokens=event.tokens, bytes=event.bytes, save_s=event.seconds,
                            path=str(event.path), disk_bytes=event.disk_bytes)
    if isinstance(event, SaveSkipped):
        status = "exists" if event.why == "already-stored" else "skipped"
        return "save", dict(reason=f"{event.reason} {status}: {event.detail}", tokens=event.tokens, bytes=0,
                            save_s=event.seconds, path=str(event.path), disk_bytes=event.disk_bytes)
    if isinstance(event, SaveFailed):
        return "save", dict(reason=f"{event.reason} failed: {event.error}", tokens=event.tokens)
    if isinstance(event, Evicted):
        return "evict", dict(reason=event.save_reason, tokens=event.tokens, bytes=event.bytes, path=str(event.path),
                             disk_bytes=event.disk_bytes)
    if isinstance(event, Loaded):
        return "hit", dict(source="disk", tokens=event.tokens, bytes=event.bytes, restore_s=event.seconds,
                           path=str(event.path))
    if isinstance(event, LoadFailed):
        return "load_failed", dict(reason=event.error, path=str(event.path))
    if isinstance(event, Miss):
        return "miss", dict(source="disk", reason=event.reason)
    return None


class Recorder:
    """Collects event rows; listeners (e.g. a live dashboard) are called with each row."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.listeners: list = []
        self._t0 = time.perf_counter()

    def record(self, event: str, **fields: Any) -> dict[str, Any]:
        if event not in EVENTS:
            raise ValueError(f"unknown telemetry event {event!r}; expected one of {EVENTS}")
        unknown = set(fields) - set(COLUMNS)
        if unknown:
            raise ValueError(f"unknown telemetry columns: {sorted(unknown)}")
        row = {"seq": len(self.rows), "time_s": time.perf_counter() - self._t0, "event": event, **fields}
        self.rows.append(row)
        for listener in list(self.listeners):
            listener(row)
        return row

    def record_event(self, event: KVEvent, budget_bytes: int | None = None, **context: Any) -> dict[str, Any] | None:
        """Record a store event's row (``kv_row``) with ``context`` (e.g. request,
        conversation); rows with a disk size also get ``budget_bytes`` (NaN: unlimited)."""
        mapped = kv_row(event)
        if mapped is None:
            return None
        kind, fields = mapped
        if "disk_bytes" in fields:
            fields["budget_bytes"] = float("nan") if budget_bytes is None else budget_bytes
        return self.record(kind, **context, **fields)

    def frame(self) -> pd.DataFrame:
        return to_frame(self.rows)


def to_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows → DataFrame with every documented column, in order, with stable dtypes."""
    df = pd.DataFrame(rows, columns=COLUMNS)
    for col in COLUMNS:
        if col in _TEXT:
            df[col] = df[col].astype(object).where(df[col].notna(), "").astype(str)
        else:
            df[col] = pd.to_numeric(df[col], errors="coerce")
    df["request"] = df["request"].fillna(-1).astype(int)
    return df


def requests(df: pd.DataFrame) -> pd.DataFrame:
    """The request rows only, indexed by request number."""
    return df[df["event"] == "request"].set_index("request", drop=False)
