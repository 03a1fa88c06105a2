"""ds4's .kv format: KVC header offsets, DSV4 payload bytes and validation, checksum trailer.

Expected numbers come from ds4-kvcache.md §1 (offsets, the 23,995,788 + 13,764*T size,
ds4's capacity rules); the file bytes are read back with ``struct`` independently of the
reader under test.
"""

from __future__ import annotations

import io
import struct
import zlib

import mlx.core as mx
import numpy as np
import pytest

import kv_craft
from workbench.kv import checksum, dsv4, header, inspection, kvfile
from workbench.kv.errors import KVFormatError
from workbench.kv.header import ExtFlag, SaveReason
from workbench.spec.statelayout import StateLayout
from workbench.state import SessionState, random_state

SMALL = StateLayout(n_layer=6, head_dim=128, idx_dim=128, n_vocab=1024, n_swa=128, ratios=(0, 0, 4, 128, 4, 128))
NOW = 1_780_000_000


def kv_bytes(state: SessionState, text: bytes = b"<|User|>hello", *, checksum: bool = True,
             reason: SaveReason = SaveReason.COLD, ext: int = 0) -> bytes:
    buf = io.BytesIO()
    _, n = kvfile.write_kv_file(buf, state, text, quant_bits=2, reason=reason, ext_flags=ext, checksum=checksum, now=NOW)
    assert n == len(buf.getvalue()) == kvfile.kv_file_bytes(state, len(text), checksum)
    return buf.getvalue()


def assert_same_state(a: SessionState, b: SessionState) -> None:
    assert a.tokens == b.tokens
    assert np.array_equal(np.asarray(a.logits), np.asarray(b.logits))
    for la, lb in zip(a.layers, b.layers, strict=True):
        ta, tb = list(la.tensors()), list(lb.tensors())
        assert [n for n, _ in ta] == [n for n, _ in tb]
        for (_, x), (_, y) in zip(ta, tb):
            assert np.array_equal(np.asarray(x), np.asarray(y))


def spec_payload(T: int) -> int:
    """ds4-kvcache.md §1.4 (T >= 128): fixed part + per-token growth."""
    return 23_995_788 + 4 * T + 21 * (2048 + 512) * (T // 4) + 20 * 2048 * (T // 128)


@pytest.mark.parametrize("T", [256, 384])
def test_ds4_payload_size_offsets_and_round_trip(T: int) -> None:
    lay = StateLayout.ds4()
    state = random_state(lay, T, 32768, seed=T)
    assert dsv4.payload_bytes(state) == 23_995_788 + 13_764 * T == spec_payload(T)
    text = "<｜User｜>héllo".encode()
    blob = kv_bytes(state, text)
    # KVC header, read with struct at the spec's offsets
    assert blob[0:3] == b"KVC" and blob[3] == 1 and blob[4] == 2 and blob[5] == 1  # magic, version, quant, cold
    # today's ds4 ABI: byte 7 model id (Flash 0), byte 20 ABI 2; the footer takes no ext bit (bit 3 is ds4's title)
    assert blob[6] == 0 and blob[7] == 0 and blob[20:24] == b"\2\0\0\0"
    assert struct.unpack_from("<III", blob, 8) == (T, 0, 32768)  # tokens, hits, ctx
    assert struct.unpack_from("<QQQ", blob, 24) == (NOW, NOW, 23_995_788 + 13_764 * T)
    assert struct.unpack_from("<I", blob, 48)[0] == len(text) and blob[52:52 + len(text)] == text
    p = 52 + len(text)
    assert blob[p:p + 4] == b"DSV4"
    assert struct.unpack_from("<13I", blob, p) == (0x34565344, 2, 32768, 2048, 2304, 128, 8194, T, 43, 512, 128,
                                                   129280, 128)
    body = p + 52
    assert list(np.frombuffer(blob, "<u4", T, body)) == state.tokens
    assert np.array_equal(np.frombuffer(blob, "<f4", 129280, body + 4 * T), state.logits)
    counts = struct.unpack_from("<86I", blob, body + 4 * T + 4 * 129280)
    assert counts[:4] == (0, 0, T // 4, T // 128) and counts[43:47] == (0, 0, T // 4, 0)
    layer0 = body + 4 * T + 4 * 129280 + 8 * 43
    assert np.array_equal(np.frombuffer(blob, "<f4", 128 * 512, layer0).reshape(128, 512), state.layers[0].raw)
    comp2 = layer0 + 3 * 128 * 512 * 4  # after the raw rows of layers 0, 1, 2
    assert np.array_equal(np.frombuffer(blob, "<f4", 512, comp2), state.layers[2].comp[0])
    trailer = p + dsv4.payload_bytes(state)
    assert blob[trailer:trailer + 4] == b"KCS\2" and blob[-4:] == b"KWBF"
    assert len(blob) - trailer == checksum.footer_bytes(dsv4.payload_bytes(state))
    back = dsv4.read_payload(io.BytesIO(blob[p:trailer]), trailer - p, lay, 32768, name="mem")
    assert back.ctx == 32768 and back.prefill_chunk == 2048
    assert_same_state(state, back)


def test_payload_size_below_128_tokens_and_unaligned() -> None:
    lay = StateLayout.ds4()
    # below the raw window the raw part holds T rows (§1.4), so the fixed part shrinks
    for T in (1, 100):
        raw_short = 43 * (128 - T) * 2048
        assert dsv4.payload_size(lay, T) == spec_payload(T) - raw_short
    assert dsv4.payload_size(lay, 300) == spec_payload(300)
    # the spec's confirmed bench sizes (§7)
    assert dsv4.payload_size(lay, 2048) == 52_184_460 and dsv4.payload_size(lay, 65536) == 926_033_292


def test_capacity_rules() -> None:
    lay = StateLayout.ds4()
    assert dsv4.raw_cap(lay, 32768, 2048) == 2304  # §1.4 example
    assert dsv4.raw_cap(lay, 1_000_000, 8192) == 8192  # capped (ROCm prefill chunk 8192)
    assert dsv4.raw_cap(lay, 1000, 1000) == 1024  # min(ctx, 128 + chunk) rounded up to 256
    assert dsv4.raw_cap(lay, 100, 100) == 256 and dsv4.raw_window(lay, 100) == 100
    assert dsv4.comp_cap(32768) == 8194 and dsv4.default_prefill_chunk(1000) == 1000


@pytest.mark.parametrize("T", [1, 3, 100, 127, 128, 300])
def test_small_layout_round_trip_at_short_lengths(T: int) -> None:
    state = random_state(SMALL, T, 4096, seed=T)
    blob = _payload(state)
    assert len(blob) == dsv4.payload_size(SMALL, T)
    assert_same_state(state, _read(blob))


def test_mlx_and_numpy_states_serialize_identically() -> None:
    np_state = random_state(SMALL, 300, 4096)
    mx_state = np_state.copy()
    mx_state.logits = mx.array(np_state.logits)
    for ls in mx_state.layers:
        for name, arr in list(ls.tensors()):
            setattr(ls, name, mx.array(arr))
    a, b = io.BytesIO(), io.BytesIO()
    assert dsv4.write_payload(a, np_state) == dsv4.write_payload(b, mx_state) == dsv4.payload_bytes(np_state)
    assert a.getvalue() == b.getvalue()


def test_writer_refuses_inconsistent_states() -> None:
    s = random_state(SMALL, 300, 4096)
    s.layers[3].comp = s.layers[3].comp[:1]
    with pytest.raises(KVFormatError, match="layer 3: comp shape"):
        dsv4.write_payload(io.BytesIO(), s)
    with pytest.raises(KVFormatError, match="do not fit context"):
        dsv4.write_payload(io.BytesIO(), random_state(SMALL, 300, 300))
    with pytest.raises(KVFormatError, match="bit0"):
        kv_bytes(random_state(SMALL, 10, 64), ext=ExtFlag.TOOL_MAP)


def _payload(state: SessionState) -> bytes:
    buf = io.BytesIO()
    dsv4.write_payload(buf, state)
    return buf.getvalue()


def _read(blob: bytes, layout: StateLayout = SMALL, ctx: int | None = None, budget: int | None = None, **kw):
    return dsv4.read_payload(io.BytesIO(blob), len(blob) if budget is None else budget, layout, ctx, name="f.kv", **kw)


def test_payload_validation_errors_name_file_and_field() -> None:
    state = random_state(SMALL, 300, 4096)
    blob = _payload(state)
    with pytest.raises(KVFormatError, match=r"f\.kv: truncated session payload: layer 5 comp_score"):
        _read(blob, budget=len(blob) - 4)
    with pytest.raises(KVFormatError, match=r"f\.kv: file ends inside layer 5 comp_score"):
        _read(blob[:-4], budget=len(blob))
    with pytest.raises(KVFormatError, match="trailing payload bytes: 8"):
        _read(blob + b"\0" * 8)
    bad = bytearray(blob)
    bad[4] = 3  # payload version (1 and 2 are read)
    with pytest.raises(KVFormatError, match="unsupported session payload"):
        _read(bytes(bad))
    other = StateLayout(6, 128, 128, 2048, 128, SMALL.ratios)
    with pytest.raises(KVFormatError, match="different layout"):
        _read(blob, other)
    with pytest.raises(KVFormatError, match="does not fit current context: saved ctx 4096"):
        _read(blob, ctx=2048)
    with pytest.raises(KVFormatError, match="graph chunk layout"):
        _read(blob, ctx=4096, prefill_chunk=1024)
    counts_at = 52 + 4 * 300 + 4 * 1024
    bad = bytearray(blob)
    struct.pack_into("<I", bad, counts_at + 4 * 2, 74)  # layer 2 has 75 compressed rows
    with pytest.raises(KVFormatError, match="row count at layer 2"):
        _read(bytes(bad))
    bad = bytearray(blob)
    struct.pack_into("<I", bad, 4 * 12, 127)  # raw_live must be min(T, window)
    with pytest.raises(KVFormatError, match="raw ring layout"):
        _read(bytes(bad))


def test_file_from_smaller_context_loads_into_larger_runtime() -> None:
    state = random_state(SMALL, 300, 4096)
    back = _read(_payload(state), ctx=65536)
    assert back.ctx == 65536 and back.prefill_chunk == 2048
    assert_same_state(state, back)
    # ds4 rejects T >= ctx
    with pytest.raises(KVFormatError, match="does not fit"):
        _read(_payload(random_state(SMALL, 300, 301)), ctx=300)


def test_read_header_fields_and_errors(tmp_path) -> None:
    state = random_state(SMALL, 300, 4096)
    blob = kv_bytes(state, b"abc", reason=SaveReason.SHUTDOWN, ext=ExtFlag.THINKING_VISIBLE)
    path = tmp_path / "x.kv"
    path.write_bytes(blob)
    h = header.read_header(path)
    assert (h.quant_bits, h.reason, h.tokens, h.hits, h.ctx, h.text_bytes, h.file_size) == \
        (2, SaveReason.SHUTDOWN, 300, 0, 4096, 3, len(blob))
    assert h.ext_flags == ExtFlag.THINKING_VISIBLE and (h.model_id, h.abi) == (0, 2) and not h.stripped
    assert h.payload_bytes == dsv4.payload_bytes(state) and h.payload_offset == 55
    for offset, value, message in [(0, b"KVX", "magic"), (3, b"\x02", "version 2"), (4, b"\x03", "quant bits 3"),
                                   (8, b"\0\0\0\0", "token count")]:
        bad = bytearray(blob)
        bad[offset:offset + len(value)] = value
        path.write_bytes(bytes(bad))
        with pytest.raises(KVFormatError, match=message):
            header.read_header(path)
    path.write_bytes(blob[:1000])
    with pytest.raises(KVFormatError, match=r"x\.kv: truncated file"):
        header.read_header(path)
    bad = bytearray(blob)
    bad[5] = 9  # ds4 maps unknown reasons to 0
    path.write_bytes(bytes(bad))
    assert header.read_header(path).reason == SaveReason.UNKNOWN


def _read_file(tmp_path, blob: bytes, layout: StateLayout | None = SMALL, ctx: int | None = None):
    path = tmp_path / "f.kv"
    path.write_bytes(blob)
    with open(path, "rb") as f:
        return kvfile.read_kv_file(f, layout, ctx, name="f.kv")


def _chunk_sum(algorithm: int, data: bytes) -> int:
    """A payload chunk's checksum computed independently of the module."""
    if algorithm == 1:
        return zlib.crc32(data)
    xxhash = pytest.importorskip("xxhash")
    return xxhash.xxh3_64_intdigest(data) & 0xFFFFFFFF


def test_crc32_trailers_still_load_and_check(tmp_path) -> None:
    """Files written before XXH3 and before the footer (ABI 0, ext bit3, KCS v1 trailer,
    algorithm 1: CRC-32 chunks) load, and a flipped bit is still caught; an unknown
    algorithm is rejected."""
    state = random_state(SMALL, 300, 4096)
    blob = kv_bytes(state, b"abc")
    n = dsv4.payload_bytes(state)
    v1 = kv_craft.to_may_with_checksum(blob, 3, n, 1)
    header, _, back, trailer = _read_file(tmp_path, v1)
    assert trailer.checksums.algorithm == 1 and header.tokens == 300 and trailer.kind == "checksum (bit 3)"
    assert (header.abi, header.ext_flags) == (0, 8) and trailer.title is None
    assert_same_state(state, back)
    bad = bytearray(v1)
    bad[55 + 200_000] ^= 0x01
    with pytest.raises(KVFormatError, match=r"f\.kv: payload checksum mismatch in chunk 0"):
        _read_file(tmp_path, bytes(bad))
    with pytest.raises(KVFormatError, match=r"f\.kv: checksum trailer \(ext bit 3\) version 1 algorithm 3"):
        _read_file(tmp_path, kv_craft.to_may_with_checksum(blob, 3, n, 3, [0]))


def test_xxh3_trailer_checks_the_low_32_bits(tmp_path) -> None:
    xxhash = pytest.importorskip("xxhash")
    state = random_state(SMALL, 300, 4096)
    blob = kv_bytes(state, b"abc")
    p_end = 55 + dsv4.payload_bytes(state)
    digest = xxhash.xxh3_64_intdigest(blob[55:p_end])
    assert blob[p_end + 4] == 2 and struct.unpack_from("<I", blob, p_end + 24)[0] == digest & 0xFFFFFFFF
    n = dsv4.payload_bytes(state)
    old = kv_craft.to_may_with_checksum(blob, 3, n, 2)
    _read_file(tmp_path, old)
    wrong = [(xxhash.xxh3_64_intdigest(old[55:p_end]) >> 32) & 0xFFFFFFFF]
    with pytest.raises(KVFormatError, match=r"f\.kv: payload checksum mismatch in chunk 0"):
        _read_file(tmp_path, kv_craft.to_may_with_checksum(blob, 3, n, 2, wrong))


def test_loaded_tensors_are_own_mlx_arrays(tmp_path) -> None:
    """A load yields evaluated MLX float32 arrays, one buffer per tensor (no shared
    memory), so Session.restore's to_mlx copies nothing."""
    state = random_state(SMALL, 300, 4096)
    _, _, back, _ = _read_file(tmp_path, kv_bytes(state, b"abc"))
    arrays = [back.logits] + [a for ls in back.layers for _, a in ls.tensors()]
    assert all(isinstance(a, mx.array) and a.dtype == mx.float32 for a in arrays)
    views = [np.asarray(a) for a in arrays if a.size]
    assert not any(np.shares_memory(x, y) for i, x in enumerate(views) for y in views[i + 1:])
    conv = back.to_mlx()
    assert conv.layers[0].raw is back.layers[0].raw and conv.logits is back.logits


def test_footer_layout_and_ds4_view(tmp_path) -> None:
    state = random_state(SMALL, 300, 4096)
    text = b"abc"
    blob = kv_bytes(state, text)
    p_end = 55 + dsv4.payload_bytes(state)
    t = blob[p_end:]
    assert t[:3] == b"KCS" and t[3] == 2 and t[4] == checksum.DEFAULT_ALGORITHM
    chunk, n = struct.unpack_from("<II", t, 8)
    assert chunk == 16 << 20 and n == 1 and len(t) == 24 + 4 * n + 32 + 4 + 8
    assert struct.unpack_from("<I", t, 24)[0] == _chunk_sum(t[4], blob[55:p_end])
    assert struct.unpack_from("<I", t, 20)[0] == zlib.crc32(blob[48:55])  # length + text
    assert t[28:60] == bytes(32)  # no model fingerprint given
    assert struct.unpack_from("<I", t, 60)[0] == zlib.crc32(t[:60])
    assert struct.unpack_from("<I4s", t, len(t) - 8) == (len(t), b"KWBF")  # found from the file's end
    masked = bytearray(blob[:48])
    masked[12:16] = b"\0" * 4
    masked[32:40] = b"\0" * 8
    assert struct.unpack_from("<I", t, 16)[0] == zlib.crc32(bytes(masked))
    # what ds4 does: header, text, then exactly payload_bytes of payload; bits 0 and 3 clear so no trailer read
    assert blob[6] & 9 == 0
    assert_same_state(state, dsv4.read_payload(io.BytesIO(blob[55:]), dsv4.payload_bytes(state), SMALL, 4096))
    header, got_text, back, trailer = _read_file(tmp_path, blob)
    assert got_text == text and trailer.kind == "footer" and header.tokens == 300
    assert_same_state(state, back)
    # without a checksum: ds4's exact bytes, no trailer; with one: the same bytes, then the footer
    plain = kv_bytes(state, text, checksum=False)
    assert len(plain) == p_end and plain == blob[:p_end] and _read_file(tmp_path, plain)[3].kind == "none"


def test_payload_chunk_checksum_catches_a_flip_while_streaming(tmp_path) -> None:
    state = random_state(SMALL, 300, 4096)
    blob = bytearray(kv_bytes(state))
    blob[55 + 200_000] ^= 0x01  # inside layer tensors
    with pytest.raises(KVFormatError, match=r"f\.kv: payload checksum mismatch in chunk 0"):
        _read_file(tmp_path, bytes(blob))


def test_ds4_tool_map_trailer_is_recognised(tmp_path) -> None:
    state = random_state(SMALL, 300, 4096)
    blob = bytearray(kv_bytes(state, checksum=False))
    blob[6] |= ExtFlag.TOOL_MAP
    entry = struct.pack("<II", 4, 5) + b"call" + b"<dsml"
    blob += b"KTM\x01" + struct.pack("<I", 1) + entry
    _, _, back, trailer = _read_file(tmp_path, bytes(blob))
    assert trailer.kind == "tool-map" and trailer.tool_map_entries == 1
    assert back.n_tokens == 300


def test_infer_layout_and_breakdown_without_a_model(tmp_path) -> None:
    state = random_state(SMALL, 300, 4096)
    path = tmp_path / "a.kv"
    path.write_bytes(kv_bytes(state))
    h = header.read_header(path)
    with open(path, "rb") as f:
        summary = dsv4.read_payload_summary(f, h, str(path))
    lay, note = inspection.infer_layout(summary)
    assert lay == SMALL and "inferred" in note
    rows = inspection.payload_breakdown(lay, summary)
    assert sum(r["bytes"] for r in rows) == h.payload_bytes
    assert [r for r in rows if r["layer"] >= 0] == SMALL.layer_bytes_at(300)
    # a layout whose ratios are not ds4's schedule is read off the row counts
    odd = StateLayout(4, 128, 128, 1024, 64, (0, 128, 4, 0))
    path.write_bytes(kv_bytes(random_state(odd, 300, 4096)))
    with open(path, "rb") as f:
        lay2, note2 = inspection.infer_layout(dsv4.read_payload_summary(f, header.read_header(path), str(path)))
    assert lay2 == odd and "row counts" in note2
    big = StateLayout.ds4()
    assert inspection.infer_layout(dsv4.PayloadSummary(dsv4.PayloadHeader(dsv4.DSV4_MAGIC, 1, 32768, 2048, 2304, 128, 8194, 256,
                                                           43, 512, 128, 129280, 128), [0] * 43, [0] * 43))[0] == big
