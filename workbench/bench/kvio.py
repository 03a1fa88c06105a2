"""KV checkpoint save and restore against the physical limits and a peer format.

Random session states at ds4-server's real widths (``StateLayout.ds4()``: 43 layers,
head_dim 512, payload 23,995,788 + 13,764·T bytes) are saved and restored with
``KVStore`` and compared, each time with the same number of bytes, to:

* a raw sequential write of the file's bytes (8 MiB ``os.write`` calls) into the same
  directory, page cache only; with ``durable=True`` to the same write plus ``fsync`` of
  the file and the directory;
* a raw sequential read of the saved file into a buffer allocated beforehand (page cache
  warm: the copy out of the page cache is the floor), for a restore = ``KVStore.load``
  (every check, CRCs) + ``SessionState.to_mlx`` (what ``Session.restore`` does); the
  table also has ``load_only_s`` (``KVStore.load`` alone, NumPy state);
* the store with the checksum footer off (checksum on vs off);
* mlx-lm's ``save_prompt_cache`` / ``load_prompt_cache`` (safetensors) holding the same
  tensors (one ``ArraysCache`` per layer plus one for the logits), when mlx-lm is
  installed.

Direct vs staged save (ds4 PR #353's table): ``KVStore.save(writer=write_staged)``
(``workbench.bench.staged``) serializes the payload to a file under the system temp dir,
then copies it in; the two phases are timed inside the real save from its progress
callback (the last per-layer call ends the serialization; everything after it is the
copy and the rename).
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from workbench.bench.core import BenchContext, BenchResult, Figure, best, best_pair, fmt_tokens, mib, timed
from workbench.bench.staged import write_staged
from workbench.kv.dsv4 import payload_bytes
from workbench.kv.header import SaveReason
from workbench.kv.kvfile import kv_file_bytes
from workbench.kv.store import KVStore
from workbench.spec.statelayout import StateLayout
from workbench.state import SessionState, random_state

NAME = "kv_io"
IO_CHUNK = 8 << 20  # bytes per raw write/read call
CTX = 131072  # context every test state is saved at (ds4 accepts T < ctx)


def text_for(n_tokens: int) -> bytes:
    """A rendered-text key of about 3 bytes per token (ds4's observed average)."""
    return (b"kv-bench " * (n_tokens // 3 + 1))[: 3 * n_tokens]


def raw_write(path: Path, nbytes: int, durable: bool = False) -> None:
    """Write ``nbytes`` to ``path`` sequentially in 8 MiB calls (fsync file and directory
    when ``durable``)."""
    buf = memoryview(_pattern())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        left = nbytes
        while left:
            left -= os.write(fd, buf[: min(left, IO_CHUNK)])
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    if durable:
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


@functools.cache
def _pattern() -> bytes:
    """One 8 MiB buffer of random bytes, made once."""
    return np.random.default_rng(1).integers(0, 256, IO_CHUNK, dtype=np.uint8).tobytes()


def raw_read(path: Path, into: np.ndarray) -> None:
    """Read the whole file sequentially (8 MiB calls) into ``into`` (uint8, at least the
    file's size, allocated and touched beforehand so no page fault is timed)."""
    size = os.stat(path).st_size
    view = memoryview(into)
    with open(path, "rb", buffering=0) as f:
        pos = 0
        while pos < size:
            n = f.readinto(view[pos : min(size, pos + IO_CHUNK)])
            if not n:
                break
            pos += n


def restore(store: KVStore, path: Path, layout: StateLayout) -> SessionState:
    """Load a checkpoint (all checks) and convert it to MLX, as ``Session.restore`` does."""
    state, _ = store.load(path, layout, CTX)
    mlx_state = state.to_mlx()
    mx.eval(mlx_state.logits, *(a for ls in mlx_state.layers for _, a in ls.tensors()))
    return mlx_state


def staged_phases(store: KVStore, state: SessionState, text: bytes) -> tuple[float, float, float]:
    """One real staged save: (serialize s, copy s, total s), split at the progress call
    that reports the whole payload written."""
    total_payload = payload_bytes(state)
    marks: list[float] = []

    def progress(done: int, total: int) -> None:
        if done == total_payload:
            marks.append(time.perf_counter())

    t0 = time.perf_counter()
    res = store.save(state, text, SaveReason.COLD, progress=progress, writer=write_staged)
    t1 = time.perf_counter()
    os.unlink(res.path)
    serialize = marks[-1] - t0
    return serialize, t1 - marks[-1], t1 - t0


def _mlx_lm() -> Any | None:
    try:
        from mlx_lm.models import cache as mlx_cache
    except ImportError:
        return None
    return mlx_cache


def _mlx_lm_cache(mlx_cache: Any, state: SessionState) -> list[Any]:
    """The state's tensors as mlx-lm caches: one ArraysCache per layer, one for the logits."""
    caches = []
    for ls in state.layers:
        tensors = [a for _, a in ls.tensors()]
        c = mlx_cache.ArraysCache(len(tensors))
        for i, a in enumerate(tensors):
            c[i] = a
        caches.append(c)
    head = mlx_cache.ArraysCache(1)
    head[0] = state.logits
    return caches + [head]


def measure_size(ctx: BenchContext, layout: StateLayout, n_tokens: int, work: Path,
                 result: BenchResult, peer: Any | None) -> None:
    """Every save/restore figure at one size, appended to ``result``."""
    reps = ctx.repeats
    tok = fmt_tokens(n_tokens)
    ctx.step(f"kv_io: building a random {tok}-token state")
    state = random_state(layout, n_tokens, CTX).to_mlx()  # a live session's state is MLX
    text = text_for(n_tokens)
    store = KVStore(work / "on", budget_mb=None, min_tokens=1, maintain=False)
    store_off = KVStore(work / "off", budget_mb=None, min_tokens=1, maintain=False, checksum=False)
    raw_path = work / "raw.bin"
    file_bytes = kv_file_bytes(state, len(text), checksum=True)
    saved: list[Path] = []

    def save(s: KVStore, durable: bool = False) -> Path:
        saved.append(s.save(state, text, SaveReason.COLD, durable=durable).path)
        return saved[-1]

    def drop() -> None:
        for p in (*saved, raw_path):
            p.unlink(missing_ok=True)
        saved.clear()

    m: dict[str, float] = {"tokens": n_tokens, "payload_bytes": payload_bytes(state), "file_bytes": file_bytes}
    ctx.step(f"kv_io: save vs raw write, {tok} tokens")
    m["save_s"], m["raw_write_s"] = best_pair(lambda: save(store), lambda: raw_write(raw_path, file_bytes), reps, drop)
    m["save_durable_s"], m["raw_write_fsync_s"] = best_pair(
        lambda: save(store, durable=True), lambda: raw_write(raw_path, file_bytes, durable=True), reps, drop)
    m["save_nochecksum_s"] = best(lambda: save(store_off), reps, drop)
    ctx.step(f"kv_io: restore vs raw read, {tok} tokens")
    on, off = save(store), save(store_off)
    buf = np.ones(file_bytes, dtype=np.uint8)
    m["restore_s"], m["raw_read_s"] = best_pair(lambda: restore(store, on, layout), lambda: raw_read(on, buf), reps)
    m["load_only_s"] = best(lambda: store.load(on, layout, CTX), reps)
    del buf
    m["restore_nochecksum_s"] = best(lambda: restore(store_off, off, layout), reps)
    drop()
    if peer is not None:
        ctx.step(f"kv_io: mlx-lm prompt cache, {tok} tokens")
        caches = _mlx_lm_cache(peer, state)
        st_path = work / "prompt_cache.safetensors"

        def peer_load() -> None:
            mx.eval([a for c in peer.load_prompt_cache(str(st_path)) for a in c.cache])

        m["mlx_lm_save_s"] = best(lambda: peer.save_prompt_cache(str(st_path), caches), reps)
        m["mlx_lm_bytes"] = os.stat(st_path).st_size
        m["mlx_lm_load_s"] = best(peer_load, reps)
        st_path.unlink()
    result.add_row(m)

    sizes = f"{tok} tokens, {mib(file_bytes):,.1f} MiB file"

    def fig(name: str, value: str, baseline_name: str, baseline: str, note: str = "") -> Figure:
        return Figure(NAME, f"{name}[{n_tokens}]", sizes, m[value], "s", baseline_name, m[baseline], False, note)

    result.figures += [
        fig("kv.save", "save_s", "raw sequential write, same bytes (page cache)", "raw_write_s",
            "direct mode, checksum on"),
        fig("kv.save.durable", "save_durable_s", "raw write + fsync of file and directory", "raw_write_fsync_s"),
        fig("kv.restore", "restore_s", "raw sequential read of the same file (page cache)", "raw_read_s",
            "KVStore.load (every check, CRCs) + to_mlx"),
        fig("kv.save.checksum", "save_s", "the same save, checksum off", "save_nochecksum_s"),
        fig("kv.restore.checksum", "restore_s", "the same restore, checksum off", "restore_nochecksum_s"),
    ]
    if peer is not None:
        result.figures += [
            fig("kv.save.vs_mlx_lm", "save_s", "mlx-lm save_prompt_cache (safetensors), same tensors",
                "mlx_lm_save_s"),
            fig("kv.restore.vs_mlx_lm", "restore_s", "mlx-lm load_prompt_cache + eval, same tensors",
                "mlx_lm_load_s"),
        ]


def staged_table(ctx: BenchContext, layout: StateLayout, token_counts: list[int], work: Path,
                 result: BenchResult) -> None:
    """ds4 PR #353's table (tokens, MiB, staged serialize/copy/total ms, direct ms, delta)
    as the table ``kv_io_staged``, and one figure per size: staged over direct."""
    store = KVStore(work / "staged", budget_mb=None, min_tokens=1, maintain=False)
    for T in token_counts:
        ctx.step(f"kv_io: staged vs direct save, {fmt_tokens(T)} tokens")
        state = random_state(layout, T, CTX).to_mlx()
        text = text_for(T)

        def direct() -> None:
            os.unlink(store.save(state, text, SaveReason.COLD).path)

        reps = ctx.repeats if T <= 40960 else 2
        staged = []
        direct_s = float("inf")
        for _ in range(reps):  # interleaved, best of each
            staged.append(staged_phases(store, state, text))
            direct_s = min(direct_s, timed(direct))
        ser, cp, tot = min(staged, key=lambda p: p[2])
        size = payload_bytes(state)
        result.add_row({"tokens": T, "MiB": round(mib(size), 1), "staged_serialize_ms": ser * 1e3,
                        "staged_copy_ms": cp * 1e3, "staged_total_ms": tot * 1e3, "direct_ms": direct_s * 1e3,
                        "delta_ms": (tot - direct_s) * 1e3, "delta_pct": (tot - direct_s) / direct_s * 100},
                       f"{NAME}_staged")
        result.figures.append(Figure(NAME, f"kv.save.staged[{T}]", f"{fmt_tokens(T)} tokens, {mib(size):,.1f} MiB payload",
                                     tot, "s", "direct save (PR #353)", direct_s, False,
                                     f"staged = serialize {ser * 1e3:.0f} ms + copy {cp * 1e3:.0f} ms"))
        del state


def run(ctx: BenchContext, layout: StateLayout | None = None, sizes: list[int] | None = None,
        table_sizes: list[int] | None = None) -> BenchResult:
    """Run the benchmark (``layout``/``sizes``/``table_sizes`` override the real widths and
    the mode's token counts, for tests)."""
    layout = layout or StateLayout.ds4()
    sizes = sizes or ctx.pick([20480], [20480, 126976])
    table_sizes = table_sizes or ctx.pick([20480], [20480, 40960, 81920, 126976])
    result = BenchResult(NAME)
    work = ctx.work_dir / NAME
    peer = _mlx_lm()
    if peer is None:
        result.notes.append("mlx-lm is not installed: the save_prompt_cache/load_prompt_cache figures are skipped "
                            "(pip install 'ds4-workbench[bench]')")
    for T in sizes:
        measure_size(ctx, layout, T, work, result, peer)
    staged_table(ctx, layout, table_sizes, work, result)
    result.charts = charts(result.tables)
    return result


def charts(tables: dict[str, list[dict]]) -> list[Any]:
    """The benchmark's plotly figures from its tables (as run, or read back from the CSVs)."""
    import plotly.graph_objects as go

    rows, table = tables[NAME], tables[f"{NAME}_staged"]
    fig = go.Figure()
    labels = [f"{r['tokens']:,} tok" for r in rows]
    for key, name in (("raw_write_s", "raw write"), ("save_s", "KV save"), ("raw_write_fsync_s", "raw write+fsync"),
                      ("save_durable_s", "KV save durable"), ("mlx_lm_save_s", "mlx-lm save"),
                      ("raw_read_s", "raw read"), ("restore_s", "KV restore"), ("mlx_lm_load_s", "mlx-lm load")):
        if all(key in r for r in rows):
            fig.add_bar(x=labels, y=[r[key] * 1e3 for r in rows], name=name)
    fig.update_layout(title="KV save/restore vs raw I/O of the same bytes", yaxis_title="ms", barmode="group",
                      template="plotly_white")
    tab = go.Figure()
    x = [f"{r['tokens']:,} tok ({r['MiB']:,.0f} MiB)" for r in table]
    tab.add_bar(x=x, y=[r["staged_serialize_ms"] for r in table], name="staged: serialize", offsetgroup="staged")
    tab.add_bar(x=x, y=[r["staged_copy_ms"] for r in table], name="staged: copy", offsetgroup="staged",
                base=[r["staged_serialize_ms"] for r in table])
    tab.add_bar(x=x, y=[r["direct_ms"] for r in table], name="direct", offsetgroup="direct")
    tab.update_layout(title="Direct vs staged save (ds4 PR #353)", yaxis_title="ms", template="plotly_white")
    return [fig, tab]
