"""A model's fingerprint for the ``.kv`` footer: which model a checkpoint belongs to.

SHA-256 of the GGUF file's bytes before its tensor data: the header, every metadata
key and value (the tokenizer's vocabulary, merges and special ids included; synthetic
models carry their seed) and every tensor's name, ggml type, shape and offset. Weight
bytes are not read, so it costs one read of the header region (a few MiB for ds4's
129k-token vocabulary) once per opened model. Two files differ in it when their
metadata, tokenizer, quantization or tensor set differ; files that differ only in
weight bytes (which no GGUF producer makes without a metadata change) share it.
"""

from __future__ import annotations

import hashlib

from workbench.gguf.layout import routed_quant_bits
from workbench.gguf.reader import GGUFError, GGUFFile

FINGERPRINT_DOMAIN = b"ds4-workbench model fingerprint v1\0"
DS4_FLASH_MODEL_ID = 0  # KVC byte 7 ds4 writes for DeepSeek V4 Flash, the only model this workbench runs


def model_fingerprint(f: GGUFFile) -> bytes:
    """The 32-byte fingerprint of an open GGUF file (see the module docstring)."""
    h = hashlib.sha256(FINGERPRINT_DOMAIN)
    try:
        with open(f.path, "rb") as fh:
            left = f.data_offset
            while left:
                piece = fh.read(min(left, 1 << 20))
                if not piece:
                    raise GGUFError(f"{f.path}: file ends at byte {f.data_offset - left} of its "
                                    f"{f.data_offset}-byte header region")
                h.update(piece)
                left -= len(piece)
    except OSError as err:
        raise GGUFError(f"{f.path}: cannot read for the model fingerprint: {err.strerror or err}") from None
    return h.digest()


def checkpoint_identity(f: GGUFFile) -> dict[str, int | bytes]:
    """What a KV store writes into and checks against a checkpoint for this model:
    ``quant_bits`` (KVC byte 4), ``model_id`` (byte 7), ``fingerprint`` (the footer's);
    keyword arguments for ``KVStore``/``KVStore.from_policy``."""
    return {"quant_bits": routed_quant_bits(f), "model_id": DS4_FLASH_MODEL_ID, "fingerprint": model_fingerprint(f)}
