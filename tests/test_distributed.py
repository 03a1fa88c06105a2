"""Pipeline-parallel sessions over mx.distributed and sharded (DSVL) KV checkpoints.

In-process tests cover the shard format, the .kv <-> shards conversion and the plain
session a process running alone gets. The launch tests start 2 ranks on 127.0.0.1 with
the ring backend (each rank exactly as ``mlx.launch`` starts it: MLX_RANK + an MLX_HOSTFILE
ring of free ports), and one test goes through ``mlx.launch`` itself with
``workbench run --kv-dir --json``. They skip when the ring backend cannot start here.

Tolerance for "same logits as one process": none, bit for bit. Each rank runs the same
float32 operations on the same inputs as the single process (the streams, logits and
gathered KV cross ranks as raw float32 bits). This holds when every rank uses the BLAS
threading of the reference process: OpenBLAS with 1 thread instead of 2 changes float32
summation order (measured: up to 4.4e-5 of the largest logit on tiny).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import zlib
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from workbench import distributed
from workbench.kv import shards as S
from workbench.gguf.reader import GGUFFile
from workbench.kv import dsvl
from workbench.kv.dsv4 import comp_cap, raw_cap
from workbench.kv.header import SaveReason
from workbench.kv.kvfile import read_kv_file, write_kv_file
from workbench.session import Session, load
from workbench.spec.args import ModelArgs
from workbench.spec.statelayout import LAYER_FIELDS
from workbench.stage import LocalStage

CTX = 1024
CHUNK = 64
PROMPT = [(i * 7919) % 120000 + 100 for i in range(160)]  # 3 prefill chunks; > n_swa, one ratio-128 row
N_DECODE = 4
LAUNCH_TIMEOUT = 90
REPO = Path(__file__).resolve().parents[1]


def assert_states_equal(a, b) -> None:
    """Same tokens, logits and every KV tensor, bit for bit."""
    assert list(a.tokens) == list(b.tokens)
    assert len(a.layers) == len(b.layers)
    if a.logits is not None or b.logits is not None:
        assert np.array_equal(np.asarray(a.logits), np.asarray(b.logits))
    for L, (x, y) in enumerate(zip(a.layers, b.layers)):
        for name in LAYER_FIELDS:
            u, v = getattr(x, name), getattr(y, name)
            assert (u is None) == (v is None), (L, name)
            if u is not None:
                assert np.array_equal(np.asarray(u), np.asarray(v)), (L, name)


@pytest.fixture(scope="module")
def reference(tiny_gguf: Path) -> dict:
    """One process: the state after PROMPT, its logits and the greedy continuation."""
    s = load(tiny_gguf, ctx=CTX)
    try:
        s.prefill(PROMPT, chunk=CHUNK)
        state = s.snapshot()
        logits = np.array(s.logits)
        tokens = s.decode(N_DECODE)
        hc_bytes = s.args.n_hc * s.args.n_embd * 4  # one token's hyper-connection streams, float32
    finally:
        s.close()
    return {"state": state, "logits": logits, "decode": tokens, "hc_bytes": hc_bytes}


# ---- layer ranges -------------------------------------------------------------------------------------
def test_split_and_parse_ranges() -> None:
    assert S.split_layers(6, 2) == [(0, 3), (3, 6)]
    assert S.split_layers(43, 4) == [(0, 11), (11, 22), (22, 33), (33, 43)]
    assert S.parse_ranges("0-1, 2-5", 6) == [(0, 2), (2, 6)]
    for bad in ("0-2,4-5", "0-2", "1-5", "0-3,3-5", "a-b"):
        with pytest.raises(S.ShardError):
            S.parse_ranges(bad, 6)
    with pytest.raises(S.ShardError):
        S.split_layers(6, 7)


def test_rank_weight_bytes_follow_the_layer_ranges(tiny_gguf: Path) -> None:
    with GGUFFile(tiny_gguf) as f:
        sizes = {n: t.nbytes for n, t in f.tensors.items()}
        n_layer = ModelArgs.from_metadata(f.metadata).n_layer
    per = distributed.rank_weight_bytes(sizes, n_layer, [(0, 1), (1, 5), (5, n_layer)])
    assert sum(per) == sum(sizes.values())
    layer = {L: sum(b for n, b in sizes.items() if n.startswith(f"blk.{L}.")) for L in range(n_layer)}
    assert per[0] == layer[0] + sizes["token_embd.weight"]
    assert per[1] == sum(layer[L] for L in range(1, 5))
    head = sum(b for n, b in sizes.items() if n.startswith("output"))
    assert per[2] == sum(layer[L] for L in range(5, n_layer)) + head


# ---- the shard format ------------------------------------------------------------------------------------
def test_dsvl_shard_layout_and_partial_reads(reference: dict, tmp_path: Path) -> None:
    st = reference["state"]
    lay = st.layout
    m = S.write_checkpoint(tmp_path / "c", [st.layer_slice(a, b) for a, b in [(0, 1), (1, 4), (4, 6)]],
                           "some text", quant_bits=2, reason=SaveReason.COLD)
    assert [(e.start, e.stop) for e in m.shards] == [(0, 1), (1, 4), (4, 6)]
    e = m.shards[1]
    raw = (tmp_path / "c" / e.file).read_bytes()
    assert e.file == f"{m.save_id}.L1-3.dsvl" and len(raw) == e.bytes == dsvl.shard_file_bytes(lay, 160, CTX, 1, 4)
    assert zlib.crc32(raw) == e.crc32
    head = np.frombuffer(raw[:56], "<u4").tolist()
    # magic, version, ctx, chunk, raw_cap, raw_window, comp_cap, T, n_layer, head_dim, idx_dim, first, last, raw_live
    assert raw[:4] == b"DSVL"
    assert head[1:] == [1, CTX, st.prefill_chunk, raw_cap(lay, CTX, st.prefill_chunk), lay.n_swa, comp_cap(CTX),
                        160, lay.n_layer, lay.head_dim, lay.idx_dim, 1, 3, lay.n_swa]
    counts = np.frombuffer(raw[56:56 + 24], "<u4").tolist()  # layers 1..3: compressed, then indexer row counts
    assert counts == [lay.n_comp(L, 160) for L in (1, 2, 3)] + [lay.n_idx(L, 160) for L in (1, 2, 3)]
    assert sorted(set(lay.ratios[1:4])) == [0, 4, 128]  # every kind of layer is in this shard
    assert e.payload_bytes == len(raw) and m.shards[2].bytes == m.shards[2].payload_bytes + 4 * lay.n_vocab
    # any range reads from whichever shards hold it, and equals the same slice of the state
    for a, b in [(0, 6), (2, 5), (3, 4), (5, 6)]:
        part = S.load_range(tmp_path / "c", a, b)
        want = st.layer_slice(a, b)
        assert_states_equal(part, want)
        assert (part.logits is None) == (b != 6)
    whole, m2 = S.load_checkpoint(tmp_path / "c")
    assert_states_equal(whole, st)
    assert m2.text == b"some text" and m2.reason == SaveReason.COLD and S.verify_checkpoint(tmp_path / "c") == []


def test_corrupt_or_truncated_shards_are_named(reference: dict, tmp_path: Path) -> None:
    st = reference["state"]
    d = tmp_path / "c"
    m = S.write_checkpoint(d, [st.layer_slice(a, b) for a, b in [(0, 3), (3, 6)]])
    e = m.shards[1]
    p = d / e.file
    data = bytearray(p.read_bytes())
    lay = st.layout
    spans = dsvl.layer_spans(lay, dsvl.DSVLHeader.for_shard(st.layer_slice(3, 6)))
    at = spans[1].offset + 100  # inside layer 4
    data[at] ^= 0x40
    p.write_bytes(bytes(data))
    with pytest.raises(S.ShardError, match=rf"{e.file}.*checksum mismatch in layer 4"):
        S.load_range(d, 0, 6)
    assert len(S.load_range(d, 5, 6).layers) == 1  # per-layer checksums: layer 5 is intact
    assert any("checksum" in msg for msg in S.verify_checkpoint(d))
    p.write_bytes(bytes(data[:-10]))
    with pytest.raises(S.ShardError, match="truncated or replaced"):
        S.load_range(d, 3, 6)
    p.unlink()
    with pytest.raises(S.ShardError, match="shard file missing"):
        S.load_checkpoint(d)
    with pytest.raises(S.ShardError, match="no manifest"):
        S.load_checkpoint(tmp_path / "nothing")


def test_failed_save_keeps_previous_checkpoint(reference: dict, tmp_path: Path) -> None:
    st = reference["state"]
    d = tmp_path / "c"
    parts = [st.layer_slice(a, b) for a, b in [(0, 3), (3, 6)]]
    first = S.write_checkpoint(d, parts, "first")

    def die(done: int, total: int) -> None:
        if done > total // 2:
            raise KeyboardInterrupt  # the process is interrupted mid-shard

    with pytest.raises(KeyboardInterrupt):
        S.write_checkpoint(d, parts, "second", progress=die)
    assert sorted(os.listdir(d)) == sorted([S.MANIFEST_NAME] + [e.file for e in first.shards])
    state, m = S.load_checkpoint(d)
    assert m.text == b"first" and m.save_id == first.save_id
    second = S.write_checkpoint(d, parts, "third")  # a later save replaces it and removes its shards
    assert sorted(os.listdir(d)) == sorted([S.MANIFEST_NAME] + [e.file for e in second.shards])


def test_kv_and_shards_convert_losslessly(reference: dict, tmp_path: Path) -> None:
    st = reference["state"]
    kv = tmp_path / "a.kv"
    with open(kv, "wb") as f:
        write_kv_file(f, st, "hé\xff".encode("latin-1"), quant_bits=4, reason=SaveReason.CONTINUED, ext_flags=4,
                      now=1_700_000_000, hits=3, fingerprint=bytes(range(32)))
    m = S.kv_to_checkpoint(kv, tmp_path / "c", 3)
    assert S.read_manifest(tmp_path / "c").fingerprint == m.fingerprint == bytes(range(32))
    back = S.checkpoint_to_kv(tmp_path / "c", tmp_path / "b.kv")
    assert back.read_bytes() == kv.read_bytes()  # header, text (not UTF-8), payload, footer with the fingerprint
    # shards -> .kv -> shards: identical shard files; into a directory the store's <sha1>.kv name
    S.write_checkpoint(tmp_path / "d", [st.layer_slice(a, b) for a, b in [(0, 2), (2, 6)]], "x")
    (tmp_path / "store").mkdir()
    kv2 = S.checkpoint_to_kv(tmp_path / "d", tmp_path / "store")
    assert kv2.name == hashlib.sha1(b"x").hexdigest() + ".kv"
    with open(kv2, "rb") as f:
        _, text, state, _ = read_kv_file(f, st.layout, name=str(kv2))
    assert text == b"x"
    assert_states_equal(state, st)
    m1 = S.read_manifest(tmp_path / "d")
    m2 = S.kv_to_checkpoint(kv2, tmp_path / "e", [(0, 2), (2, 6)])
    for e1, e2 in zip(m1.shards, m2.shards):
        assert (tmp_path / "d" / e1.file).read_bytes() == (tmp_path / "e" / e2.file).read_bytes()
    assert (m2.tokens, m2.text, m2.layout) == (m1.tokens, m1.text, m1.layout)


# ---- one process ---------------------------------------------------------------------------------------------
def test_a_process_running_alone_gets_a_plain_session(tiny_gguf: Path, reference: dict) -> None:
    assert distributed.init_group() is None  # not launched: no group
    s = distributed.load(tiny_gguf, ctx=CTX)
    try:
        assert type(s) is Session and isinstance(s.stage, LocalStage) and s.stage.ranks == 1
        s.prefill(PROMPT, chunk=CHUNK)
        assert np.array_equal(np.array(s.logits), reference["logits"])
    finally:
        s.close()


# ---- two ranks on 127.0.0.1 ----------------------------------------------------------------------------------
def free_port_pair() -> int:
    """A port p with p and p+1 free now (the ring listens on one port per rank)."""
    for _ in range(200):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            p = a.getsockname()[1]
            if p >= 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", p + 1))
                except OSError:
                    continue
            return p
    pytest.skip("no two consecutive free TCP ports on 127.0.0.1")


def launch(tmp_path: Path, argv: list[str], n: int = 2, timeout: float = LAUNCH_TIMEOUT) -> list[dict]:
    """Start ``n`` ranks of ``argv`` exactly as mlx.launch does on one host (MLX_RANK and an
    MLX_HOSTFILE ring), in one process group that is killed in any case. Returns per rank
    its exit code and output."""
    p = free_port_pair()
    ring = tmp_path / f"ring-{p}.json"
    ring.write_text(json.dumps([[f"127.0.0.1:{p + i}"] for i in range(n)]))
    procs: list[subprocess.Popen] = []
    try:
        for r in range(n):
            env = dict(os.environ, MLX_RANK=str(r), MLX_HOSTFILE=str(ring))  # same BLAS threads as the reference
            pgid = 0 if r == 0 else procs[0].pid  # rank 0 leads a new process group, the others join it
            procs.append(subprocess.Popen(argv + [str(r)], env=env, cwd=REPO, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          preexec_fn=partial(os.setpgid, 0, pgid)))
        out = []
        for r, pr in enumerate(procs):
            try:
                so, se = pr.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                pytest.fail(f"rank {r} did not finish within {timeout} s")
            out.append({"rc": pr.returncode, "stdout": so, "stderr": se})
        return out
    finally:
        if procs:
            try:
                os.killpg(procs[0].pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            for pr in procs:
                pr.wait(timeout=10)


@pytest.fixture(scope="module")
def ring(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Skip the launch tests unless two ring ranks can start and all-sum here."""
    if not distributed.mx.distributed.is_available():
        pytest.skip("this MLX build has no mx.distributed")
    probe = "import mlx.core as mx; g = mx.distributed.init(backend='ring', strict=True); " \
            "print(mx.distributed.all_sum(mx.array([g.rank() + 1]), group=g).item())"
    try:
        res = launch(tmp_path_factory.mktemp("probe"), [sys.executable, "-c", probe], timeout=60)
    except pytest.fail.Exception as err:
        pytest.skip(f"the ring backend does not start here: {err}")
    if any(r["rc"] != 0 or r["stdout"].strip() != "3" for r in res):
        pytest.skip("the ring backend cannot start here: " + " | ".join(r["stderr"].strip()[-300:] for r in res))


# Every rank runs this script (argv: config JSON, rank). Rank 0 drives the session; rank 1 serves.
WORKER = textwrap.dedent("""
    import json, os, signal, sys, time
    import numpy as np
    from workbench import distributed
    from workbench.kv import shards as S
    from workbench.sampling import greedy
    from workbench.session import SessionError

    cfg, rank = json.loads(sys.argv[1]), int(sys.argv[2])
    out = {"rank": rank}
    report = os.path.join(cfg["out"], f"rank{rank}.json")
    try:
        s = distributed.load(cfg["model"], ctx=cfg["ctx"] + (rank if cfg["scenario"] == "mismatch" else 0),
                             group=distributed.init_group("ring"))
    except distributed.DistributedError as err:
        out["load_error"] = str(err)
        s = None
    try:
        if s is None:
            pass
        elif not s.stage.drives:
            out["layers"] = [s.stage.start, s.stage.stop]
            with open(os.path.join(cfg["out"], f"pid{rank}"), "w") as f:
                f.write(str(os.getpid()))
            try:
                s.stage.serve(s)
                out["served"] = "ok"
            except distributed.DistributedError as err:
                out["served"] = str(err)
        elif cfg["scenario"] == "main":
            out["layers"] = [s.stage.start, s.stage.stop]
            try:
                s.prefill([0, s.args.n_vocab])  # bad input: raised here, nothing sent
            except SessionError as err:
                out["bad_input"] = str(err)

            class Stop(Exception):
                pass

            def stop_in_third_chunk(p):
                if p.done > 2 * cfg["chunk"]:
                    raise Stop  # on rank 0, after rank 1 got the first two chunks
            try:
                s.prefill(cfg["prompt"], chunk=cfg["chunk"], progress=stop_in_third_chunk)
            except Stop:
                out["interrupted_tokens"] = s.n_tokens  # unchanged; rank 1 goes back when the next call starts at 0
            s.prefill(cfg["prompt"][:2 * cfg["chunk"]], chunk=cfg["chunk"])  # resumed on a chunk boundary
            s.prefill(cfg["prompt"][2 * cfg["chunk"]:], chunk=cfg["chunk"])
            np.save(os.path.join(cfg["out"], "logits.npy"), np.array(s.logits))
            snap = s.snapshot()  # gathered from both ranks
            out["decode"] = s.decode(cfg["n_decode"])
            S.write_checkpoint(cfg["save"], [snap.layer_slice(a, b) for a, b in [(0, 3), (3, 6)]],
                               "two ranks")
            s.restore(snap)  # scattered back
            out["decode_again"] = s.decode(cfg["n_decode"])
            s.reset()
            state, m = S.load_checkpoint(cfg["restore"])  # written by one process
            s.restore(state)
            out["restored_tokens"] = s.n_tokens
            out["restored_top"] = int(greedy(s.logits))
            out["decode_after_restore"] = s.decode(cfg["n_decode"])
            out["traffic"] = vars(s.stage.traffic)
            s.close("rank 0 is done (test)")
        elif cfg["scenario"] == "kill":  # rank 1 dies: rank 0's next call raises
            s.prefill(cfg["prompt"], chunk=cfg["chunk"])
            while not os.path.exists(os.path.join(cfg["out"], "pid1")):
                time.sleep(0.05)
            os.kill(int(open(os.path.join(cfg["out"], "pid1")).read()), signal.SIGKILL)
            time.sleep(0.5)
            try:
                s.snapshot()
                out["error"] = None
            except distributed.DistributedError as err:
                out["error"] = str(err)
            s.close(str(out["error"]))  # the pipeline is broken: no second error
    finally:
        if s is not None:
            s.close()
        with open(report, "w") as f:
            json.dump(out, f)
""")


def run_worker(d: Path, cfg: dict) -> tuple[list[dict], list[dict]]:
    """Launch 2 ranks of WORKER with ``cfg``; their exit codes/output and their reports."""
    (d / "worker.py").write_text(WORKER)
    res = launch(d, [sys.executable, str(d / "worker.py"), json.dumps(cfg | {"out": str(d)})])
    return res, [json.loads((d / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def two_ranks(ring: None, tiny_gguf: Path, reference: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One 2-rank run of the main scenario; the 1-process checkpoint it restores is written first."""
    d = tmp_path_factory.mktemp("two")
    one = d / "one-process"
    S.write_checkpoint(one, [reference["state"].layer_slice(0, 6)], "one process")
    cfg = {"scenario": "main", "model": str(tiny_gguf), "ctx": CTX, "chunk": CHUNK, "prompt": PROMPT,
           "n_decode": N_DECODE, "save": str(d / "two-ranks"), "restore": str(one)}
    res, reports = run_worker(d, cfg)
    for r, x in enumerate(res):
        assert x["rc"] == 0, f"rank {r} failed: {x['stderr'][-2000:]}"
    return {"dir": d, "ranks": reports}


def test_two_ranks_same_logits_and_greedy_tokens(two_ranks: dict, reference: dict) -> None:
    driver, server = two_ranks["ranks"]
    assert [driver["layers"], server["layers"]] == [[0, 3], [3, 6]]
    assert np.array_equal(np.load(two_ranks["dir"] / "logits.npy"), reference["logits"])
    assert driver["decode"] == driver["decode_again"] == reference["decode"]
    # what crossed the boundary: the 2 chunks of the interrupted prefill, the prompt, then every decoded token fed
    # back (twice, and once after the restore)
    t = driver["traffic"]
    crossed = 2 * CHUNK + len(PROMPT) + 3 * N_DECODE
    assert t["hc_sent_bytes"] == crossed * reference["hc_bytes"] and t["hc_received_bytes"] == 0


def test_bad_input_raises_on_rank_0_and_its_end_reaches_every_rank(two_ranks: dict) -> None:
    driver, server = two_ranks["ranks"]
    assert "outside the vocabulary" in driver["bad_input"]  # checked before anything is sent; the pipeline went on
    assert driver["interrupted_tokens"] == 0  # an interrupted prefill changed nothing, on either rank (same logits)
    assert server["served"] == "rank 0 stopped on an error: rank 0 is done (test)"


def test_ranks_that_disagree_fail_together(ring: None, tiny_gguf: Path, tmp_path: Path) -> None:
    res, reports = run_worker(tmp_path, {"scenario": "mismatch", "model": str(tiny_gguf), "ctx": CTX})
    for r in range(2):
        assert res[r]["rc"] == 0, res[r]["stderr"][-2000:]
        assert "ranks disagree" in reports[r]["load_error"]


def test_two_rank_snapshot_restores_in_one_process(two_ranks: dict, tiny_gguf: Path, reference: dict) -> None:
    ck = two_ranks["dir"] / "two-ranks"
    m = S.read_manifest(ck)
    assert m.ranges == [(0, 3), (3, 6)] and m.text == b"two ranks" and S.verify_checkpoint(ck) == []
    state, _ = S.load_checkpoint(ck)
    assert_states_equal(state, reference["state"])
    s = load(tiny_gguf, ctx=CTX)  # a plain single-process Session
    try:
        s.restore(state)
        assert s.decode(N_DECODE) == reference["decode"]
    finally:
        s.close()


def test_one_process_checkpoint_restores_in_two_ranks(two_ranks: dict, reference: dict) -> None:
    driver = two_ranks["ranks"][0]
    assert driver["restored_tokens"] == len(PROMPT)
    assert driver["restored_top"] == reference["decode"][0]
    assert driver["decode_after_restore"] == reference["decode"]


def test_a_lost_rank_raises_on_rank_0(ring: None, tiny_gguf: Path, tmp_path: Path) -> None:
    cfg = {"scenario": "kill", "model": str(tiny_gguf), "ctx": CTX, "chunk": CHUNK, "prompt": PROMPT[:40]}
    (tmp_path / "worker.py").write_text(WORKER)
    res = launch(tmp_path, [sys.executable, str(tmp_path / "worker.py"), json.dumps(cfg | {"out": str(tmp_path)})])
    assert res[1]["rc"] == -signal.SIGKILL
    assert res[0]["rc"] == 0, res[0]["stderr"][-2000:]
    err = json.loads((tmp_path / "rank0.json").read_text())["error"]
    assert err is not None and "rank 0: " in err


# ---- workbench run under mlx.launch -------------------------------------------------------------------------------
def kv_content(path: Path) -> bytes:
    """A .kv file without its two timestamps (KVC bytes 24..39) and checksum trailer: the
    header's other fields, the text and the payload."""
    raw = path.read_bytes()
    payload = int.from_bytes(raw[40:48], "little")
    text = int.from_bytes(raw[48:52], "little")
    return raw[:24] + raw[40:52 + text + payload]


def run_cli(cmd: list[str], timeout: float = LAUNCH_TIMEOUT) -> tuple[list[dict], str]:
    """Run ``cmd`` in its own process group (killed in any case); its JSON lines and stderr."""
    pr = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True)
    try:
        so, se = pr.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{cmd[0]} did not finish within {timeout} s")
    finally:
        try:
            os.killpg(pr.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        pr.wait(timeout=10)
    assert pr.returncode == 0, f"{cmd}: stdout {so[-1000:]!r} stderr {se[-2000:]!r}"
    return [json.loads(ln) for ln in so.splitlines() if ln.startswith("{")], se


def test_workbench_run_under_mlx_launch_is_one_pipeline(ring: None, tiny_gguf: Path, tmp_path: Path) -> None:
    """``mlx.launch ... -- workbench run --kv-dir D --json``: one result, from rank 0, with the
    tokens and the checkpoint files (names, text, payload) of one process."""
    bindir = Path(sys.executable).parent
    launcher = shutil.which("mlx.launch", path=str(bindir))
    if launcher is None:
        pytest.skip("mlx.launch is not installed next to this Python")
    script = shutil.which("workbench", path=str(bindir))
    workbench = [script] if script else [sys.executable, "-m", "workbench.cli"]
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Pipeline parallelism splits a model by layers over machines. " * 6, encoding="utf-8")

    def args(kv: Path) -> list[str]:
        return ["run", "--model", str(tiny_gguf), "--prompt-file", str(prompt), "--kv-dir", str(kv), "--json",
                "--ctx", str(CTX), "--chunk", str(CHUNK), "--kv-min-tokens", "64", "--kv-align", "64",
                "--max-tokens", str(N_DECODE), "--temp", "0"]

    one, _ = run_cli(workbench + args(tmp_path / "one"))
    p = free_port_pair()
    two, err = run_cli([launcher, "--backend", "ring", "-n", "2", "--hosts", "127.0.0.1", "--starting-port", str(p),
                        "--"] + workbench + args(tmp_path / "two"))
    assert len(two) == 2, err[-2000:]  # one turn and its shutdown save, printed once (by rank 0)
    (t1, s1), (t2, s2) = one, two
    assert t1["ranks"] == 1 and t2["ranks"] == 2 and t2["pipeline"]["layers"] == [[0, 2], [3, 5]]
    assert t2["tokens"] == t1["tokens"] and t2["prompt_tokens"] == t1["prompt_tokens"] > 64
    assert [x["reason"] for x in t2["saved"]] == [x["reason"] for x in t1["saved"]] == ["cold"]
    names = sorted(f.name for f in (tmp_path / "one").glob("*.kv"))
    assert len(names) == 2 and names == sorted(f.name for f in (tmp_path / "two").glob("*.kv"))
    assert {Path(s1["shutdown_save"]["path"]).name, Path(t1["saved"][0]["path"]).name} == set(names)
    for n in names:
        assert kv_content(tmp_path / "one" / n) == kv_content(tmp_path / "two" / n), n
