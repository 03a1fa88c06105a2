"""Plots are built from telemetry frames and show the data they are given."""

import pandas as pd

from workbench import viz
from workbench.spec.statelayout import StateLayout
from workbench.telemetry import Recorder


def _records():
    rec = Recorder()
    rec.record("miss", request=0, reason="no-live-checkpoint")
    rec.record("save", request=0, reason="cold", tokens=512, bytes=3_000_000, save_s=0.01, disk_bytes=3_000_000,
               budget_bytes=10_000_000, path="/c/a.kv")
    rec.record("request", request=0, conversation="agent-0", source="none", prompt_tokens=700, cached_tokens=0,
               suffix_tokens=700, generated_tokens=8, lookup_s=0.001, prefill_s=1.0, ttft_s=1.01, full_prefill_s=1.0)
    rec.record("hit", request=1, source="disk", tokens=512, bytes=3_000_000, restore_s=0.005, path="/c/a.kv")
    rec.record("request", request=1, conversation="agent-0", source="disk", prompt_tokens=900, cached_tokens=512,
               suffix_tokens=388, generated_tokens=8, lookup_s=0.001, restore_s=0.005, prefill_s=0.5,
               ttft_s=0.506, full_prefill_s=1.3)
    rec.record("evict", request=1, tokens=512, bytes=3_000_000, path="/c/a.kv", disk_bytes=0, budget_bytes=10_000_000)
    return rec.frame()


def test_tokens_per_request_stacks_sources():
    fig = viz.tokens_per_request(_records())
    by_name = {t.name: list(t.y) for t in fig.data}
    assert by_name["cached (disk)"] == [0, 512]
    assert by_name["cached (live)"] == [0, 0]
    assert by_name["suffix prefill"] == [700, 388]


def test_ttft_and_timeline_and_disk():
    df = _records()
    fig = viz.ttft_breakdown(df)
    assert list(next(t for t in fig.data if t.name == "full prefill (estimate)").y) == [1000.0, 1300.0]
    by_name = {t.name: list(t.y) for t in fig.data}
    assert by_name["lookup"] == [1.0, 1.0] and by_name["restore"][1] == 5.0  # ms: every part has a bar
    assert fig.layout.yaxis.type == "log" and fig.layout.barmode == "group"
    assert all("ms" in t.hovertemplate for t in fig.data)
    timeline = viz.event_timeline(df)
    lanes = {t.name: len(t.x) for t in timeline.data}
    assert {"save: cold", "hit: disk", "miss (prefilled cold)", "evict"} <= set(lanes)
    assert lanes["miss (prefilled cold)"] == 1  # request 0 only: request 1 was a disk hit
    du = viz.disk_usage(df)
    assert list(du.data[0].y) == [3_000_000 / viz.MIB, 0.0]
    sr = viz.save_restore_vs_size(df, raw_write_bps=1e9, raw_read_bps=2e9)
    assert {t.name for t in sr.data} == {"save", "restore", "raw sequential write", "raw sequential read"}


def test_kv_bytes_plots_from_layout():
    lay = StateLayout.ds4()
    fig = viz.kv_bytes_vs_context(lay, [128, 1024])
    comp = next(t for t in fig.data if t.name == "compressed")
    assert list(comp.y) == [21 * 32 * 2048 / viz.MIB + 20 * 1 * 2048 / viz.MIB, (21 * 256 + 20 * 8) * 2048 / viz.MIB]
    bars = viz.kv_bytes_by_layer(lay.layer_bytes_at(256))
    assert {t.name for t in bars.data} == {"raw window", "compressed", "frontiers", "indexer"}


def test_prefix_tree_parents_are_longest_prefix():
    entries = pd.DataFrame({"name": ["a", "b", "c", "d"], "tokens": [10, 20, 30, 5],
                            "text": ["sys", "sys user1", "sys user1 more", "other"]})
    fig = viz.prefix_tree(entries)
    tree = dict(zip(fig.data[0].ids, fig.data[0].parents))
    assert tree == {"cache": "", "a": "cache", "b": "a", "c": "b", "d": "cache"}


def test_report_html_is_self_contained(tmp_path):
    out = viz.report_html([viz.tokens_per_request(_records()), viz.disk_usage(_records())], tmp_path / "r.html")
    text = out.read_text()
    assert text.count("plotly.js v") <= 2 and "Tokens per request" in text and len(text) > 1_000_000


def test_a_disk_hit_is_not_drawn_as_a_miss():
    rec = Recorder()
    rec.record("miss", request=0, source="live", reason="text-mismatch", tokens=10)
    rec.record("hit", request=0, source="disk", tokens=512, bytes=1.0, path="/c/a.kv")
    rec.record("request", request=0, source="disk", prompt_tokens=600, cached_tokens=512, suffix_tokens=88)
    lanes = {t.name for t in viz.event_timeline(rec.frame()).data}
    assert lanes == {"hit: disk"}


def test_disk_use_scales_to_the_data_and_names_a_far_budget():
    rec = Recorder()
    rec.record("save", request=0, reason="cold", disk_bytes=2 * viz.MIB, budget_bytes=4096 * viz.MIB)
    fig = viz.disk_usage(rec.frame())
    assert fig.layout.yaxis.range[1] < 3 and "4,096 MiB" in fig.layout.annotations[0].text
    rec.record("save", request=1, reason="cold", disk_bytes=3000 * viz.MIB, budget_bytes=4096 * viz.MIB)
    fig = viz.disk_usage(rec.frame())
    assert fig.layout.yaxis.range is None and fig.layout.shapes  # near: the budget line is drawn


def test_prefix_tree_colours_by_reason_and_marks_hits():
    entries = pd.DataFrame({"name": ["a", "b"], "tokens": [10, 20], "text": ["sys", "sys more"],
                            "reason": ["cold", "evict"], "hits": [2, 0]})
    t = viz.prefix_tree(entries).data[0]
    assert list(t.marker.colors)[1:] == [viz.REASON_COLORS["cold"], viz.REASON_COLORS["evict"]]
    assert "2 hits" in t.labels[1] and "evict" in t.labels[2]


def test_event_timeline_sizes_are_finite_without_token_counts():
    import math

    rec = Recorder()
    rec.record("miss", request=0, reason="no-live-checkpoint")
    rec.record("request", request=0, source="none")
    fig = viz.event_timeline(rec.frame())
    assert fig.data and all(math.isfinite(s) for t in fig.data for s in t.marker.size)
