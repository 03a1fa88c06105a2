"""The benchmark harness at tiny sizes: figures and ratios, the FLOP count, each
benchmark's tables and figures, the report files and the CLI. Real runs are marked
``bench`` (``make bench`` / ``pytest -m bench``)."""

from __future__ import annotations

import json
import sys
import types
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from workbench.bench import BENCHMARKS, BenchContext, BenchError, Figure, charts, read_tables, run_suite
from workbench.bench.flops import dense_per_token, prefill_flops, visible_rows
from workbench.bench.kvio import CTX
from workbench.bench.lookup import SMALL_LAYOUT
from workbench.bench.report import fmt_value, read_figures
from workbench.cli import main
from workbench.kv.dsv4 import payload_bytes
from workbench.spec.statelayout import StateLayout
from workbench.state import random_state
from workbench.synth import resolve_preset


@pytest.fixture
def ctx(tmp_path: Path, tiny_gguf: Path) -> BenchContext:
    return BenchContext("quick", tiny_gguf, tmp_path / "work", tmp_path / "real")


def names(figures: list[Figure]) -> set[str]:
    return {f.name for f in figures}


# ---- figures and the report -------------------------------------------------------------------
def test_figure_ratio_and_how_to_read_it() -> None:
    t = Figure("b", "x", "n", 3.0, "s", "base", 2.0, False)
    r = Figure("b", "y", "n", 3.0, "GB/s", "base", 4.0, True)
    m = Figure("b", "z", "n", 12.0, "bytes", "file", 10.0, False)
    assert t.ratio == 1.5 and t.reads_as == "x baseline time"
    assert r.ratio == 0.75 and r.reads_as == "x baseline rate"
    assert m.ratio == 1.2 and m.reads_as == "x baseline size"
    assert Figure("b", "w", "n", 1.0, "s", "zero", 0.0, False).ratio == float("inf")
    assert t.row()["ratio"] == 1.5
    assert fmt_value(0.0123, "s") == "12.3 ms" and fmt_value(2.5, "s") == "2.50 s"
    assert fmt_value(3 * 2**30, "bytes") == "3.00 GiB" and fmt_value(1234.0, "tok/s") == "1,234 tok/s"


def test_modes_pick_sizes_and_reject_unknown(tmp_path: Path) -> None:
    q = BenchContext("quick", tmp_path / "m.gguf", tmp_path, tmp_path)
    s = replace(q, mode="standard")
    f = replace(q, mode="full")
    assert [c.pick(1, 2, 3) for c in (q, s, f)] == [1, 2, 3]
    assert f.pick(1, 2) == 2 and q.repeats < s.repeats
    with pytest.raises(BenchError, match="mode 'fast'"):
        BenchContext("fast", tmp_path, tmp_path, tmp_path)


# ---- FLOPs ----------------------------------------------------------------------------------------
def test_flops_by_hand_for_the_tiny_config() -> None:
    a = resolve_preset("tiny").args  # n_embd 256, 4 heads x 128, q_lora 128, o_lora 64 x 2 groups, 8x256 experts
    dense = dense_per_token(a, 2)  # a ratio-4 layer
    assert dense["hyper_connections"] == 2 * 2 * (4 * 256) * 24
    assert dense["attention_projections"] == 2 * (256 * 128 + 128 * 512 + 256 * 128 + 512 * 64 + 2 * 64 * 256)
    assert dense["compressors"] == 2 * 2 * 256 * 2 * 128 + 2 * 2 * 256 * 2 * 128
    assert dense["indexer"] == 2 * (128 * 4 * 128 + 256 * 4)
    assert dense["moe"] == 2 * 256 * 8 + (2 + 1) * 3 * 2 * 256 * 256
    assert dense_per_token(a, 0)["compressors"] == 0 and dense_per_token(a, 3)["indexer"] == 0
    assert dense_per_token(a, 3)["compressors"] == 2 * 2 * 256 * 128

    pos = np.array([0, 3, 127, 128, 511, 1000])
    att, comp = visible_rows(a, 0, pos)  # dense layer: the raw window only
    assert att.tolist() == [1, 4, 128, 128, 128, 128] and comp.tolist() == [0] * 6
    att, comp = visible_rows(a, 2, pos)  # ratio 4: compressed rows capped at top-k (8)
    assert comp.tolist() == [0, 1, 32, 32, 128, 250] and att.tolist() == [1, 5, 136, 136, 136, 136]
    att, _ = visible_rows(a, 3, pos)  # ratio 128
    assert att.tolist() == [1, 4, 129, 129, 132, 135]

    one = prefill_flops(a, 0, 1)
    assert one["attention"] == 6 * 4 * 4 * 128 * 1  # every layer sees one raw row
    assert one["output_head"] == 2 * 1024 * 4 + 2 * 256 * 129280
    assert prefill_flops(a, 0, 0)["output_head"] == 0


def test_flops_are_additive_over_chunks_and_grow_with_context() -> None:
    a = resolve_preset("tiny").args
    whole = prefill_flops(a, 0, 3000)
    parts = [prefill_flops(a, s, n) for s, n in ((0, 1000), (1000, 2000))]
    for k in whole:
        if k != "output_head":
            assert whole[k] == pytest.approx(sum(p[k] for p in parts))
    early, late = prefill_flops(a, 0, 64), prefill_flops(a, 10_000, 64)
    assert late["attention"] > early["attention"] and late["indexer"] > early["indexer"]
    assert late["moe"] == early["moe"]


# ---- KV I/O ---------------------------------------------------------------------------------------
def test_random_state_has_ds4s_exact_payload_size() -> None:
    state = random_state(StateLayout.ds4(), 2048, CTX)
    assert state.problems() == []
    assert payload_bytes(state) == 23_995_788 + 13_764 * 2048 == 52_184_460


def test_kv_io_tables_and_figures(ctx: BenchContext) -> None:
    from workbench.bench import kvio

    res = kvio.run(ctx, layout=SMALL_LAYOUT, sizes=[300], table_sizes=[300, 600])
    want = {"kv.save[300]", "kv.save.durable[300]", "kv.restore[300]", "kv.save.checksum[300]",
            "kv.restore.checksum[300]", "kv.save.staged[300]", "kv.save.staged[600]"}
    assert want <= names(res.figures)
    has_peer = kvio._mlx_lm() is not None
    assert ("kv.save.vs_mlx_lm[300]" in names(res.figures)) == has_peer
    assert bool(res.notes) == (not has_peer)
    (row,) = res.tables["kv_io"]
    state = random_state(SMALL_LAYOUT, 300, CTX)
    assert row["payload_bytes"] == payload_bytes(state)
    for key in ("save_s", "raw_write_s", "save_durable_s", "raw_write_fsync_s", "restore_s", "raw_read_s"):
        assert row[key] > 0
    staged = res.tables["kv_io_staged"]
    assert [r["tokens"] for r in staged] == [300, 600]
    for r in staged:  # the two phases split the real staged save
        assert r["staged_serialize_ms"] + r["staged_copy_ms"] == pytest.approx(r["staged_total_ms"])
        assert r["delta_ms"] == pytest.approx(r["staged_total_ms"] - r["direct_ms"])
    assert all(f.baseline > 0 and f.unit == "s" and not f.higher_is_better for f in res.figures)
    assert not list((ctx.work_dir / "kv_io" / "on").glob("*.kv"))  # every save was cleaned up


def test_restore_returns_the_saved_state_in_mlx(tmp_path: Path) -> None:
    from workbench.bench.kvio import restore
    from workbench.kv.header import SaveReason
    from workbench.kv.store import KVStore

    state = random_state(SMALL_LAYOUT, 40, CTX, seed=3)
    store = KVStore(tmp_path, budget_mb=None, min_tokens=1, maintain=False)
    path = store.save(state, "abc", SaveReason.COLD).path
    back = restore(store, path, SMALL_LAYOUT)
    assert back.tokens == state.tokens and isinstance(back.layers[0].raw, mx.array)
    assert np.array_equal(np.array(back.layers[1].raw), state.layers[1].raw)


# ---- lookup, dequant, loading, tokenizer, prefill, TTFT -----------------------------------------
def test_lookup_finds_the_longest_prefix(ctx: BenchContext) -> None:
    from workbench.bench import lookup

    res = lookup.run(ctx, n_files=20, max_text=4096)
    assert names(res.figures) == {"lookup.cold", "lookup.warm"}
    (row,) = res.tables["lookup"]
    assert row["files"] == 20 and row["cold_s"] > 0 and row["warm_s"] > 0


def test_dequant_inputs_are_valid_and_every_type_is_measured(ctx: BenchContext) -> None:
    import gguf.quants as ref

    from workbench.bench import dequant
    from workbench.gguf.quants import dequantize

    for t in dequant.TYPES:
        raw = dequant.random_blocks(t, 2 * dequant.ROW, seed=5)
        want = ref.dequantize(raw, ref.GGMLQuantizationType(t))
        assert np.isfinite(want).all()
        assert np.array_equal(np.array(dequantize(raw, t)), want)
    res = dequant.run(ctx, n_elems=4 * dequant.ROW)
    assert len(res.tables["dequant"]) == len(dequant.TYPES) and len(res.figures) == 2 * len(dequant.TYPES)
    assert all(f.unit == "GB/s" and f.higher_is_better for f in res.figures)


def test_gguf_load_figures(ctx: BenchContext) -> None:
    from workbench.bench import loading

    res = loading.run(ctx, n_q8=1)
    assert {"gguf.session_load.tiny", "gguf.q8_0_load.vs_read", "gguf.q8_0_load.vs_mx_load"} <= names(res.figures)
    q8 = ctx.work_dir / "gguf_load" / "q8_0.gguf"
    ours = {}
    from workbench.gguf.reader import GGUFFile
    from workbench.model.weights import Tensors

    from workbench.gguf.quants import QTensor, q8_0_to_affine

    with GGUFFile(q8) as f:
        ours = Tensors(f).matrix("blk.0.weight")
        wq = q8_0_to_affine(ours)[0] if isinstance(ours, QTensor) else ours.wq  # mapped, or converted
        theirs = mx.load(str(q8))  # the peer really reads the same weights
        assert np.array_equal(np.array(wq), np.array(theirs["blk.0.weight"]))


def test_tokenizer_matches_the_reference_on_the_bench_text(ctx: BenchContext) -> None:
    from workbench.bench import tokenization

    res = tokenization.run(ctx, max_bytes=3000)
    assert names(res.figures) == {"tokenizer.encode", "tokenizer.encode_rendered"}
    assert res.notes == []  # ids equal tokenizer.json's


def test_prefill_figures_and_consistent_rates(ctx: BenchContext) -> None:
    from workbench.bench import prefill

    res = prefill.run(ctx, n_tokens=32, chunks=(16, 32))
    got = names(res.figures)
    assert {"prefill.tiny.c16.gflops", "prefill.tiny.c32.gflops"} <= got
    for row in res.tables["prefill"]:
        assert row["gflops"] * row["seconds"] == pytest.approx(row["gflop"])
        assert row["matmul_gflops"] > 0
    try:
        import nano_deepseek_v4  # noqa: F401
    except ImportError:
        assert any("peer skipped" in n for n in res.notes)
    else:
        assert "prefill.tiny.c16.vs_nano" in got


def test_nano_peer_config_equals_the_model() -> None:
    pytest.importorskip("nano_deepseek_v4")
    from workbench.bench.peer import PeerUnavailable, nano_config

    a = resolve_preset("tiny").args
    c = nano_config(a)
    assert (c.hidden_size, c.num_hidden_layers, c.head_dim, c.qk_rope_head_dim, c.sliding_window) == (256, 6, 128, 64, 128)
    assert c.compress_ratios == [0, 0, 4, 128, 4, 128] and c.index_topk == 8 and c.num_nextn_predict_layers == 0
    with pytest.raises(PeerUnavailable, match="SwiGLU"):
        nano_config(replace(a, swiglu_clamp=(10.0, 9.0, 10.0, 10.0, 10.0, 10.0)))


def test_ttft_restore_path(ctx: BenchContext) -> None:
    from workbench.bench import ttft

    res = ttft.run(ctx, prefixes=[64, 128], suffixes=[8, 16])
    rows = res.tables["ttft"]
    assert [(r["prefix"], r["suffix"]) for r in rows] == [(64, 8), (64, 16), (128, 8), (128, 16)]
    assert "ttft.restore[P=128,S=16]" in names(res.figures)
    assert {"ttft.prefix_scaling[S=8]", "ttft.prefix_scaling[S=16]"} <= names(res.figures)
    for r in rows:
        parts = r["lookup_s"] + r["load_s"] + r["restore_s"] + r["suffix_prefill_s"]
        assert r["ttft_restore_s"] == pytest.approx(parts)


# ---- the suite, the files, the CLI ---------------------------------------------------------------
def test_cli_json_and_files(tmp_path: Path, tiny_gguf: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    rc = main(["bench", "--quick", "--only", "dequant", "--json", "--out", str(out), "--model", str(tiny_gguf)])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["mode"] == "quick" and doc["failed"] == {}
    assert {"cpu", "cores", "ram_gib", "mlx", "blas"} <= set(doc["machine"])
    from workbench.bench.dequant import TYPES

    assert len(doc["figures"]) == 2 * len(TYPES)
    for f in doc["figures"]:
        assert f["ratio"] == pytest.approx(f["value"] / f["baseline"])
    for name in ("dequant.csv", "figures.csv", "summary.md", "dequant.html", "summary.html"):
        assert (out / name).is_file(), name
    md = (out / "summary.md").read_text()
    assert doc["machine"]["cpu"] in md and "--only dequant" in md
    assert md.count("| dequant | dequant.") == 2 * len(TYPES)
    # what the notebook reads back: the tables, their charts and the figures
    tables = read_tables("dequant", out)
    assert list(tables) == ["dequant"] and len(tables["dequant"]) == len(TYPES)
    assert len(charts("dequant", tables)) == 1
    back = read_figures(out / "figures.csv")
    assert [f.row()["ratio"] for f in back] == pytest.approx([f["ratio"] for f in doc["figures"]])
    assert read_tables("ttft", out) == {}


def test_unknown_and_failing_benchmarks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(BenchError, match="unknown benchmark nope"):
        run_suite("quick", ["nope"], out_dir=tmp_path)
    with pytest.raises(SystemExit):
        main(["bench", "--only", "nope"])
    boom = types.ModuleType("boom_bench")

    def run(ctx: BenchContext) -> None:
        raise RuntimeError("disk on fire")

    boom.run = run
    monkeypatch.setitem(sys.modules, "boom_bench", boom)
    monkeypatch.setitem(BENCHMARKS, "boom", "boom_bench")
    suite = run_suite("quick", ["boom"], out_dir=tmp_path / "o")
    assert suite.failed == {"boom": "RuntimeError: disk on fire"}
    assert "FAILED: RuntimeError: disk on fire" in (tmp_path / "o" / "summary.md").read_text()


@pytest.mark.bench
def test_quick_suite_runs_every_benchmark(tmp_path: Path) -> None:
    model = Path(__file__).resolve().parents[1] / "data" / "tiny.gguf"
    suite = run_suite("quick", out_dir=tmp_path, model=model)
    assert suite.failed == {}
    assert {r.name for r in suite.results} == set(BENCHMARKS)
    assert all(r.figures for r in suite.results)


def test_experts_native_vs_dequantized_figures(ctx: BenchContext) -> None:
    from workbench.bench import experts

    res = experts.run(ctx, n_ff=256, n_embd=512)
    rows = res.tables["experts"]
    assert {r["type"] for r in rows} == {"MXFP4", "Q8_0", "Q4_K"} and {r["rows_per_expert"] for r in rows} == {1, 4}
    assert all(0 <= r["max_rel_diff"] < 1e-5 for r in rows)  # the same weights: accumulation order only
    assert len(res.figures) == len(rows) and all(f.unit == "s" and not f.higher_is_better for f in res.figures)
    assert sum("native faster up to" in n for n in res.notes) == 3 and any("--full" in n for n in res.notes)
    assert experts.charts(res.tables)


def test_token_bytes_counts_used_experts_and_one_embedding_row(tiny_gguf: Path) -> None:
    from workbench.bench.experts import token_bytes
    from workbench.gguf.reader import GGUFFile

    with GGUFFile(tiny_gguf) as f:
        total = sum(t.nbytes for t in f.tensors.values())
        embd = f.tensors["token_embd.weight"]
        exps = sum(t.nbytes for n, t in f.tensors.items() if "_exps." in n)
    # tiny: 8 experts, 2 used
    assert token_bytes(tiny_gguf) == total - embd.nbytes + embd.nbytes // embd.shape[0] - exps + exps * 2 // 8


def test_long_context_decode_figures(ctx: BenchContext) -> None:
    from workbench.bench import longctx

    args = longctx.bench_args()
    layers = (2, 3)
    assert [args.ratio(L) for L in layers] == [4, 128] and args.head_dim == 512 and args.idx_topk == 512
    # the attention work: top-k capped on the ratio-4 layer, the indexer scores every visible row past top-k
    at = lambda p: longctx.attention_flops(args, layers, p)  # noqa: E731
    row = 4 * args.n_head * args.head_dim
    assert at(100) == row * ((101 + 25) + (101 + 0))  # raw + compressed rows, per layer
    assert at(65535) == row * ((128 + 512) + (128 + 512)) + 2 * args.idx_heads * args.idx_dim * 16384
    res = longctx.run(ctx, contexts=(256, 2048), n_tokens=2)
    assert [r["context"] for r in res.tables["long_ctx"]] == [256, 2048]
    assert names(res.figures) == {"decode.long_ctx[256]", "decode.long_ctx[2048]", "decode.long_ctx.growth"}
    assert all(f.value > 0 and f.baseline > 0 for f in res.figures)
    assert longctx.charts(res.tables)


def test_copier_copies_whole_buffers_by_one_and_by_several_threads() -> None:
    from workbench.bench.core import Copier

    src = np.arange(1001, dtype=np.float32)  # not a multiple of the thread count
    with Copier(3) as copier:
        for copy in (copier.one, copier.split):
            dst = np.zeros_like(src)
            copy(dst, src)
            assert np.array_equal(dst, src)
        assert copier.best_seconds(np.zeros_like(src), src, 2) > 0
