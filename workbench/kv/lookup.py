"""Which checkpoint serves a prompt: ds4's longest-text-prefix rule, as pure functions.

The decision reads only checkpoint metadata (``CheckpointMeta``: SHA-1 of the text, its
length, tokens, ctx, quant bits) and asks the caller to confirm the winner's stored
text byte for byte (``text_matches``): ``KVStore`` reads the file, a simulation compares
the texts it keeps. No filesystem access here, so replays run the store's own rule.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Container, Generic, Mapping, Protocol, TypeVar


class CheckpointMeta(Protocol):
    """What lookup reads of a checkpoint (``workbench.kv.index.Entry`` has it)."""

    @property
    def sha(self) -> str: ...  # SHA-1 hex (lower case) of the stored text
    @property
    def text_bytes(self) -> int: ...
    @property
    def tokens(self) -> int: ...
    @property
    def ctx(self) -> int: ...  # context the checkpoint was saved with
    @property
    def quant_bits(self) -> int: ...
    @property
    def model_id(self) -> int: ...  # header byte 7 (ds4 Flash: 0)


M = TypeVar("M", bound=CheckpointMeta)


@dataclass(frozen=True)
class LookupRules:
    """The store's lookup settings: the token floor and the quant rule (ds4's flags)."""

    min_tokens: int = 512
    quant_bits: int = 2
    reject_different_quant: bool = False
    model_id: int = 0  # files of another model id are never used


@dataclass(frozen=True)
class LookupDecision(Generic[M]):
    """A hit (``reason`` "hit") or why there is none, and how many prefix matches were rejected."""

    hit: M | None
    reason: str  # hit | no-entries | no-prefix-match | the longest candidate's rejection (see ``rejection``)
    candidates: int


def prefix_candidates(prompt: bytes, index: Mapping[str, M]) -> list[M]:
    """Checkpoints whose text SHA-1 equals the SHA-1 of a prefix of ``prompt`` of their
    text length, longest first. Hashes the prompt once, incrementally, taking a digest at
    each text length present in ``index`` (sha -> meta)."""
    lengths = sorted({e.text_bytes for e in index.values() if e.text_bytes <= len(prompt)})
    h, pos, matched = hashlib.sha1(), 0, []
    for n in lengths:
        h.update(prompt[pos:n])
        pos = n
        e = index.get(h.hexdigest())
        if e is not None and e.text_bytes == n:
            matched.append(e)
    return matched[::-1]


def rejection(meta: CheckpointMeta, ctx: int, rules: LookupRules, min_tokens: int | None = None) -> str | None:
    """Why ``meta`` cannot serve a runtime of ``ctx`` tokens (None: it can):
    below-min-tokens | ctx-too-large | model-mismatch | quant-mismatch."""
    if meta.tokens < (rules.min_tokens if min_tokens is None else min_tokens):
        return "below-min-tokens"
    if meta.ctx > ctx:
        return "ctx-too-large"
    if meta.model_id != rules.model_id:
        return "model-mismatch"
    if rules.reject_different_quant and meta.quant_bits != rules.quant_bits:
        return "quant-mismatch"
    return None


def decide(prompt: bytes, index: Mapping[str, M], ctx: int, rules: LookupRules, text_matches: Callable[[M], bool],
           failed: Container[str] = (), min_tokens: int | None = None) -> LookupDecision[M]:
    """The longest usable prefix checkpoint of ``prompt`` at ``ctx``, or why there is none.

    ``failed`` holds the SHAs of checkpoints that failed to load and have not changed
    since ("failed-before": not worth paying for again); ``min_tokens`` overrides the
    rules' floor for this lookup.
    """
    rejected: list[str] = []
    for e in prefix_candidates(prompt, index):
        why = "failed-before" if e.sha in failed else rejection(e, ctx, rules, min_tokens)
        if why is None and not text_matches(e):
            why = "text-mismatch"
        if why is None:
            return LookupDecision(e, "hit", len(rejected))
        rejected.append(why)
    reason = rejected[0] if rejected else ("no-entries" if not index else "no-prefix-match")
    return LookupDecision(None, reason, len(rejected))
