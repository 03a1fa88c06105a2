"""Prefix lookup latency with many checkpoints in the directory.

``n_files`` real ``.kv`` files (valid KVC headers, text and a small payload of a
two-layer layout) whose texts are prefixes of one long conversation, from 1 KiB up to
``max_text`` bytes; the prompt extends the longest by a little, so a lookup hashes the
whole prompt, takes a SHA-1 digest at every stored length and compares the winner's text.

* cold index: a new ``KVStore`` (no index yet) and one lookup: a directory scan, a header
  read per file, the hashing and the compare; baseline: the minimal I/O of an index, a
  ``scandir`` plus open + read of 52 header bytes + close per file (page cache warm);
* warm index: the same store again (the directory is unchanged, so no scan); baseline:
  one SHA-1 pass over the prompt, the work no lookup can avoid.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from workbench.bench.core import BenchContext, BenchError, BenchResult, Figure, best_pair
from workbench.kv.header import TEXT_OFFSET, SaveReason
from workbench.kv.index import Entry
from workbench.kv.store import KVStore
from workbench.spec.statelayout import StateLayout
from workbench.state import random_state

NAME = "lookup"
CTX = 1 << 20
# a small layout: the lookup reads headers and texts only, the payload just has to be valid
SMALL_LAYOUT = StateLayout(n_layer=2, head_dim=64, idx_dim=128, n_vocab=256, n_swa=16, ratios=(0, 0))
MIN_TEXT = 1024


def conversation(n_bytes: int, seed: int = 0) -> bytes:
    """``n_bytes`` of word-like ASCII text."""
    rng = np.random.default_rng(seed)
    words = [b"the", b"cache", b"prefix", b"token", b"model", b"layer", b"tool", b"result", b"user", b"says"]
    out = b" ".join(words[i] for i in rng.integers(0, len(words), n_bytes // 3 + 1))
    return out[:n_bytes]


def populate(directory: Path, n_files: int, max_text: int) -> bytes:
    """Write ``n_files`` checkpoints of prefixes of one text (lengths evenly spread over
    1 KiB .. ``max_text``); return that full text. Backdates the directory's mtime so a
    warm store does not rescan it."""
    text = conversation(max_text)
    store = KVStore(directory, budget_mb=None, min_tokens=1, maintain=False)
    lengths = np.unique(np.linspace(MIN_TEXT, max_text, n_files).astype(int))
    for n in lengths:
        state = random_state(SMALL_LAYOUT, max(1, int(n) // 4), CTX, seed=int(n))
        store.save(state, text[:n], SaveReason.CONTINUED)
    old = time.time() - 3600
    os.utime(directory, (old, old))
    return text


def read_headers(directory: Path) -> int:
    """The minimal index I/O: list the directory and read each file's 52 header bytes."""
    n = 0
    with os.scandir(directory) as it:
        for de in it:
            if de.name.endswith(".kv"):
                with open(de.path, "rb", buffering=0) as f:
                    n += len(f.read(TEXT_OFFSET))
    return n


def run(ctx: BenchContext, n_files: int = 1000, max_text: int | None = None) -> BenchResult:
    """Run the benchmark (``n_files``/``max_text`` shrink it for tests)."""
    max_text = max_text or ctx.pick(64 << 10, 256 << 10)
    result = BenchResult(NAME)
    directory = ctx.work_dir / NAME
    ctx.step(f"lookup: writing {n_files} checkpoints")
    text = populate(directory, n_files, max_text)
    n_found = len([p for p in directory.iterdir() if p.suffix == ".kv"])
    prompt = text + b" and one more question"
    expected = len(text)

    def check(hit: Entry | None) -> None:
        if hit is None or hit.text_bytes != expected:
            raise BenchError(f"{directory}: lookup missed the longest stored prefix ({expected} bytes)")

    def cold() -> None:
        check(KVStore(directory, budget_mb=None, min_tokens=1, maintain=False).lookup(prompt, CTX))

    warm_store = KVStore(directory, budget_mb=None, min_tokens=1, maintain=False)
    warm_store.lookup(prompt, CTX)  # builds the index

    def warm() -> None:
        check(warm_store.lookup(prompt, CTX))

    ctx.step(f"lookup: cold and warm index over {n_found} files")
    reps = ctx.repeats * 2
    cold_s, headers_s = best_pair(cold, lambda: read_headers(directory), reps)
    warm_s, sha_s = best_pair(warm, lambda: hashlib.sha1(prompt).digest(), reps * 5)
    sizes = f"{n_found} files, texts 1 KiB..{max_text >> 10} KiB, prompt {len(prompt) / 1024:,.1f} KiB"
    result.add_row({"files": n_found, "prompt_bytes": len(prompt), "cold_s": cold_s, "read_headers_s": headers_s,
                    "warm_s": warm_s, "sha1_prompt_s": sha_s, "cold_over_warm": cold_s / warm_s})
    result.figures += [
        Figure(NAME, "lookup.cold", sizes, cold_s, "s", "scandir + read every 52-byte header (page cache)", headers_s,
               False, "new KVStore: scan, header per file, SHA-1 at each stored length, text compare"),
        Figure(NAME, "lookup.warm", sizes, warm_s, "s", "one SHA-1 pass over the prompt", sha_s, False,
               "index reused (directory unchanged)"),
    ]
    result.charts = charts(result.tables)
    return result


def charts(tables: dict[str, list[dict]]) -> list[Any]:
    """The benchmark's plotly figures from its tables (as run, or read back from the CSVs)."""
    import plotly.graph_objects as go

    row = tables[NAME][-1]
    fig = go.Figure()
    fig.add_bar(x=["cold index", "warm index"], y=[row["cold_s"] * 1e3, row["warm_s"] * 1e3], name="KVStore.lookup")
    fig.add_bar(x=["cold index", "warm index"], y=[row["read_headers_s"] * 1e3, row["sha1_prompt_s"] * 1e3],
                name="baseline (headers I/O / SHA-1 of the prompt)")
    fig.update_layout(title=f"Lookup with {row['files']} checkpoints", yaxis_title="ms", barmode="group",
                      template="plotly_white")
    return [fig]
