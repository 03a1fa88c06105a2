"""The streaming reader and writer with payloads of many pieces: the pipelined path (system
calls on the helper thread while this one hashes) moves the same bytes, computes the same
checksums, names the field at a corrupt or missing byte and leaves no I/O in flight."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from workbench.kv.checksum import ChunkCRC
from workbench.kv.errors import KVFormatError
from workbench.kv.stream import PIECE, WRITE_PIECE, Sink, Source

CHUNK = 1 << 20  # checksum chunk in these tests: several per piece boundary


def _data(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _expected(data: bytes) -> list[int]:
    crc = ChunkCRC(CHUNK)
    for at in range(0, len(data), 4096):  # fed in other sizes: the same checksums
        crc.update(data[at:at + 4096])
    return crc.finish()


def test_sink_writes_every_piece_in_order_with_checksums_and_progress(tmp_path: Path) -> None:
    data = _data(3 * WRITE_PIECE + 12345)
    crc, seen = ChunkCRC(CHUNK), []
    path = tmp_path / "out.bin"
    with open(path, "wb", buffering=0) as f:
        out = Sink(f, [crc], lambda done, total: seen.append(done), len(data) + 10)
        assert out.put(b"0123456789") == 10  # small: inline
        assert out.put(data) == len(data)  # several pieces: pipelined
        assert out.put_many(iter([b"ab", data[:5], b""])) == 7  # many buffers: one pipeline
        assert out.n == len(data) + 17
    written = b"0123456789" + data + b"ab" + data[:5]
    assert path.read_bytes() == written
    assert crc.finish() == _expected(written)
    assert seen == sorted(seen) and seen[-1] == len(written) and len(seen) == 1 + 4 + 2


def test_source_fills_many_pieces_and_verifies_while_streaming(tmp_path: Path) -> None:
    data = _data(5 * PIECE + 7)
    path = tmp_path / "in.bin"
    path.write_bytes(data)
    crc, seen = ChunkCRC(CHUNK, _expected(data), "in.bin"), []
    out = bytearray(len(data))
    with open(path, "rb", buffering=0) as f:
        src = Source(f, len(data), "in.bin", [crc], lambda done, total: seen.append(done))
        src.reserve(len(data), "body")
        src.fill(memoryview(out), lambda o: f"byte {o}")
        assert f.tell() == len(data)  # nothing read ahead past the field
    assert bytes(out) == data and crc.finish() == _expected(data)
    assert seen == sorted(seen) and seen[-1] == len(data) and len(seen) == 6


@pytest.mark.parametrize("where", [0, PIECE + 5, 4 * PIECE + 1])
def test_a_corrupt_byte_names_its_chunk_and_field(tmp_path: Path, where: int) -> None:
    data = bytearray(_data(5 * PIECE))
    expected = _expected(bytes(data))
    data[where] ^= 0xFF
    path = tmp_path / "bad.bin"
    path.write_bytes(bytes(data))
    with open(path, "rb", buffering=0) as f:
        src = Source(f, len(data), "bad.bin", [ChunkCRC(CHUNK, expected, "bad.bin")])
        with pytest.raises(KVFormatError, match=rf"chunk {where // CHUNK} .*while reading tensor at {where // PIECE}"):
            src.fill(memoryview(bytearray(len(data))), lambda o: f"tensor at {o // PIECE}")
        # no read left in flight: the one piece read ahead of the corrupt one has landed, no more
        assert f.tell() == min(len(data), (where // PIECE + 2) * PIECE)


def test_a_truncated_file_names_the_field_it_ends_in(tmp_path: Path) -> None:
    data = _data(3 * PIECE)
    path = tmp_path / "short.bin"
    path.write_bytes(data[: 2 * PIECE + 100])
    with open(path, "rb", buffering=0) as f:
        src = Source(f, len(data), "short.bin", [ChunkCRC(CHUNK)])
        with pytest.raises(KVFormatError, match=r"short.bin: file ends inside layer 7 comp \(payload byte 4194404 of"):
            src.fill(memoryview(bytearray(len(data))), lambda o: "layer 7 comp")


def test_streams_work_on_in_memory_files() -> None:
    data = _data(2 * PIECE + 1)
    buf = io.BytesIO()
    Sink(buf, [ChunkCRC(CHUNK)]).put(data)
    buf.seek(0)
    out = bytearray(len(data))
    Source(buf, len(data), "mem", [ChunkCRC(CHUNK, _expected(data))]).fill(memoryview(out), lambda o: "x")
    assert bytes(out) == data


def _write_in_child(q) -> None:  # runs in a forked child
    buf = io.BytesIO()
    Sink(buf, [ChunkCRC(CHUNK)]).put(b"y" * (3 * WRITE_PIECE))
    q.put(len(buf.getvalue()))


def test_a_forked_child_gets_its_own_helper_thread() -> None:
    import multiprocessing

    Sink(io.BytesIO(), [ChunkCRC(CHUNK)]).put(b"x" * (3 * WRITE_PIECE))  # the parent's helper thread exists
    mp = multiprocessing.get_context("fork")
    q = mp.Queue()
    p = mp.Process(target=_write_in_child, args=(q,))
    p.start()
    p.join(30)
    assert p.exitcode == 0 and q.get(timeout=1) == 3 * WRITE_PIECE


class _Failing:
    """A hasher that raises on its second piece."""

    def __init__(self) -> None:
        self.calls = 0

    def update(self, data: memoryview, what: str = "") -> None:
        self.calls += 1
        if self.calls == 2:
            raise ValueError("hasher broke")


def test_a_hasher_error_surfaces_after_every_piece_is_written() -> None:
    buf, data = io.BytesIO(), _data(3 * WRITE_PIECE)
    with pytest.raises(ValueError, match="hasher broke"):
        Sink(buf, [_Failing()]).put(data)
    assert buf.getvalue() == data  # written in order; the error comes when the call returns


@pytest.mark.parametrize("algorithm", [1, 2])
def test_chunk_checksums_do_not_depend_on_how_the_bytes_are_fed(algorithm: int) -> None:
    """Whole chunks (hashed in one call), chunks completed across calls and a short last
    chunk give each chunk's own checksum, computed here independently."""
    import zlib

    xxhash = pytest.importorskip("xxhash") if algorithm == 2 else None
    chunk, data = 4096, _data(5 * 4096 + 777, seed=3)
    one = (lambda b: zlib.crc32(b)) if algorithm == 1 else (lambda b: xxhash.xxh3_64_intdigest(b) & 0xFFFFFFFF)
    want = [one(data[at:at + chunk]) for at in range(0, len(data), chunk)]
    cuts = [0, 1, 100, 4096, 4097, 3 * 4096 + 5, 3 * 4096 + 5, 5 * 4096, len(data)]  # empty, partial, whole
    crc = ChunkCRC(chunk, algorithm=algorithm)
    for a, b in zip(cuts, cuts[1:]):
        crc.update(memoryview(data)[a:b])
    assert crc.finish() == want
    bad = bytearray(data)
    bad[2 * 4096 + 9] ^= 1
    check = ChunkCRC(chunk, expected=want, name="f.kv", algorithm=algorithm)
    with pytest.raises(KVFormatError, match=r"f\.kv: payload checksum mismatch in chunk 2 \(payload bytes 8192\.\.12287"):
        check.update(bytes(bad), "layer 3 comp")
