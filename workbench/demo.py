"""The main job: the agent workload on a model with a fresh disk cache, a per-request
table, and a self-contained HTML report of the cache's behaviour.

``run_demo`` is what ``workbench demo`` (and ``make demo``) calls; everything it shows is
read from the engine's records, so a notebook can call it too.
"""

from __future__ import annotations

import html
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from workbench import viz
from workbench.engine import Engine, restrict
from workbench.gguf.fingerprint import checkpoint_identity
from workbench.kv.inspection import stored_text
from workbench.kv.policy import KVPolicy
from workbench.kv.store import KVStore
from workbench.session import load
from workbench.spec.statelayout import StateLayout
from workbench.workloads import agent_session

DEMO_KV_DIR = "demo-kv"  # the default cache folder, beside the report
# A policy scaled to a synthetic model's short prompts (ds4's defaults are for 10k+ tokens).
DEMO_POLICY = KVPolicy(min_tokens=256, boundary_align=256, continued_interval=2048, budget_mb=512)


@dataclass
class DemoResult:
    table: pd.DataFrame  # one row per request
    records: pd.DataFrame  # the engine's telemetry
    report: Path
    seconds: float
    kv_dir: Path  # where the checkpoints are (kept)


def request_table(records: pd.DataFrame) -> pd.DataFrame:
    """Per-request summary: tokens reused and prefilled, source, TTFT vs full prefill."""
    req = records[records["event"] == "request"]
    return pd.DataFrame({
        "request": req["request"].astype(int),
        "conversation": req["conversation"],
        "source": req["source"],
        "prompt": req["prompt_tokens"].astype(int),
        "cached": req["cached_tokens"].astype(int),
        "suffix": req["suffix_tokens"].astype(int),
        "generated": req["generated_tokens"].astype(int),
        "ttft_ms": (req["ttft_s"] * 1000).round(1),
        "full_prefill_ms": (req["full_prefill_s"] * 1000).round(1),
        # a miss prefills everything: its "speedup" would only measure noise
        "speedup": (req["full_prefill_s"] / req["ttft_s"]).round(2).where(req["source"] != "none"),
    }).reset_index(drop=True)


def raw_disk_rates(directory: Path, nbytes: int = 64 * 1024 * 1024) -> tuple[float, float]:
    """(write, read) bytes/s of a plain sequential write and read of ``nbytes`` in ``directory``."""
    path = directory / f".rawdisk.{os.getpid()}"
    block = os.urandom(1 << 20) * (nbytes >> 20)
    try:
        t = time.perf_counter()
        with open(path, "wb") as f:
            f.write(block)
        w = time.perf_counter() - t
        t = time.perf_counter()
        with open(path, "rb") as f:
            f.read()
        r = time.perf_counter() - t
    finally:
        path.unlink(missing_ok=True)
    return nbytes / w, nbytes / r


def run_demo(model: str | Path, out: str | Path = "build/demo.html", kv_dir: str | Path | None = None,
             turns: int = 6, file_chars: int = 3000, max_tokens: int = 8, ctx: int = 32768, seed: int = 0,
             progress: Callable[[str], None] | None = None) -> DemoResult:
    """Run the agent workload through an Engine with a disk cache; write the HTML report.

    ``kv_dir`` None uses ``<out's folder>/demo-kv``, emptied of its checkpoints first (a
    cold cache) and kept afterwards, so ``workbench kv ls build/demo-kv`` shows what the
    demo stored; a given directory is used as it is (a warm cache) and kept. ``progress``
    gets one line per request.
    """
    t0 = time.perf_counter()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    directory = Path(kv_dir) if kv_dir is not None else out.parent / DEMO_KV_DIR
    session = load(model, ctx=ctx)
    try:
        store = KVStore.from_policy(directory, DEMO_POLICY, **checkpoint_identity(session.file))
        if kv_dir is None:  # a cold start: only the checkpoints the store owns are removed
            for e in store.entries():
                store.remove(e)
        engine = Engine(session, store, DEMO_POLICY)
        sampler = restrict(engine.tokenizer.text_token_mask())
        workload = agent_session(seed=seed, turns=turns, file_chars=file_chars, max_tokens=max_tokens)

        def complete(r):
            c = engine.complete(messages=r.messages, tools=r.tools, max_tokens=r.max_tokens, sampler=sampler,
                                conversation=r.conversation)
            if progress is not None:
                progress(f"request {engine.requests - 1} ({r.conversation}): {c.usage.source:4s} "
                         f"cached {c.usage.cached_tokens:5d}, prefilled {c.usage.cache_write_tokens:5d}, "
                         f"ttft {c.timings.ttft_s * 1000:7.1f} ms")
            return c.text

        for _ in workload.run(complete):
            pass
        engine.close()
        records = engine.records
        table = request_table(records)
        entries = pd.DataFrame([{"name": e.sha, "tokens": e.tokens, "text": stored_text(e.path, e.header),
                                 "reason": e.header.reason.name.lower(), "hits": e.header.hits}
                                for e in store.entries()])
        write_bps, read_bps = raw_disk_rates(directory)
        figures = [
            viz.tokens_per_request(records), viz.ttft_breakdown(records), viz.event_timeline(records),
            viz.save_restore_vs_size(records, write_bps, read_bps), viz.disk_usage(records),
            viz.kv_bytes_by_layer(session.state.layer_bytes()),
            viz.kv_bytes_vs_context(StateLayout.ds4(), [2048 * k for k in range(1, 65)],
                                    model="the real DeepSeek V4 Flash layout, not this demo's model"),
        ]
        if len(entries):
            figures.append(viz.prefix_tree(entries))
        intro = (f"<p>Model <code>{html.escape(str(model))}</code>, agent workload ({turns} turns, "
                 f"side requests every 2 turns). Cache policy: min {DEMO_POLICY.min_tokens} tokens, "
                 f"boundaries aligned to {DEMO_POLICY.boundary_align}, continued saves every "
                 f"{DEMO_POLICY.continued_step()} tokens, budget {DEMO_POLICY.budget_mb:g} MiB. "
                 f"Raw disk: write {write_bps / 2**30:.1f} GiB/s, read {read_bps / 2**30:.1f} GiB/s.</p>"
                 + table.to_html(index=False))
        report = viz.report_html(figures, out, title="ds4-workbench demo: KV cache reuse on an agent workload",
                                 intro_html=intro)
        return DemoResult(table, records, report, time.perf_counter() - t0, directory)
    finally:
        session.close()

