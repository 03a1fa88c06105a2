"""The notebook widgets without a browser: construct each on the tiny model, press the
buttons (``Button.click()`` runs the handlers as a front end would), read the widget state.

Every failure must land in the widget's error box, never escape as an exception.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from gguf_helpers import small_file

from workbench import workloads as wl
from workbench.chat import BOS_TEXT
from workbench.engine import Engine
from workbench.gguf.reader import GGUFFile
from workbench.kv.header import SaveReason, read_header
from workbench.kv.policy import KVPolicy
from workbench.kv.store import KVStore
from workbench.sampling import top_tokens
from workbench.session import load
from workbench.telemetry import requests
from workbench.tokenizer import Tokenizer
from workbench.widgets import CacheDashboard, CheckpointManager, ModelLoader, PrefillPanel, dashboard

POLICY = KVPolicy(min_tokens=256, boundary_align=256, continued_interval=1024, budget_mb=256)
PROMPT = "Summarise the plot of a long novel about two lovers kept apart by a powerful nobleman. " * 6


@pytest.fixture(scope="module")
def tokenizer(tiny_gguf):
    with GGUFFile(tiny_gguf) as f:
        return Tokenizer.from_gguf(f)


@pytest.fixture(scope="module")
def session(tiny_gguf):
    return load(tiny_gguf, ctx=4096)


@pytest.fixture()
def fresh(session):
    session.reset()
    return session


def _rows(table_html: str) -> int:
    return table_html.count("<tr>") + table_html.count("<tr class=") - 1  # minus the header row


# ---- ModelLoader ------------------------------------------------------------------------------------
def test_model_loader_validates_loads_and_lists_tensors(tiny_gguf):
    loader = ModelLoader(str(tiny_gguf), ctx=2048)
    loaded = []
    loader.on_load(loaded.append)
    loader.validate_button.click()
    assert not loader.error.shown, loader.error.message
    assert "✓ valid" in loader.verdict.value
    assert "ds4 expects" in loader.verdict.value  # tiny widths differ from ds4's constants
    with GGUFFile(tiny_gguf) as f:
        n_tensors = len(f.tensors)
        biggest = max(f.tensors.values(), key=lambda t: t.nbytes)
    assert len(loader.tensors) == n_tensors and f"{n_tensors} of {n_tensors} tensors" in loader.tensor_table.value
    assert loader.session is None and loaded == []

    loader.load_button.click()
    assert not loader.error.shown, loader.error.message
    session = loader.session
    assert session is not None and loaded == [session] and session.ctx == 2048
    assert loader.progress.max == session.args.n_layer == loader.progress.value
    assert loader.progress.bar_style == "success"
    assert "loaded 6 layers" in loader.status.value
    assert "6 (compress ratios 0, 0, 4, 128, 4, 128" in loader.summary.value

    loader.tensor_sort.value = "MiB (largest first)"
    first = re.search(r"<tbody><tr><td>([^<]+)</td>", loader.tensor_table.value).group(1)
    assert first == biggest.name
    loader.tensor_filter.value = "blk.2."
    shown = re.findall(r"<tr><td>([^<]+)</td>", loader.tensor_table.value)
    assert shown and all(name.startswith("blk.2.") for name in shown)
    assert f"{len(shown)} of {n_tensors} tensors" in loader.tensor_table.value
    session.close()


def test_model_loader_shows_errors_in_its_box(tmp_path):
    missing = tmp_path / "nope.gguf"
    loader = ModelLoader(str(missing))
    loader.validate_button.click()
    assert loader.error.shown and str(missing) in loader.error.message and "cannot open" in loader.error.message
    assert "Traceback" not in loader.error.value  # a WorkbenchError shows as its own message
    loader.load_button.click()
    assert loader.error.shown and loader.session is None and loader.progress.bar_style == "danger"
    assert not any(b.disabled for b in (loader.validate_button, loader.load_button))

    other = tmp_path / "other.gguf"  # well-formed GGUF, not a ds4 model
    other.write_bytes(small_file())
    loader.path_text.value = str(other)
    loader.validate_button.click()
    assert not loader.error.shown and "✗ not a usable ds4 model" in loader.verdict.value
    assert "deepseek4.block_count" in loader.verdict.value
    assert "2 of 2 tensors" in loader.tensor_table.value
    loader.load_button.click()
    assert loader.error.shown and "not a usable ds4 model" in loader.error.message and loader.session is None


# ---- PrefillPanel --------------------------------------------------------------------------------------
def test_prefill_panel_live_progress_top_tokens_decode_reset(fresh, tokenizer):
    panel = PrefillPanel(fresh, tokenizer)
    panel.prompt.value = PROMPT
    panel.chunk.value = 64
    seen: list[int] = []
    panel.progress.observe(lambda c: seen.append(c["new"]), names="value")
    tokens = panel.prompt_tokens()
    panel.prefill_button.click()
    assert not panel.error.shown, panel.error.message
    n = len(tokens)
    assert fresh.n_tokens == n and fresh.tokens == tokens
    chunks = math.ceil(n / 64)
    assert panel.last_stats.tokens == n and panel.last_stats.chunks == chunks
    # the session's callback fires after every layer of every chunk and moves the bar each time
    assert seen == sorted(seen) and seen[-1] == n == panel.progress.max
    assert len(set(seen)) >= chunks * 2
    assert "tok/s" in panel.rate.value and f"{chunks} chunks of ≤64" in panel.rate.value
    want = top_tokens(fresh.logits, 8)
    assert panel.top_next == want and _rows(panel.top_table.value) == 8
    assert f"<td>{want[0][0]}</td>" in panel.top_table.value
    assert f"<b>{n:,}</b> / 4,096 tokens" in panel.tokens_label.value

    panel.n_decode.value = 5
    panel.decode_button.click()
    assert not panel.error.shown, panel.error.message
    gen = panel.generated
    assert 1 <= len(gen) <= 5
    fed = [t for t in gen if t != tokenizer.eos]
    assert fresh.tokens == tokens + fed  # EOS is returned but not fed
    assert tokenizer.text_token_mask()[gen].all()  # "whole characters only" is on by default
    assert f"generated {len(gen)} token" in panel.output.value

    panel.reset_button.click()
    assert fresh.n_tokens == 0 and panel.top_next == [] and "<b>0</b> / 4,096" in panel.tokens_label.value


def test_prefill_panel_workload_source_and_errors(fresh, tokenizer):
    panel = PrefillPanel(fresh, tokenizer)
    panel.decode_button.click()  # nothing prefilled yet
    assert panel.error.shown and "prefilled" in panel.error.message
    panel.source.value = "agent workload: first request"
    assert panel.prompt.value.startswith(BOS_TEXT) and "read_file" in panel.prompt.value
    panel.prefill_button.click()
    assert not panel.error.shown, panel.error.message
    assert fresh.tokens == tokenizer.encode_rendered(panel.prompt.value)
    before = fresh.tokens
    panel.source.value = "long-document workload: first request"
    panel.prompt.value = panel.prompt.value * 4  # more than the 4,096-token context holds
    panel.prefill_button.click()
    assert panel.error.shown and "context full" in panel.error.message
    assert fresh.tokens == before and panel.progress.bar_style == "danger"
    assert not panel.prefill_button.disabled
    panel.prompt.value = ""
    panel.prefill_button.click()
    assert panel.error.shown and "prompt is empty" in panel.error.message


# ---- CheckpointManager -----------------------------------------------------------------------------------
def test_checkpoint_manager_save_inspect_restore_delete(fresh, tokenizer, tmp_path):
    store = KVStore.from_policy(tmp_path / "kv", POLICY)
    manager = CheckpointManager(store, fresh, tokenizer)
    assert "(none)" in manager.table.value and len(manager.entries) == 0
    manager.save_button.click()
    assert manager.error.shown and "no tokens" in manager.error.message

    tokens = tokenizer.encode_rendered(BOS_TEXT + PROMPT)
    fresh.prefill(tokens)
    logits = np.array(fresh.logits)
    manager.reason.value = "cold"
    manager.save_button.click()
    assert not manager.error.shown, manager.error.message
    result = manager.last_save
    assert result.saved and result.path.exists()
    sha = result.path.stem
    assert list(manager.entries["name"]) == [sha[:12]] and manager.entries["tokens"][0] == len(tokens)
    assert manager.entries["reason"][0] == "cold"
    assert sha[:12] in manager.table.value and "cold" in manager.table.value
    assert manager.selected.value == sha

    manager.inspect_button.click()
    assert not manager.error.shown, manager.error.message
    header = read_header(result.path)
    assert sum(r["bytes"] for r in manager.inspected) == header.payload_bytes
    assert manager.inspect_box.layout.display is None
    n_layer = fresh.args.n_layer
    assert all(len(trace.x) <= n_layer for trace in manager.layer_plot.data)
    assert {x for trace in manager.layer_plot.data for x in trace.x} == {f"L{L} (r{r})" for L, r in
                                                                        enumerate(fresh.layout.ratios)}
    assert f"{len(tokens):,}" in manager.header_table.value and "cold" in manager.header_table.value

    fresh.reset()
    manager.restore_button.click()
    assert not manager.error.shown, manager.error.message
    assert fresh.tokens == tokens and np.array_equal(np.array(fresh.logits), logits)
    assert manager.entries["hits"][0] == 1

    manager.delete_button.click()  # not confirmed
    assert manager.error.shown and "confirm" in manager.error.message and result.path.exists()
    manager.confirm.value = True
    manager.delete_button.click()
    assert not manager.error.shown and not result.path.exists()
    assert len(manager.entries) == 0 and manager.confirm.value is False and manager.selected.options == ()


def test_checkpoint_manager_reports_corrupt_files(fresh, tokenizer, tmp_path):
    store = KVStore.from_policy(tmp_path / "kv", POLICY)
    fresh.prefill(tokenizer.encode_rendered(BOS_TEXT + PROMPT))
    result = store.save(fresh.snapshot(), tokenizer.decode(fresh.tokens), SaveReason.EVICT)
    raw = bytearray(result.path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # a bit flip inside the payload
    result.path.write_bytes(bytes(raw))
    (tmp_path / "kv" / ("0" * 40 + ".kv")).write_bytes(b"KVC\x01 truncated")
    manager = CheckpointManager(store, fresh, tokenizer)
    assert "other files" in manager.others.value and "0000000000" in manager.others.value
    before = fresh.tokens
    fresh.reset()
    manager.restore_button.click()
    assert manager.error.shown and result.path.name in manager.error.message
    assert "Traceback" not in manager.error.value and fresh.n_tokens == 0 and before
    manager.verify_button.click()
    assert not manager.error.shown, manager.error.message
    ok = {r.path.name: r.ok for r in manager.verify_reports}
    assert ok == {result.path.name: False, "0" * 40 + ".kv": False}
    assert "2 failed" in manager.verify_table.value and "ds4wb-bad" in manager.verify_table.value


# ---- CacheDashboard ---------------------------------------------------------------------------------------
def test_cache_dashboard_follows_the_engine_live(fresh, tokenizer, tmp_path):
    engine = Engine(fresh, KVStore.from_policy(tmp_path / "kv", POLICY), POLICY, tokenizer=tokenizer)
    dash = CacheDashboard(engine)
    assert "no requests yet" in dash.summary.value
    assert all(len(t.x) == 0 for t in dash.figures["tokens"].data)
    live_lengths = []

    def after_dashboard(row):  # runs after the dashboard's own listener
        n_req = int((engine.records["event"] == "request").sum())
        live_lengths.append((n_req, len(dash.figures["tokens"].data[0].x), len(dash.figures["ttft"].data[0].x)))

    engine.recorder.listeners.append(after_dashboard)
    outs = dash.run(wl.agent_session(seed=4, turns=4, file_chars=700, max_tokens=4, side_every=2))
    assert not dash.error.shown, dash.error.message
    assert [o.usage.source for o in outs] == ["none", "live", "none", "disk", "live"]
    assert live_lengths and all(a == b == c for a, b, c in live_lengths)  # redrawn on every row

    df = engine.records
    req = requests(df)
    n = len(req)
    for name in ("tokens", "ttft"):
        assert all(len(t.x) == n for t in dash.figures[name].data), name
    assert list(dash.figures["tokens"].data[2].y) == list(req["suffix_tokens"])
    events = df[~df["event"].isin(["request", "progress"])]
    cold = set(req.loc[req["source"] == "none", "request"])  # only their misses are drawn
    drawn = events[(events["event"] != "miss") | events["request"].isin(cold)]
    drawn = drawn[~((drawn["event"] == "miss") & drawn.duplicated(["event", "request"], keep="last"))]
    assert sum(len(t.x) for t in dash.figures["timeline"].data) == len(drawn)
    strip = dash.figures["strip"]
    assert all(len(t.y) == n for t in strip.data[:4])  # disk, live, prefilled, generated per request
    saved = (df["event"] == "save") & df["reason"].isin(["cold", "continued", "evict"]) & (df["request"] >= 0)
    assert len(strip.data[4].x) == int(saved.sum())  # a tick per checkpoint written while serving
    assert len(dash.figures["disk"].data[0].x) == int(df["disk_bytes"].notna().sum())
    assert dash.requests_bar.value == dash.requests_bar.max == n
    s = dash.stats
    assert s["requests"] == n and s["by_source"] == {"live": 2, "disk": 1, "none": 2}
    assert f"<b>{n}</b> requests" in dash.summary.value and "disk 20%" in dash.summary.value
    assert s["reused_ttft_s"] < s["reused_full_prefill_s"]
    n_files = len(engine.store.entries())
    assert f"<b>{n_files}</b> checkpoints (0 chained, {n_files} flat)" in dash.checkpoints.value

    # the Run workload control: multi-user, one turn each for three users
    dash.workload.value = "multi-user"
    dash.length.value = 1
    dash.run_button.click()
    assert not dash.error.shown, dash.error.message
    assert dash.stats["requests"] == n + 3
    assert all(len(t.x) == n + 3 for t in dash.figures["tokens"].data)
    assert dash.length.description == "turns"
    dash.workload.value = "long-document"
    assert dash.length.description == "chunks"

    dash.close()
    assert dash._on_row not in engine.recorder.listeners


def test_a_failing_redraw_shows_in_the_dashboard_not_in_the_engine(fresh, tokenizer, monkeypatch):
    engine = Engine(fresh, None, POLICY, tokenizer=tokenizer)
    dash = CacheDashboard(engine)

    def broken(df):
        raise ValueError("deliberately broken figure")

    monkeypatch.setitem(dashboard.PLOTS, "tokens", (broken, "request"))
    out = engine.complete(prompt="Hello there", max_tokens=2)
    assert out.usage.prompt_tokens > 0 and (engine.records["event"] == "request").sum() == 1
    assert dash.error.shown and "deliberately broken figure" in dash.error.message
    assert len(dash.figures["ttft"].data[0].x) == 1  # the other figures still drew
    dash.close()


# ---- issue 15: values refused not clamped, no stale lines, Stop ---------------------------------------------
def test_out_of_range_values_are_refused_with_the_range_not_clamped(fresh, tokenizer, tmp_path):
    panel = PrefillPanel(fresh, tokenizer)
    panel.prompt.value = "hi"
    panel.prefill_button.click()
    panel.n_decode.value = 100_000
    panel.decode_button.click()
    assert panel.error.shown and "tokens: 100,000 is outside 1..4,096" in panel.error.message
    assert panel.n_decode.value == 100_000 and panel.generated == []
    panel.n_decode.value, panel.temperature.value = 4, 9.0
    panel.decode_button.click()
    assert panel.error.shown and "temperature" in panel.error.message
    dash = CacheDashboard(Engine(fresh, KVStore.from_policy(tmp_path / "kv", POLICY), POLICY, tokenizer=tokenizer))
    dash.length.value = 1000
    dash.run_button.click()
    assert dash.error.shown and "turns: 1,000 is outside 1..64" in dash.error.message
    assert dash.length.value == 1000 and dash.stats["requests"] == 0


def test_an_error_clears_the_stale_result_lines(tiny_gguf, tmp_path, fresh, tokenizer):
    loader = ModelLoader(str(tiny_gguf))
    loader.validate_button.click()
    assert "✓ valid" in loader.verdict.value
    loader.path_text.value = str(tmp_path / "missing.gguf")
    loader.validate_button.click()
    assert loader.error.shown and loader.verdict.value == "" and loader.summary.value == ""
    assert loader.status.value == ""
    panel = PrefillPanel(fresh, tokenizer)
    panel.prompt.value = "hi"
    panel.prefill_button.click()
    panel.n_decode.value = 2
    panel.decode_button.click()
    assert "generated" in panel.output.value
    panel.n_decode.value = 0
    panel.decode_button.click()
    assert panel.error.shown and panel.output.value == ""


def test_stop_ends_a_prefill_and_a_decode(fresh, tokenizer):
    panel = PrefillPanel(fresh, tokenizer)
    panel.prompt.value = PROMPT
    panel.chunk.value = 64
    pressed = []

    def stop_once(change):  # as another thread would, while the bar moves
        if not pressed:
            pressed.append(change["new"])
            panel.stop()

    panel.progress.observe(stop_once, names="value")
    panel.prefill_button.click()
    assert panel.error.shown and "stopped" in panel.error.message
    assert fresh.n_tokens == 0 and not panel.prefill_button.disabled
    panel.progress.unobserve(stop_once, names="value")

    panel.prompt.value = "hi"
    panel.prefill_button.click()  # the next action starts afresh
    assert not panel.error.shown, panel.error.message
    panel.n_decode.value = 50
    panel.output.observe(lambda c: panel.stop() if "generated 2 tokens" in c["new"] else None, names="value")
    panel.decode_button.click()
    assert not panel.error.shown, panel.error.message
    assert len(panel.generated) == 2 and "stopped" in panel.output.value


STOP_SCRIPT = """
import sys, time
from workbench import mlxthreads
assert mlxthreads.share_default_stream()  # what the ds4-workbench kernel does at start
from workbench.session import load
from workbench.widgets import PrefillPanel
s = load(sys.argv[1], ctx=4096)
p = PrefillPanel(s)
p.background = True  # as in the kernel: long actions on the worker thread
p.prompt.value, p.chunk.value = sys.argv[2], 64
p.prefill_button.click()
while p.progress.value == 0 and not p.idle.is_set():  # the user watches the bar move, then clicks Stop
    time.sleep(0.005)
assert not p.stop_button.disabled
p.stop_button.click()
assert p.idle.wait(300)
assert p.error.shown and "stopped" in p.error.message and s.n_tokens == 0, p.error.message
p.prompt.value = "hi"
p.prefill_button.click()
assert p.idle.wait(300) and not p.error.shown, p.error.message
s.prefill([5, 6])  # the main thread continues the state the worker built
p.n_decode.value = 3
p.decode_button.click()
assert p.idle.wait(300) and not p.error.shown, p.error.message
print("OK", s.n_tokens)
"""


def test_stop_button_ends_a_prefill_running_on_the_worker_thread(tiny_gguf):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    res = subprocess.run([sys.executable, "-c", STOP_SCRIPT, str(tiny_gguf), PROMPT * 3], capture_output=True,
                         text=True, timeout=600, env=env)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]
