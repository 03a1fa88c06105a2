"""Engine telemetry: one row per request and per cache event, as a pandas DataFrame.

Columns (missing values are NaN / empty):

==================== ===========================================================================
``seq``              event number, 0-based, in engine order
``time_s``           seconds since the engine started
``event``            ``request`` | ``hit`` | ``miss`` | ``save`` | ``evict`` | ``load_failed`` | ``progress``
``request``          number of the request the event belongs to (-1: none, e.g. a shutdown save)
``conversation``     workload conversation id (empty outside workloads)
``source``           request / hit: where the reused prefix came from: ``live`` | ``disk`` | ``none``
``reason``           save: ``cold`` | ``continued`` | ``evict`` | ``shutdown``; miss: why the live state
                     or the disk could not serve (``no-live-checkpoint``, ``token-mismatch``, ...);
                     load_failed: the error
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

COLUMNS = [
    "seq", "time_s", "event", "request", "conversation", "source", "reason",
    "prompt_tokens", "cached_tokens", "suffix_tokens", "generated_tokens",
    "lookup_s", "restore_s", "prefill_s", "decode_s", "ttft_s", "full_prefill_s", "save_s",
    "tokens", "bytes", "path", "disk_bytes", "budget_bytes", "total", "cache", "processed", "time_ms",
]
EVENTS = ("request", "hit", "miss", "save", "evict", "load_failed", "progress")
_TEXT = {"event", "conversation", "source", "reason", "path"}


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
