"""Whole ``.kv`` files: header, text, DSV4 payload, trailers and footer, in one pass.

The writer streams what today's ds4 writes for the same state (header with model id and
ABI 2, text, DSV4 version-2 payload: ``workbench.kv.dsv4``) and, when asked, the
workbench's footer (checksums and model fingerprint, ``workbench.kv.checksum``) into one
open file. The reader checks the header, the text, the trailers against the extension
flags (``workbench.kv.trailers``), every checksum while the payload streams in, every
payload check against the runtime, and the payload's token count against the header's.
ds4's tool-map and title trailers are read, never written.
"""

from __future__ import annotations

import os
from typing import BinaryIO

from workbench.kv.checksum import ChunkCRC, Checksums, footer_bytes, header_crc, text_crc
from workbench.kv.dsv4 import PAYLOAD_HEADER_BYTES, payload_bytes, payload_tokens, read_payload, write_payload
from workbench.kv.errors import check
from workbench.kv.header import MODEL_FLASH, TEXT_OFFSET, KVHeader, SaveReason, new_header, parse_header, read_text
from workbench.kv.stream import Progress, write_all
from workbench.kv.trailers import Trailer, read_trailer
from workbench.spec.statelayout import StateLayout
from workbench.state import SessionState


# ---- writing ------------------------------------------------------------------------------
def make_header(state: SessionState, text: bytes, *, quant_bits: int, reason: SaveReason, ext_flags: int = 0,
                now: int, hits: int = 0, payload_len: int | None = None, model_id: int = MODEL_FLASH) -> KVHeader:
    """The header for saving ``state`` under ``text`` (``payload_len`` defaults to the exact size)."""
    return new_header(text, tokens=state.n_tokens, ctx=state.ctx,
                      payload_bytes=payload_bytes(state) if payload_len is None else payload_len,
                      quant_bits=quant_bits, reason=reason, ext_flags=ext_flags, now=now, hits=hits,
                      model_id=model_id)


def write_kv_file(f: BinaryIO, state: SessionState, text: bytes, *, quant_bits: int, reason: SaveReason,
                  ext_flags: int = 0, checksum: bool = True, now: int, hits: int = 0,
                  progress: Progress | None = None, model_id: int = MODEL_FLASH,
                  fingerprint: bytes | None = None) -> tuple[KVHeader, int]:
    """Write a whole .kv file (what ds4 writes, then the footer when ``checksum``) into ``f``.

    ``fingerprint`` (32 bytes, ``workbench.gguf.fingerprint``) goes into the footer.
    Returns the header written and the bytes written. The caller compares the count with
    ``kv_file_bytes`` before publishing the file.
    """
    header = make_header(state, text, quant_bits=quant_bits, reason=reason, ext_flags=ext_flags,
                         now=now, hits=hits, model_id=model_id)
    head = header.pack()
    crc = ChunkCRC() if checksum else None
    n = write_all(f, head) + write_all(f, text)
    n += write_payload(f, state, crc, progress)
    if crc is not None:
        n += write_all(f, Checksums.of(head, text, crc, fingerprint).pack())
    return header, n


def kv_file_bytes(state: SessionState, text_len: int, checksum: bool = True) -> int:
    """Exact size of the .kv file ``write_kv_file`` produces."""
    p = payload_bytes(state)
    return TEXT_OFFSET + text_len + p + (footer_bytes(p) if checksum else 0)


# ---- reading ------------------------------------------------------------------------------
def read_kv_file(f: BinaryIO, layout: StateLayout | None, ctx: int | None = None, *, name: str,
                 prefill_chunk: int | None = None, keep: bool = True, verify: bool = True,
                 progress: Progress | None = None) -> tuple[KVHeader, bytes, SessionState | None, Trailer]:
    """Read and check a whole .kv file from an open binary file.

    Checks the header, the text, the trailer, the payload (all §1.4 checks against the
    runtime ``ctx``), the payload's token count against the header's, and, when the file
    carries checksums (footer or old bit-3 trailer) and ``verify`` is set, every CRC while streaming. A file
    whose layout is unknown gets one from ``workbench.kv.inspection.file_layout``. A file
    without a payload (ds4's agent ``/strip``; ``layout`` may be None) is checked up to
    its trailers with ``keep=False`` and refused with ``keep=True``.
    """
    size = os.fstat(f.fileno()).st_size
    f.seek(0)
    head = f.read(TEXT_OFFSET)
    header = parse_header(head, name, size)
    check(not (keep and header.stripped), name, "no payload (payload_bytes 0: text and title only, as ds4's "
          "agent /strip writes): listed, never loaded")
    text = read_text(f, header, name)
    trailer = read_trailer(f, header, name)
    crc = None
    if trailer.checksums is not None and verify:
        cs = trailer.checksums
        check(header_crc(head) == cs.header, name, "header checksum mismatch (bytes 0..47 outside hits/last_used)")
        check(text_crc(text) == cs.text, name, "text checksum mismatch")
        crc = ChunkCRC(cs.chunk_bytes, cs.chunks, name, cs.algorithm)
    if header.stripped:
        return header, text, None, trailer
    f.seek(header.payload_offset)
    head_tokens = payload_tokens(f.read(min(PAYLOAD_HEADER_BYTES, header.payload_bytes)))
    check(head_tokens in (None, header.tokens), name,
          f"payload holds {head_tokens} tokens, header says {header.tokens}")
    f.seek(header.payload_offset)
    state = read_payload(f, header.payload_bytes, layout, ctx, prefill_chunk=prefill_chunk, name=name, crc=crc,
                         keep=keep, progress=progress)
    if crc is not None:
        crc.finish()
    return header, text, state, trailer


def model_mismatch(header: KVHeader, trailer: Trailer, *, model_id: int, quant_bits: int,
                   fingerprint: bytes | None) -> str | None:
    """Why a file must not restore into this model (None: it may).

    A footer's model fingerprint must equal ``fingerprint`` (when both are known); a file
    without one must at least carry this model's id (byte 7) and routed-expert quant bits
    (byte 4). The model id is checked always, as ds4 does.
    """
    if header.model_id != model_id:
        return f"written for a different model (model id {header.model_id}, this model {model_id})"
    recorded = trailer.fingerprint
    if recorded is not None and fingerprint is not None:
        if recorded != fingerprint:
            return (f"written by a different model (fingerprint {recorded.hex()[:16]}, this model "
                    f"{fingerprint.hex()[:16]}: other weights, quantization or tokenizer)")
        return None
    if header.quant_bits != quant_bits:
        return (f"written for {header.quant_bits}-bit routed experts, this model has {quant_bits}-bit "
                "(no model fingerprint in the file)")
    return None
