"""DeepSeek V4 byte-level BPE tokenizer, built from a GGUF's vocabulary arrays.

The GGUF carries two arrays (the only tokenizer keys ds4 reads):

* ``tokenizer.ggml.tokens``: one string per id (129,280 for DeepSeek V4). Byte-level BPE
  entries are in GPT-2 byte-to-unicode form (``"Ġthe"``); added tokens are their literal
  content (``"<｜User｜>"``).
* ``tokenizer.ggml.merges``: ``"left right"`` strings, merge rank = index.

From them this module builds a Hugging Face ``tokenizers`` BPE (byte-level, no byte
fallback, no unknown token) behind the official JoyAI pre-tokenizer, so ids are those of
the official ``tokenizer.json``. Every token whose string is byte-level encodable goes
into the BPE vocabulary under its own id; tokens that are not (those containing U+FF5C
``｜`` or any other character outside the byte alphabet) are literal. Literal tokens can
never come out of BPE, and no token is recognised inside text by :meth:`Tokenizer.encode`:
user text never turns into special tokens. :meth:`Tokenizer.encode_rendered` recognises
exactly ds4's seven special strings (``SPECIAL_TEXTS``) and BPE-encodes the text between.

Decoding follows ds4 (``ds4_token_text``): literal tokens are emitted as their UTF-8
bytes, byte-level tokens through the inverse byte map.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from tokenizers import Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, pre_tokenizers
from tokenizers.models import BPE

from workbench.errors import WorkbenchError

BOS_TEXT = "<｜begin▁of▁sentence｜>"
EOS_TEXT = "<｜end▁of▁sentence｜>"
USER_TEXT = "<｜User｜>"
ASSISTANT_TEXT = "<｜Assistant｜>"
THINK_TEXT = "<think>"
THINK_END_TEXT = "</think>"
DSML_TEXT = "｜DSML｜"

SPECIAL_TEXTS: tuple[str, ...] = (
    BOS_TEXT,
    EOS_TEXT,
    USER_TEXT,
    ASSISTANT_TEXT,
    THINK_TEXT,
    THINK_END_TEXT,
    DSML_TEXT,
)
"""The seven strings ds4 recognises in rendered chat text (``tokenize_rendered_chat_vocab``)."""

TOKENS_KEY = "tokenizer.ggml.tokens"
MERGES_KEY = "tokenizer.ggml.merges"

# The official pre-tokenizer (tokenizer.json, JoyAI style). The GGUF does not carry it
# (ds4 ignores ``tokenizer.ggml.pre``), so it is part of the code. The character classes
# hold literal CR and LF characters, exactly as the official file does.
_DIGITS_PATTERN = r"\p{N}{1,3}"
_CJK_PATTERN = "[一-龥぀-ゟ゠-ヿ]+"
_WORDS_PATTERN = (
    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+"""
    "|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
    "| ?[\\p{P}\\p{S}]+[\r\n]*"
    "|\\s*[\r\n]+"
    "|\\s+(?!\\S)"
    "|\\s+"
)

_SPECIAL_SPLIT = re.compile("(" + "|".join(re.escape(s) for s in SPECIAL_TEXTS) + ")")


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable code point map (256 entries).

    Bytes 33..126, 161..172 and 174..255 map to themselves; the other 68 bytes map, in
    increasing order, to U+0100, U+0101, ...
    """
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


_BYTE_TO_UNICODE = _byte_to_unicode()
_BYTE_ALPHABET = frozenset(_BYTE_TO_UNICODE.values())
# str.translate table: byte-level code point -> the latin-1 character of its byte.
_UNICODE_TO_LATIN1 = {ord(u): chr(b) for b, u in _BYTE_TO_UNICODE.items()}


class TokenizerError(WorkbenchError):
    """The vocabulary cannot make a tokenizer, or an id is out of range."""


class HasMetadata(Protocol):
    """What :meth:`Tokenizer.from_gguf` needs of a GGUF file: its metadata mapping."""

    @property
    def metadata(self) -> Mapping[str, Any]: ...


def official_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """The official DeepSeek V4 pre-tokenizer: three JoyAI splits, then ByteLevel."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_DIGITS_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.Split(Regex(_CJK_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.Split(Regex(_WORDS_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _is_byte_level(token: str) -> bool:
    return bool(token) and _BYTE_ALPHABET.issuperset(token)


class Tokenizer:
    """DeepSeek V4 tokenizer: ids identical to the official ``tokenizer.json``.

    Attributes:
        n_vocab: number of ids (length of the GGUF token array).
        bos, eos, user, assistant, think, think_end, dsml: ids of ds4's seven specials,
            looked up by string.
        source: where the vocabulary came from (a file path or a description), for messages.
    """

    def __init__(self, tokens: Sequence[str], merges: Sequence[str], source: str) -> None:
        """Build from a flat token list (index = id) and merges (rank = index).

        Raises:
            TokenizerError: naming ``source`` and the problem (a non-string entry, a
                duplicated byte-level token, a byte symbol missing from the vocabulary, a
                malformed merge or one whose parts are unknown, a missing special).
        """
        self.source = source
        self.n_vocab = len(tokens)
        if self.n_vocab == 0:
            raise TokenizerError(f"{source}: {TOKENS_KEY} is empty")

        first_id: dict[str, int] = {}
        bpe_vocab: dict[str, int] = {}
        token_bytes: list[bytes] = []
        for i, token in enumerate(tokens):
            if not isinstance(token, str):
                raise TokenizerError(f"{source}: {TOKENS_KEY}[{i}] is {type(token).__name__}, not a string")
            first_id.setdefault(token, i)
            if _is_byte_level(token):
                if token in bpe_vocab:
                    raise TokenizerError(
                        f"{source}: byte-level token {token!r} appears at ids {bpe_vocab[token]} and {i}"
                    )
                bpe_vocab[token] = i
                token_bytes.append(token.translate(_UNICODE_TO_LATIN1).encode("latin-1"))
            else:
                token_bytes.append(token.encode("utf-8"))
        self._token_bytes = token_bytes

        missing_bytes = [b for b, u in _BYTE_TO_UNICODE.items() if u not in bpe_vocab]
        if missing_bytes:
            raise TokenizerError(
                f"{source}: {TOKENS_KEY} lacks single-byte tokens for bytes {missing_bytes[:8]}"
                f"{' ...' if len(missing_bytes) > 8 else ''}; text could not always be encoded"
            )

        pairs: list[tuple[str, str]] = []
        for rank, merge in enumerate(merges):
            parts = merge.split(" ") if isinstance(merge, str) else ()
            if len(parts) != 2:
                raise TokenizerError(f"{source}: {MERGES_KEY}[{rank}] = {merge!r} is not 'left right'")
            left, right = parts
            for part in (left, right, left + right):
                if part not in bpe_vocab:
                    raise TokenizerError(
                        f"{source}: {MERGES_KEY}[{rank}] = {merge!r}: {part!r} is not a byte-level token"
                    )
            pairs.append((left, right))

        specials: list[int] = []
        for text in SPECIAL_TEXTS:
            if text not in first_id:
                raise TokenizerError(f"{source}: required special token {text!r} is missing from {TOKENS_KEY}")
            specials.append(first_id[text])
        self.bos, self.eos, self.user, self.assistant, self.think, self.think_end, self.dsml = specials
        self._special_ids = dict(zip(SPECIAL_TEXTS, specials))

        model = BPE(
            vocab=bpe_vocab,
            merges=pairs,
            dropout=None,
            unk_token=None,
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=False,
        )
        hf = HFTokenizer(model)
        hf.pre_tokenizer = official_pre_tokenizer()
        hf.decoder = decoders.ByteLevel()
        self._hf = hf

    @classmethod
    def from_vocab(cls, tokens: Sequence[str], merges: Sequence[str], source: str = "vocabulary") -> Tokenizer:
        """Build from ``tokenizer.ggml.tokens`` / ``tokenizer.ggml.merges``-style lists."""
        return cls(tokens, merges, source)

    @classmethod
    def from_gguf(cls, f: HasMetadata) -> Tokenizer:
        """Build from a GGUF file's metadata (``f.metadata``; arrays as lists).

        Messages name ``f.path`` when the object has one.
        """
        source = str(getattr(f, "path", "GGUF metadata"))
        metadata = f.metadata
        arrays = []
        for key in (TOKENS_KEY, MERGES_KEY):
            value = metadata.get(key)
            if value is None:
                raise TokenizerError(f"{source}: tokenizer metadata key {key} is missing")
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise TokenizerError(f"{source}: {key} is {type(value).__name__}, not an array of strings")
            arrays.append(value)
        return cls(arrays[0], arrays[1], source)

    # -- encoding ---------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of plain ``text``; no special token is recognised inside it."""
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` of each text, run in parallel by ``tokenizers``."""
        return [e.ids for e in self._hf.encode_batch(list(texts), add_special_tokens=False)]

    def encode_rendered(self, text: str) -> list[int]:
        """Ids of a rendered chat string: ds4's seven specials become their ids.

        The text between specials is BPE-encoded span by span, as ds4's
        ``tokenize_rendered_chat_vocab`` does; every other added token (``<tool_result>``,
        ``<｜latest_reminder｜>``, ``<｜DSML｜...`` brackets) stays plain text.
        """
        parts = _SPECIAL_SPLIT.split(text)
        spans = parts[0::2]  # re.split with one group: text, special, text, special, ..., text
        nonempty = [s for s in spans if s]
        encoded = iter(self.encode_batch(nonempty) if nonempty else ())
        ids: list[int] = []
        for k, part in enumerate(parts):
            if k % 2:
                ids.append(self._special_ids[part])
            elif part:
                ids.extend(next(encoded))
        return ids

    # -- decoding ---------------------------------------------------------------------

    def _check_ids(self, ids: list[int]) -> None:
        if ids and (min(ids) < 0 or max(ids) >= self.n_vocab):
            bad = next(i for i in ids if i < 0 or i >= self.n_vocab)
            raise TokenizerError(f"{self.source}: token id {bad} is outside 0..{self.n_vocab - 1}")

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (literal tokens: their UTF-8 text)."""
        self._check_ids([token_id])
        return self._token_bytes[token_id]

    def decode(self, ids: Iterable[int]) -> bytes:
        """Concatenated bytes of ``ids`` (may end inside a UTF-8 sequence)."""
        ids = list(ids)
        self._check_ids(ids)
        return b"".join(map(self._token_bytes.__getitem__, ids))

    def decode_text(self, ids: Iterable[int]) -> str:
        """:meth:`decode` as text; invalid UTF-8 becomes U+FFFD."""
        return self.decode(ids).decode("utf-8", errors="replace")

    def text_token_mask(self) -> np.ndarray:
        """bool ``[n_vocab]``: tokens whose bytes are whole UTF-8 characters and that are not
        chat markers (no ``｜``-literal or special token), plus EOS.

        Sampling only these makes a generation's text replay byte-exactly when a client
        sends it back (random synthetic models otherwise emit split UTF-8 sequences)."""
        mask = np.zeros(self.n_vocab, dtype=bool)
        specials = set(SPECIAL_TEXTS)
        for i, raw in enumerate(self._token_bytes):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                continue
            mask[i] = bool(text) and "\uff5c" not in text and text not in specials
        mask[self.eos] = True
        return mask

    def __repr__(self) -> str:
        return f"Tokenizer(n_vocab={self.n_vocab}, source={self.source!r})"
