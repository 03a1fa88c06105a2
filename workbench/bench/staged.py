"""ds4's later staged checkpoint writer, kept for the benchmark that compares it with
the direct one (ds4 PR #353's table): the payload is first serialized to a temp file
under the system temp dir (``ds4_session_stage_payload``), measured, then copied into the
checkpoint file through an 8 MiB bounce buffer (``ds4_session_write_staged_payload``).

``write_staged`` has ``write_kv_file``'s signature, so ``KVStore.save(..., writer=write_staged)``
runs the whole real save (budget, temp name, size check, rename, eviction) with it; the
bytes it writes are identical to the direct writer's.
"""

from __future__ import annotations

import os
import tempfile
from typing import BinaryIO

from workbench.kv.checksum import ChunkCRC, Checksums
from workbench.kv.dsv4 import write_payload
from workbench.kv.header import MODEL_FLASH, KVHeader, SaveReason
from workbench.kv.kvfile import make_header
from workbench.kv.stream import Progress, write_all
from workbench.state import SessionState

COPY_CHUNK = 8 * 1024 * 1024  # the bounce buffer, as ds4's DS4_SESSION_IO_CHUNK


def write_staged(f: BinaryIO, state: SessionState, text: bytes, *, quant_bits: int, reason: SaveReason,
                 ext_flags: int = 0, checksum: bool = True, now: int, hits: int = 0,
                 progress: Progress | None = None, model_id: int = MODEL_FLASH,
                 fingerprint: bytes | None = None) -> tuple[KVHeader, int]:
    """Serialize the payload to a staged temp file, then write header, text, the staged
    payload and the footer into ``f``. Returns (header, bytes written to ``f``);
    ``progress`` gets (payload bytes serialized, payload bytes) per layer of the first phase."""
    sfd, spath = tempfile.mkstemp(prefix="ds4-session-payload.")
    try:
        with os.fdopen(sfd, "w+b", buffering=0) as sf:
            crc = ChunkCRC() if checksum else None
            write_payload(sf, state, crc, progress)
            measured = os.fstat(sf.fileno()).st_size
            header = make_header(state, text, quant_bits=quant_bits, reason=reason, ext_flags=ext_flags,
                                 now=now, hits=hits, payload_len=measured, model_id=model_id)
            head = header.pack()
            n = write_all(f, head) + write_all(f, text)
            sf.seek(0)
            view = memoryview(bytearray(COPY_CHUNK))
            while True:
                got = sf.readinto(view)
                if not got:
                    break
                n += write_all(f, view[:got])
            if crc is not None:
                n += write_all(f, Checksums.of(head, text, crc, fingerprint).pack())
        return header, n
    finally:
        os.unlink(spath)
