"""Why a prompt does (not) hit a cache directory: the longest stored prefix, where it
diverges, which checkpoint would serve, and what alignment would have made it reusable.

Reads only headers and texts (no payloads, nothing modified). Token positions inside a
stored text are exact at its end (the header's token count) and, elsewhere, estimated
in proportion to bytes unless a ``tokenize`` function is given.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

from workbench.kv.errors import KVFormatError
from workbench.kv.header import read_text
from workbench.kv.policy import KVPolicy
from workbench.kv.store import KVStore
from workbench.lab.trace import common_prefix_bytes
from workbench.safeopen import open_regular

ALIGNMENTS = (2048, 1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1)


@dataclass(frozen=True)
class LookupExplanation:
    """The answer of :func:`explain_lookup` (bytes are UTF-8 bytes of rendered text)."""

    prompt_bytes: int
    checkpoints: int
    served_by: str | None  # file name of the checkpoint a lookup would restore
    served_tokens: int
    miss_reason: str  # the store's reason when nothing serves ('' on a hit)
    longest_file: str | None  # the checkpoint sharing the longest prefix with the prompt
    longest_common_bytes: int
    longest_common_tokens: int  # tokens of that checkpoint inside the common prefix
    tokens_estimated: bool
    diverges_at_byte: int | None  # where the longest one stops matching (None: it is a whole prefix)
    diverges_at_token: int | None
    stored_tokens: int
    alignment_hint: str  # what would have made the shared prefix reusable
    explanation: str

    def as_dict(self) -> dict:
        return asdict(self)


def explain_lookup(store: KVStore, prompt: bytes, policy: KVPolicy, ctx: int | None = None,
                   tokenize: Callable[[bytes], int] | None = None) -> LookupExplanation:
    """Explain what ``store.lookup`` does with ``prompt`` (rendered text) under ``policy``
    (min tokens, trim, alignment); ``ctx`` None accepts any file's context;
    ``tokenize(text) -> token count`` makes token positions exact."""
    entries = store.entries()
    runtime_ctx = ctx if ctx is not None else max([e.ctx for e in entries] + [1])
    hit = store.lookup(prompt, runtime_ctx, policy.min_tokens)
    miss = "" if hit is not None else next((e.reason for e in reversed(store.events) if e.kind == "miss"), "")
    best, best_common, best_text = None, -1, b""
    for e in entries:
        try:
            with open_regular(e.path, follow=False) as f:
                text = read_text(f, e.header, str(e.path))
        except (OSError, KVFormatError):
            continue
        common = common_prefix_bytes(text, prompt)
        if common > best_common or (common == best_common and best is not None and e.tokens > best.tokens):
            best, best_common, best_text = e, common, text
    if best is None:
        return LookupExplanation(len(prompt), len(entries), None, 0, miss or "no-entries", None, 0, 0, False, None,
                                 None, 0, "", "the cache directory holds no readable checkpoint")
    estimated = tokenize is None
    if tokenize is not None:
        common_tokens = tokenize(best_text[:best_common])
    else:
        common_tokens = best.tokens * best_common // max(1, len(best_text))
    whole = best_common == len(best_text)
    hint = _alignment_hint(common_tokens, whole, policy)
    words = _words(hit, miss, best, best_common, len(best_text), common_tokens, estimated, hint, policy)
    return LookupExplanation(
        len(prompt), len(entries), hit.path.name if hit else None, hit.tokens if hit else 0, miss,
        best.path.name, best_common, best.tokens if whole else common_tokens, estimated,
        None if whole else best_common, None if whole else common_tokens, best.tokens, hint, words)


def _alignment_hint(common_tokens: int, whole: bool, policy: KVPolicy) -> str:
    if whole:
        return ""
    if common_tokens < policy.min_tokens:
        return (f"the shared prefix ({common_tokens} tokens) is below min tokens {policy.min_tokens}: "
                "no alignment makes it reusable")
    for a in ALIGNMENTS:
        boundary = (common_tokens - policy.boundary_trim) // a * a if a else common_tokens
        if boundary >= policy.min_tokens:
            return (f"a checkpoint on a {a}-token boundary (--kv-align {a}) would have stored {boundary} tokens "
                    f"of the shared prefix")
    return ""


def _words(hit, miss: str, best, common: int, text_len: int, common_tokens: int, estimated: bool, hint: str,
           policy: KVPolicy) -> str:
    approx = "~" if estimated else ""
    if hit is not None:
        return f"served by {hit.path.name}: {hit.tokens} tokens restored, the rest prefilled"
    if common == text_len:
        why = {"below-min-tokens": f"it has fewer than min tokens ({policy.min_tokens})",
               "ctx-too-large": "it was written for a larger context",
               "model-mismatch": "it was written for another model",
               "quant-mismatch": "it has other quant bits"}.get(miss, f"lookup said {miss}")
        return f"{best.path.name} is a whole prefix of the prompt ({best.tokens} tokens) but is not used: {why}"
    return (f"no checkpoint is a prefix of the prompt: the closest, {best.path.name} ({best.tokens} tokens), "
            f"matches {common} bytes ({approx}{common_tokens} tokens) and then diverges"
            + (f"; {hint}" if hint else ""))
