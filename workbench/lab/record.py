"""Record a trace by running a workload through the engine.

Every request is served by :class:`workbench.engine.Engine` for real (prefill, decode,
checkpoint saves and evictions in a real directory); its line keeps the rendered prompt,
the byte end of every token the engine held (prompt and reply), the chat markers, and
what the engine and store did (source, cached tokens, saves, evictions), so that
``workbench lab replay`` can re-run the cache decisions without the model and be
compared with them.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from workbench.engine import Engine
from workbench.lab.trace import Trace, TraceHeader, TraceRequest
from workbench.workloads import Request, Workload


def token_ends(engine: Engine, ids: list[int], start: int = 0) -> list[int]:
    """Byte end of each token of ``ids`` in their decoded text, offset by ``start``."""
    out, pos = [], start
    for t in ids:
        pos += len(engine.tokenizer.token_bytes(t))
        out.append(pos)
    return out


def trace_header(engine: Engine, model: str = "") -> TraceHeader:
    """The header for traces of this engine: layout, ctx, policy, budget, checksum."""
    layout = engine.session.layout
    policy = asdict(engine.policy)
    if policy.get("reason_weights") is not None:
        policy["reason_weights"] = {k.name.lower(): v for k, v in policy["reason_weights"].items()}
    store = engine.store
    return TraceHeader(
        layout={"n_layer": layout.n_layer, "head_dim": layout.head_dim, "idx_dim": layout.idx_dim,
                "n_vocab": layout.n_vocab, "n_swa": layout.n_swa, "ratios": list(layout.ratios)},
        ctx=engine.session.ctx, source="engine", checksum=bool(store.checksum) if store is not None else True,
        kv_layout=store.kv_layout if store is not None else "flat",
        policy=policy, budget_mb=engine.policy.budget_mb, model=model)


def request_line(engine: Engine, number: int, conversation: str, arrived: float, rendered: str,
                 completion: Any, first_row: int) -> TraceRequest:
    """The trace line of one request the engine just served."""
    tok = engine.tokenizer
    n_prompt = completion.usage.prompt_tokens
    ids = engine.session.tokens
    prompt_ids, fed = ids[:n_prompt], ids[n_prompt:]
    ends = token_ends(engine, prompt_ids)
    prompt_bytes = len(rendered.encode("utf-8"))
    if (ends[-1] if ends else 0) != prompt_bytes:
        raise ValueError(f"request {number}: the engine's tokens decode to {ends[-1] if ends else 0} bytes, "
                         f"the rendered prompt has {prompt_bytes}")
    generated = tok.decode(fed)
    users = [e for t, e in zip(prompt_ids, ends) if t == tok.user]
    assistant = next((e for t, e in zip(prompt_ids, ends) if t == tok.assistant), None)
    rows = engine.recorder.rows[first_row:]
    evictions = [{"key": Path(r["path"]).stem, "tokens": r["tokens"], "bytes": r["bytes"], "reason": r["reason"]}
                 for r in rows if r["event"] == "evict"]
    saves = [{"reason": s.reason, "key": Path(s.path).stem, "tokens": s.tokens, "bytes": s.bytes, "status": s.status}
             for s in completion.saves]
    recorded = {"source": completion.usage.source, "cached_tokens": completion.usage.cached_tokens,
                "miss_reason": completion.note, "saves": saves, "evictions": evictions,
                "ttft_s": completion.timings.ttft_s}
    return TraceRequest(number, conversation, arrived, prompt_bytes, n_prompt, ends, rendered,
                        users, assistant, generated.decode("utf-8"), len(generated), len(fed),
                        token_ends(engine, fed), None, recorded)


def record(engine: Engine, workload: Workload, sampler: Callable | None = None, model: str = "",
           on_request: Callable[[TraceRequest], None] | None = None) -> Trace:
    """Serve every request of ``workload`` with ``engine`` and return the trace."""
    header = trace_header(engine, model)
    lines: list[TraceRequest] = []

    def complete(req: Request) -> str:
        first_row = len(engine.recorder.rows)
        arrived = time.time()
        rendered = engine.render(messages=req.messages, tools=req.tools)
        out = engine.complete(messages=req.messages, tools=req.tools, max_tokens=req.max_tokens, sampler=sampler,
                              conversation=req.conversation)
        line = request_line(engine, len(lines), req.conversation, arrived, rendered, out, first_row)
        lines.append(line)
        if on_request is not None:
            on_request(line)
        return out.text

    for _ in workload.run(complete):
        pass
    header.rates = measured_rates(engine)
    return Trace(header, lines)


def measured_rates(engine: Engine) -> dict:
    """Prefill tokens/s, save and restore bytes/s measured while recording (absent: not measured)."""
    rates: dict[str, float] = {}
    if engine.prefill_rate:
        rates["prefill_tps"] = engine.prefill_rate
    if engine.store is not None:
        for kind, name in (("saved", "write_bps"), ("loaded", "read_bps")):
            ev = [e for e in engine.store.events if e.kind == kind]
            secs = sum(e.seconds for e in ev)
            if ev and secs > 0:
                rates[name] = sum(e.bytes for e in ev) / secs
    return rates
