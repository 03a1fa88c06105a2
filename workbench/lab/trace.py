"""Cache traces: one JSON line per request, versioned, replayable without the model.

The first line is the header (``{"format": "ds4-workbench-cache-trace", "version": 1,
...}``): the state layout and ctx (checkpoint sizes follow from them, exactly), the policy
the trace was recorded under, measured rates, and whether texts are kept or hashed. Every
other line is one request::

    request, conversation, time           # number, conversation id, Unix seconds at arrival
    rendered                              # the rendered prompt text (None with --hash-text)
    prompt_bytes, prompt_tokens           # its UTF-8 bytes and its effective token count
    token_ends                            # byte end of each effective prompt token
    user_ends, assistant_end              # byte ends of the <｜User｜> tokens and of the first
                                          # <｜Assistant｜> token (ds4's chat anchor needs them)
    generated, generated_bytes, generated_tokens, generated_ends
                                          # decoded reply fed into the state (the stop token is not)
    prefix_hashes                         # with --hash-text: 16 hex digits of SHA-1(text[:end])
                                          # at every token end of prompt + reply
    recorded                              # what happened then: source (live|disk|none),
                                          # cached_tokens, miss_reason, saves, evictions, ttft_s
    tokens_estimated                      # True when token ends are estimates (ds4 imports)

A request's *text* is its rendered prompt followed by its reply: the live state after it.
``token_ends`` and ``generated_ends`` are in bytes of that text. Hashed traces identify a
prefix only at token ends, which is where checkpoints are cut.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from workbench.atomic import tmp_path
from workbench.errors import WorkbenchError
from workbench.safeopen import open_regular
from workbench.spec.statelayout import StateLayout

TRACE_FORMAT = "ds4-workbench-cache-trace"
TRACE_VERSION = 1
HASH_HEX = 16  # hex digits kept of each prefix SHA-1 in hashed traces


class TraceError(WorkbenchError):
    """A trace file that cannot be read or written."""


def common_prefix_bytes(a: bytes, b: bytes) -> int:
    """Bytes of the longest common prefix of ``a`` and ``b`` (a binary search whose slice
    comparisons run in C)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:  # the largest n with a[:n] == b[:n]
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass
class TraceHeader:
    """Line 1 of a trace: what a replay needs besides the requests."""

    layout: dict  # StateLayout fields (n_layer, head_dim, idx_dim, n_vocab, n_swa, ratios)
    ctx: int
    source: str = "engine"  # engine | ds4-trace | ds4-cache-dir
    checksum: bool = True  # checkpoints carry the workbench's checksum trailer
    kv_layout: str = "flat"  # how the store wrote checkpoints: flat (ds4's .kv) | chain
    policy: dict = field(default_factory=dict)  # KVPolicy fields it was recorded under
    budget_mb: float | None = None
    rates: dict = field(default_factory=dict)  # prefill_tps, write_bps, read_bps (measured)
    hashed: bool = False
    model: str = ""
    initial: list = field(default_factory=list)  # checkpoints present before request 0
    format: str = TRACE_FORMAT
    version: int = TRACE_VERSION

    def state_layout(self) -> StateLayout:
        d = dict(self.layout)
        return StateLayout(int(d["n_layer"]), int(d["head_dim"]), int(d["idx_dim"]), int(d["n_vocab"]),
                           int(d["n_swa"]), tuple(int(r) for r in d["ratios"]))


@dataclass
class TraceRequest:
    """One request line (see the module docstring for the fields)."""

    request: int
    conversation: str
    time: float
    prompt_bytes: int
    prompt_tokens: int
    token_ends: list[int]
    rendered: str | None = None
    user_ends: list[int] = field(default_factory=list)
    assistant_end: int | None = None
    generated: str | None = None
    generated_bytes: int = 0
    generated_tokens: int = 0
    generated_ends: list[int] = field(default_factory=list)
    prefix_hashes: list[str] | None = None
    recorded: dict = field(default_factory=dict)
    tokens_estimated: bool = False

    # ---- the text of the live state after this request -----------------------------------
    @property
    def ends(self) -> list[int]:
        """Byte ends of every token of prompt + reply (the live state's tokens)."""
        cached = self.__dict__.get("_ends")
        if cached is None:
            cached = self.token_ends + [self.prompt_bytes + g for g in self.generated_ends]
            self.__dict__["_ends"] = cached
        return cached

    @property
    def text_bytes(self) -> int:
        return self.prompt_bytes + self.generated_bytes

    def data(self) -> bytes | None:
        """Prompt + reply as UTF-8 bytes (None in a hashed trace)."""
        if self.rendered is None:
            return None
        cached = self.__dict__.get("_data")
        if cached is None:
            cached = (self.rendered + (self.generated or "")).encode("utf-8")
            self.__dict__["_data"] = cached
        return cached

    def key(self, n: int) -> str | None:
        """Identity of this text's first ``n`` bytes: SHA-1 hex (ds4's file stem) in a full
        trace; the recorded 16-digit hash at a token end in a hashed one (None elsewhere)."""
        memo = self.__dict__.setdefault("_keys", {})
        if n in memo:
            return memo[n]
        data = self.data()
        if data is not None:
            out = hashlib.sha1(data[:n]).hexdigest() if n <= len(data) else None
        else:
            idx = self.__dict__.get("_hash_at")
            if idx is None:
                idx = dict(zip(self.ends, self.prefix_hashes or []))
                self.__dict__["_hash_at"] = idx
            out = idx.get(n)
        memo[n] = out
        return out

    def matches(self, n: int, key: str) -> bool:
        """Whether this text's first ``n`` bytes are the prefix identified by ``key``."""
        if n > self.text_bytes:
            return False
        mine = self.key(n)
        return mine is not None and (mine == key or mine[:HASH_HEX] == key[:HASH_HEX])

    def char_boundary(self, n: int) -> bool:
        """A cut at byte ``n`` does not split a UTF-8 character (always True when hashed)."""
        data = self.data()
        return data is None or n >= len(data) or (data[n] & 0xC0) != 0x80

    def common_prefix(self, other: "TraceRequest") -> int:
        """Bytes of the longest common prefix of this prompt and ``other``'s text (in a
        hashed trace: the largest of this prompt's token ends where both agree)."""
        a, b = self.data(), other.data()
        if a is not None and b is not None:
            return common_prefix_bytes(a[:self.prompt_bytes], b)
        best = 0
        for n in self.token_ends:
            theirs = other.key(n)
            if theirs is None:
                continue  # no token end of theirs here: undecided
            if theirs[:HASH_HEX] != (self.key(n) or "")[:HASH_HEX]:
                break
            best = n
        return best

    def tokens_before(self, n: int) -> int:
        """Prompt tokens that end at or before byte ``n``."""
        return bisect.bisect_right(self.token_ends, n)

    def line(self) -> dict:
        """The JSON object of this request's line."""
        return asdict(self)


def hash_prefixes(data: bytes, ends: Iterable[int]) -> list[str]:
    """16-hex-digit SHA-1 of ``data[:e]`` for each end ``e`` (increasing), one pass."""
    h, pos, out = hashlib.sha1(), 0, []
    for e in ends:
        h.update(data[pos:e])
        pos = e
        out.append(h.copy().hexdigest()[:HASH_HEX])
    return out


def hashed(req: TraceRequest) -> TraceRequest:
    """The same request with its texts replaced by prefix hashes (for private traffic)."""
    data = req.data()
    if data is None:
        return req
    return TraceRequest(req.request, req.conversation, req.time, req.prompt_bytes, req.prompt_tokens,
                        list(req.token_ends), None, list(req.user_ends), req.assistant_end, None,
                        req.generated_bytes, req.generated_tokens, list(req.generated_ends),
                        hash_prefixes(data, req.ends), dict(req.recorded), req.tokens_estimated)


@dataclass
class Trace:
    """A header and its requests, in arrival order."""

    header: TraceHeader
    requests: list[TraceRequest]

    def write(self, path: str | os.PathLike, hash_text: bool = False) -> Path:
        """Write as JSONL, atomically (never a partial file under the final name)."""
        out = Path(path)
        head = asdict(self.header)
        head["hashed"] = bool(hash_text or self.header.hashed)
        reqs = [hashed(r) if hash_text else r for r in self.requests]
        tmp = tmp_path(out)
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(json.dumps(head, ensure_ascii=False) + "\n")
                for r in reqs:
                    f.write(json.dumps(r.line(), ensure_ascii=False) + "\n")
            os.replace(tmp, out)
        except OSError as err:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise TraceError(f"{out}: cannot write trace: {err.strerror or err}") from err
        return out


def _lines(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        with io.TextIOWrapper(open_regular(path), encoding="utf-8") as f:
            for no, raw in enumerate(f, 1):
                if raw.strip():
                    try:
                        yield no, json.loads(raw)
                    except json.JSONDecodeError as err:
                        raise TraceError(f"{path}:{no}: not JSON: {err.msg}") from None
    except UnicodeDecodeError:
        raise TraceError(f"{path}: not UTF-8 text") from None
    except OSError as err:
        raise TraceError(f"{path}: {err.strerror or err}") from err


def read_trace(path: str | os.PathLike) -> Trace:
    """Read and check a trace; errors name the file, line and field."""
    p = Path(path)
    lines = _lines(p)
    try:
        no, head = next(lines)
    except StopIteration:
        raise TraceError(f"{p}: empty file, expected a trace header line") from None
    if not isinstance(head, dict) or head.get("format") != TRACE_FORMAT:
        raise TraceError(f"{p}:{no}: field 'format': expected {TRACE_FORMAT!r}")
    if head.get("version") != TRACE_VERSION:
        raise TraceError(f"{p}:{no}: field 'version': {head.get('version')!r}, this workbench reads {TRACE_VERSION}")
    try:
        header = TraceHeader(**head)
        header.state_layout()
        if int(header.ctx) <= 0:
            raise ValueError("ctx must be > 0")
    except (TypeError, KeyError, ValueError) as err:
        raise TraceError(f"{p}:{no}: bad header: {err}") from None
    requests = []
    for no, line in lines:
        try:
            req = TraceRequest(**line)
        except TypeError as err:
            raise TraceError(f"{p}:{no}: bad request line: {err}") from None
        _check_request(p, no, req, header.hashed)
        requests.append(req)
    return Trace(header, requests)


def _check_request(p: Path, no: int, r: TraceRequest, is_hashed: bool) -> None:
    def bad(fieldname: str, why: str) -> TraceError:
        return TraceError(f"{p}:{no}: field {fieldname!r}: {why}")

    if len(r.token_ends) != r.prompt_tokens:
        raise bad("token_ends", f"{len(r.token_ends)} ends for prompt_tokens {r.prompt_tokens}")
    if any(b <= a for a, b in zip(r.token_ends, r.token_ends[1:])) or (r.token_ends and (
            r.token_ends[0] <= 0 or r.token_ends[-1] != r.prompt_bytes)):
        raise bad("token_ends", "must increase strictly and end at prompt_bytes")
    if len(r.generated_ends) != r.generated_tokens:
        raise bad("generated_ends", f"{len(r.generated_ends)} ends for generated_tokens {r.generated_tokens}")
    if r.generated_ends and r.generated_ends[-1] != r.generated_bytes:
        raise bad("generated_ends", "must end at generated_bytes")
    if is_hashed:
        if r.prefix_hashes is None or len(r.prefix_hashes) != len(r.ends):
            raise bad("prefix_hashes", f"a hashed trace needs one hash per token end ({len(r.ends)})")
    else:
        if r.rendered is None:
            raise bad("rendered", "missing (the header says the texts are kept)")
        if len(r.rendered.encode("utf-8")) != r.prompt_bytes:
            raise bad("prompt_bytes", f"{r.prompt_bytes} != the rendered text's {len(r.rendered.encode('utf-8'))}")
        if len((r.generated or "").encode("utf-8")) != r.generated_bytes:
            raise bad("generated_bytes", "does not match the generated text")


def estimate_token_ends(text: bytes, n_tokens: int, specials: Iterable[bytes]) -> list[int]:
    """``n_tokens`` token ends for ``text`` when only the count is known: each special
    marker is one token, the other bytes share the rest evenly; ends are moved to UTF-8
    character boundaries and kept strictly increasing (a best effort for imports)."""
    if not text or n_tokens <= 0:
        return []
    marks: list[tuple[int, int]] = []
    for sp in specials:
        start = text.find(sp)
        while start >= 0:
            marks.append((start, start + len(sp)))
            start = text.find(sp, start + len(sp))
    marks.sort()
    pieces: list[tuple[int, int, bool]] = []  # (start, end, special)
    pos = 0
    for a, b in marks:
        if a < pos:
            continue
        if a > pos:
            pieces.append((pos, a, False))
        pieces.append((a, b, True))
        pos = b
    if pos < len(text):
        pieces.append((pos, len(text), False))
    n_special = sum(1 for p in pieces if p[2])
    plain = sum(b - a for a, b, s in pieces if not s)
    budget = max(n_tokens - n_special, 0)
    ends: list[int] = []
    for a, b, special in pieces:
        if special:
            ends.append(b)
            continue
        k = max(1, round(budget * (b - a) / plain)) if plain else 1
        for i in range(1, k + 1):
            e = a + (b - a) * i // k
            while e < b and (text[e] & 0xC0) == 0x80:
                e += 1
            if not ends or e > ends[-1]:
                ends.append(e)
    if ends[-1] != len(text):
        ends.append(len(text))
    return ends
