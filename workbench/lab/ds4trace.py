"""Traces from ds4 itself: the text ``ds4-server --trace FILE`` writes, and a cache directory.

``ds4_server.c`` (``trace_begin`` / ``trace_finish``) writes per request::

    ===== request N YYYY-MM-DD HH:MM:SS =====      (local time)
    kind: chat / model: / stream: / tools: / think_mode: / prompt_tokens: N
    effective_prompt_tokens: N / cached_tokens: N / max_tokens: ... / seed: / stream_include_usage:

    --- cache decision ---
    live_tokens_before / prompt_tokens / live_prompt_common / memory_token_reusable
    memory_miss_reason / tool_replay: mem= disk= canonical= missing_ids= / cache_source
    cached_tokens / disk_cached_tokens / [disk_cache_file] / [first_mismatch_token, token_window rows]

    --- raw request json ---      (the body)
    --- rendered prompt ---       (the prompt; a newline is added when it does not end in one)
    --- generated text ---        (streamed pieces; "--- trace: ... ---" events may interleave)
    --- parsed message ---        finish / generated_tokens / dsml_start / dsml_end / elapsed_sec ...
    ===== end request N =====

ds4's own decision becomes the line's ``recorded`` (``source`` live/disk/none from
``cache_source``, ``cached_tokens``, ``miss_reason`` = ``memory_miss_reason``, plus the raw
fields). Token ends are exact with a tokenizer (``tokenizer=``), else estimated (each
special marker one token, the rest shared evenly so the count matches ds4's
``effective_prompt_tokens``; ``tokens_estimated`` is set). The rendered prompt is kept
byte for byte, except that a prompt ending in a newline cannot be told from one without
(ds4 adds one): the importer assumes the newline was added, as for every chat template.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from workbench.kv.errors import KVFormatError
from workbench.kv.header import read_text
from workbench.kv.policy import KVPolicy
from workbench.kv.store import KVStore
from workbench.lab.trace import Trace, TraceError, TraceHeader, TraceRequest, estimate_token_ends
from workbench.safeopen import open_regular
from workbench.spec.statelayout import StateLayout
from workbench.tokenizer import ASSISTANT_TEXT, SPECIAL_TEXTS, USER_TEXT, Tokenizer

DS4_CTX = 32768  # ds4-server's default --ctx
BEGIN_RE = re.compile(r"^===== request (\d+) (.*?) =====$", re.M)
EVENT_RE = re.compile(r"\n\n--- trace: .*? ---\n\n", re.S)
LIVE_SOURCES = {"memory-token", "memory-text", "thinking-visible", "responses-visible", "responses-tool-output",
                "anthropic-tool-output"}
SECTIONS = ("cache decision", "raw request json", "rendered prompt", "generated text", "parsed message")


def source_of(cache_source: str) -> str:
    """ds4's ``cache_source`` as live | disk | none."""
    if cache_source == "disk-text":
        return "disk"
    return "live" if cache_source in LIVE_SOURCES else "none"


def _fields(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(": ")
        if sep and key and " " not in key.strip():
            out.setdefault(key.strip(), value.strip())
    return out


def _split_sections(body: str) -> dict[str, str]:
    """{section title: raw text} of one request block ("" for the key: value head)."""
    marks = []
    for title in SECTIONS:
        i = body.find(f"\n--- {title} ---\n")
        if i >= 0:
            marks.append((i, title))
    marks.sort()
    out = {"": body[: marks[0][0]] if marks else body}
    for k, (i, title) in enumerate(marks):
        start = i + len(f"\n--- {title} ---\n")
        end = marks[k + 1][0] if k + 1 < len(marks) else len(body)
        out[title] = body[start:end]
    return out


def _ends(text: str, n_tokens: int, tokenizer: Tokenizer | None) -> tuple[list[int], bool]:
    data = text.encode("utf-8")
    if not data:
        return [], False
    if tokenizer is not None:
        out, pos = [], 0
        for t in tokenizer.encode_rendered(text):
            pos += len(tokenizer.token_bytes(t))
            out.append(pos)
        return out, False
    return estimate_token_ends(data, max(n_tokens, 1), [s.encode("utf-8") for s in SPECIAL_TEXTS]), True


def _markers(text: str, ends: list[int]) -> tuple[list[int], int | None]:
    """Byte ends of the <｜User｜> markers and of the first <｜Assistant｜> one (when token ends)."""
    data, at = text.encode("utf-8"), set(ends)
    users, u = [], USER_TEXT.encode("utf-8")
    i = data.find(u)
    while i >= 0:
        if i + len(u) in at:
            users.append(i + len(u))
        i = data.find(u, i + 1)
    a = data.find(ASSISTANT_TEXT.encode("utf-8"))
    end = a + len(ASSISTANT_TEXT.encode("utf-8")) if a >= 0 else None
    return users, end if end in at else None


def parse_ds4_trace(path: str | os.PathLike, tokenizer: Tokenizer | None = None, ctx: int = DS4_CTX,
                    layout: StateLayout | None = None) -> Trace:
    """Read a ``ds4-server --trace`` file into a trace (see the module docstring)."""
    p = Path(path)
    try:
        with open_regular(p) as f:
            raw = f.read().decode("utf-8", errors="surrogateescape")
    except OSError as err:
        raise TraceError(f"{p}: {err.strerror or err}") from err
    starts = list(BEGIN_RE.finditer(raw))
    if not starts:
        raise TraceError(f"{p}: no '===== request N <time> =====' block: not a ds4-server --trace file")
    requests = []
    for k, m in enumerate(starts):
        end = starts[k + 1].start() if k + 1 < len(starts) else len(raw)
        body = raw[m.end():end]
        body = body.split(f"\n===== end request {m.group(1)} =====", 1)[0]
        requests.append(_request(p, len(requests), int(m.group(1)), m.group(2), body, tokenizer))
    lay = layout or StateLayout.ds4()
    header = TraceHeader(
        layout={"n_layer": lay.n_layer, "head_dim": lay.head_dim, "idx_dim": lay.idx_dim, "n_vocab": lay.n_vocab,
                "n_swa": lay.n_swa, "ratios": list(lay.ratios)},
        ctx=ctx, source="ds4-trace", checksum=False, policy=_policy_fields(KVPolicy()), budget_mb=4096.0,
        model=requests[0].recorded.get("model", "") if requests else "")
    return Trace(header, requests)


def _policy_fields(p: KVPolicy) -> dict:
    return {k: getattr(p, k) for k in ("min_tokens", "cold_max_tokens", "continued_interval", "boundary_trim",
                                       "boundary_align", "budget_mb", "eviction")}


def _request(p: Path, index: int, number: int, stamp: str, body: str, tokenizer: Tokenizer | None) -> TraceRequest:
    sec = _split_sections(body)
    head = _fields(sec.get("", ""))
    decision = _fields(sec.get("cache decision", "").split("\nfirst_mismatch_token:", 1)[0])
    if "rendered prompt" not in sec:
        raise TraceError(f"{p}: request {number}: field 'rendered prompt': missing (ds4 wrote no prompt text)")
    rendered = sec["rendered prompt"]
    rendered = rendered[:-1] if rendered.endswith("\n") else rendered
    generated = EVENT_RE.sub("", sec.get("generated text", ""))
    generated = generated[:-1] if generated.endswith("\n") else generated  # the "\n" before "--- parsed"
    parsed = _fields(sec.get("parsed message", ""))
    try:
        rendered.encode("utf-8")
        generated.encode("utf-8")
    except UnicodeEncodeError:
        raise TraceError(f"{p}: request {number}: field 'rendered prompt': not UTF-8") from None
    n_prompt = _int(head.get("effective_prompt_tokens") or head.get("prompt_tokens"), p, number, "prompt_tokens")
    ends, estimated = _ends(rendered, n_prompt, tokenizer)
    n_gen = _int(parsed.get("generated_tokens", "0"), p, number, "generated_tokens")
    gen_ends, _ = _ends(generated, n_gen, tokenizer) if generated else ([], False)
    users, assistant = _markers(rendered, ends)
    try:
        arrived = time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S"))
    except ValueError:
        raise TraceError(f"{p}: request {number}: field 'time': {stamp!r} is not YYYY-MM-DD HH:MM:SS") from None
    recorded = {"source": source_of(decision.get("cache_source", "none")),
                "cached_tokens": _int(decision.get("cached_tokens", head.get("cached_tokens", "0")), p, number,
                                      "cached_tokens"),
                "miss_reason": decision.get("memory_miss_reason", ""),
                "cache_source": decision.get("cache_source", ""),
                "disk_cached_tokens": _int(decision.get("disk_cached_tokens", "0"), p, number, "disk_cached_tokens"),
                "disk_cache_file": decision.get("disk_cache_file", ""),
                "live_tokens_before": _int(decision.get("live_tokens_before", "0"), p, number, "live_tokens_before"),
                "live_prompt_common": _int(decision.get("live_prompt_common", "0"), p, number, "live_prompt_common"),
                "prompt_tokens": n_prompt, "model": head.get("model", ""), "kind": head.get("kind", ""),
                "ds4_request": number, "finish": parsed.get("finish", ""), "elapsed_s": parsed.get("elapsed_sec", "")}
    return TraceRequest(index, head.get("model", "") or "ds4", arrived, len(rendered.encode("utf-8")), len(ends),
                        ends, rendered, users, assistant, generated, len(generated.encode("utf-8")), len(gen_ends),
                        gen_ends, None, recorded, estimated)


def _int(value: str | None, p: Path, number: int, name: str) -> int:
    try:
        return int(value or 0)
    except ValueError:
        raise TraceError(f"{p}: request {number}: field {name!r}: {value!r} is not an integer") from None


def cache_dir_skeleton(directory: str | os.PathLike, tokenizer: Tokenizer | None = None, ctx: int = DS4_CTX,
                       layout: StateLayout | None = None) -> Trace:
    """A trace skeleton from a ds4-server cache directory: one request per checkpoint, in
    creation order, whose prompt is the file's text (evict and shutdown texts include the
    reply), with the file's header as what was recorded. Nothing is modified."""
    store = KVStore.readonly(directory)
    entries = sorted(store.entries(), key=lambda e: (e.header.created_at, e.sha))
    if not entries:
        raise TraceError(f"{directory}: no .kv checkpoints to build a trace from")
    requests = []
    for e in entries:
        try:
            with open_regular(e.path, follow=False) as f:
                text = read_text(f, e.header, str(e.path)).decode("utf-8")
        except (OSError, KVFormatError, UnicodeDecodeError) as err:
            raise TraceError(f"{e.path}: cannot read the text: {err}") from err
        ends, estimated = _ends(text, e.tokens, tokenizer)
        users, assistant = _markers(text, ends)
        h = e.header
        recorded = {"source": "unknown", "file": e.path.name, "reason": h.reason.name.lower(), "hits": h.hits,
                    "last_used": h.last_used, "ctx": h.ctx, "quant_bits": h.quant_bits,
                    "saves": [{"reason": h.reason.name.lower(), "key": e.sha, "tokens": h.tokens, "bytes": h.file_size,
                               "status": "saved"}]}
        requests.append(TraceRequest(len(requests), e.sha[:8], float(h.created_at), len(text.encode("utf-8")),
                                     len(ends), ends, text, users, assistant, "", 0, 0, [], None, recorded, estimated))
    lay = layout or StateLayout.ds4()
    header = TraceHeader(layout={"n_layer": lay.n_layer, "head_dim": lay.head_dim, "idx_dim": lay.idx_dim,
                                 "n_vocab": lay.n_vocab, "n_swa": lay.n_swa, "ratios": list(lay.ratios)},
                         ctx=ctx, source="ds4-cache-dir", checksum=False, policy=_policy_fields(KVPolicy()),
                         budget_mb=4096.0)
    return Trace(header, requests)
