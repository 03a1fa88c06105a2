"""Why a request missed: the prompt tokens that were not reused, split by cause.

The token axis of a request's prompt is cut in three: ``[0, cached)`` was reused;
``[cached, shared)`` had been seen before (it is a prefix of some earlier request's text)
but was prefilled anyway — the *lost* tokens; ``[shared, prompt)`` was never seen before
(``first-seen``). Lost tokens are assigned from the shortest to the longest checkpoint
that once held a prefix of the prompt, each covering the tokens past the previous one:

=============================== ==========================================================
``evicted``                     a checkpoint held them but was evicted (by which save)
``consumed``                    a checkpoint held them but was deleted when restored
``not-saved``                   a save was refused by the budget (file too big / no room)
``below-min-tokens``            the checkpoint (or the whole shared prefix) is shorter than
                                min_tokens, or a live state that short was replaced
``live-replaced``               the live state held them and was replaced with no evict save
``tokenization-boundary``       the stored text is a prefix but ends inside a UTF-8
                                character of the prompt (ds4's ``token-mismatch``)
``alignment``                   past the last checkpoint boundary, up to where the prompt
                                diverges from what was seen (boundaries are trimmed,
                                aligned, or every continued step apart)
``diverged-before-any-checkpoint`` no checkpoint ends before the divergence point (a
                                changed system prompt, a compaction that rewrote the prefix)
=============================== ==========================================================

Token counts are the request's effective prompt tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from workbench.lab.trace import TraceRequest

CAUSES = ("first-seen", "evicted", "consumed", "not-saved", "below-min-tokens", "live-replaced",
          "tokenization-boundary", "alignment", "diverged-before-any-checkpoint")


@dataclass
class Checkpoint:
    """A prefix that was (or could have been) reusable: a checkpoint written or refused,
    or a live state dropped without a save."""

    text: TraceRequest  # whose text it is a prefix of
    text_bytes: int
    key: str
    tokens: int
    status: str  # stored | evicted | consumed | not-saved | dropped-live
    request: int  # index of the request that made it
    reason: str = ""  # save reason (cold | continued | evict | shutdown)
    by: str = ""  # evicted/consumed: the save reason (or "restore") that removed it
    by_request: int = -1


def shared_tokens(req: TraceRequest, earlier: Sequence[TraceRequest]) -> int:
    """Prompt tokens of ``req`` inside the longest prefix it shares with an earlier text."""
    best = 0
    for other in earlier:
        best = max(best, req.common_prefix(other))
        if best >= req.prompt_bytes:
            break
    return req.tokens_before(best)


def _cause(cp: Checkpoint, min_tokens: int) -> str:
    if cp.status == "dropped-live":
        return "below-min-tokens" if cp.tokens < min_tokens else "live-replaced"
    if cp.tokens < min_tokens:
        return "below-min-tokens"
    return {"evicted": "evicted", "consumed": "consumed", "not-saved": "not-saved"}.get(cp.status, "")


def explain_losses(req: TraceRequest, earlier: Sequence[TraceRequest], history: Sequence[Checkpoint],
                   cached: int, prompt_tokens: int, min_tokens: int, split_cut: int = 0) -> dict[str, int]:
    """Tokens of ``req`` not reused, by cause (the values sum to prompt_tokens - cached).

    ``history`` holds every checkpoint so far; ``split_cut`` is the token count of a text
    prefix that matched but could not be used because the cut split a character."""
    shared = max(min(shared_tokens(req, earlier), prompt_tokens), cached)
    out = {c: 0 for c in CAUSES}
    out["first-seen"] = prompt_tokens - shared
    cursor = cached
    if split_cut > cursor:
        take = min(split_cut, shared) - cursor
        out["tokenization-boundary"] += max(take, 0)
        cursor = max(cursor, min(split_cut, shared))
    before = [cp for cp in history if cp.text is not req and req.matches(cp.text_bytes, cp.key)]
    usable = sorted((cp for cp in before if cp.tokens > cursor), key=lambda cp: cp.tokens)
    for cp in usable:
        cause = _cause(cp, min_tokens)
        if not cause or cp.tokens <= cursor:
            continue  # still stored and usable: a longer one served, or it is the one that did
        top = min(cp.tokens, shared)
        out[cause] += top - cursor
        cursor = top
    if shared > cursor:
        if shared < min_tokens:
            out["below-min-tokens"] += shared - cursor
        elif cursor == cached == 0 and not any(0 < cp.tokens <= shared for cp in before):
            out["diverged-before-any-checkpoint"] += shared - cursor
        else:
            out["alignment"] += shared - cursor
    return {k: v for k, v in out.items() if v}


def plain_words(losses: dict[str, int], source: str, history: Sequence[Checkpoint], req: TraceRequest) -> str:
    """One sentence: where the prefix came from and why the rest was prefilled."""
    head = {"live": "reused the live state", "disk": "restored a disk checkpoint",
            "none": "no reusable prefix"}.get(source, source)
    parts = []
    for cause, n in sorted(losses.items(), key=lambda kv: -kv[1]):
        if cause == "evicted":
            ev = [cp for cp in history if cp.status == "evicted" and req.matches(cp.text_bytes, cp.key)]
            if ev:
                cp = max(ev, key=lambda c: c.tokens)
                parts.append(f"{n} tokens lost because the {cp.tokens}-token checkpoint was evicted by the "
                             f"{cp.by} save of request {cp.by_request}")
                continue
        parts.append(f"{n} tokens {_WORDS[cause]}")
    return head + ("; " + "; ".join(parts) if parts else "")


_WORDS = {
    "first-seen": "never seen before",
    "evicted": "lost to eviction",
    "consumed": "lost: the checkpoint was deleted when restored (consume on load)",
    "not-saved": "lost: the budget refused the save",
    "below-min-tokens": "lost: the prefix is shorter than min_tokens",
    "live-replaced": "lost: the live state was replaced with no evict save",
    "tokenization-boundary": "lost: the stored text ends inside a character of the prompt",
    "alignment": "lost between the last checkpoint boundary and the divergence point (alignment)",
    "diverged-before-any-checkpoint": "lost: the prompt diverged before any checkpoint boundary "
                                      "(a changed system prompt or a compaction)",
}
