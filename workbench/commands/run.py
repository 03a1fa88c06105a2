"""``workbench run``: load a model, prefill a chat prompt with a progress bar, generate.

    workbench run --model data/tiny.gguf --prompt "Hello" --max-tokens 16 --temp 0
    workbench run --model M --chat            # interactive: one user turn per stdin line

The library does the work (the :class:`~workbench.engine.Engine`, with ``--kv-dir`` over
its disk prefix cache); this module only turns arguments into calls and prints.

    workbench run --model M --prompt-file long.txt --kv-dir ~/.ds4-kv --kv-budget-mb 8192

Every turn reports the same fields with and without ``--kv-dir``: where its prefix came
from (``source``: live state, a disk checkpoint, none), ``prompt_tokens`` (the whole
prompt), ``cached_tokens`` (reused), ``cache_write_tokens`` (prefilled), rates, the top-5
next tokens, and every checkpoint save (cold / continued / evict, and the shutdown save
at exit; a failed save with its reason, and exit code 1). Without ``--json`` the
generated text streams to stdout and progress bars and the summary go to stderr; with
``--json`` one object per turn is printed on stdout.

Under ``mlx.launch`` the same command runs one pipeline over the launched ranks
(:func:`workbench.distributed.load`): every rank loads its range of layers, rank 0 runs
the turn (engine, disk cache and all) and prints; the other ranks serve its calls and
print nothing. Each record reports ``ranks`` (1 in one process), and on a pipeline
``pipeline`` (the layers of each rank and rank 0's traffic)::

    mlx.launch --backend ring -n 2 --hosts 127.0.0.1 -- \\
        workbench run --model M --prompt-file P --kv-dir D --json
"""

from __future__ import annotations

import argparse
import codecs
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TextIO

from workbench import distributed
from workbench.commands.common import add_sampling_args, number, sampler_from_args, stdin_lines, utf8_text
from workbench.errors import WorkbenchError
from workbench.kv.chainstore import LAYOUTS
from workbench.safeopen import PROMPT_FILE_CAP, read_capped
from workbench.sampling import Sampler
from workbench.session import DEFAULT_CTX, MAX_PREFILL_CHUNK, Progress, Session
from workbench.tokenizer import Tokenizer

if TYPE_CHECKING:  # the engine pulls in pandas: imported when a turn is served, not for --help
    from workbench.engine import Completion, Engine, SaveRecord
    from workbench.kv.policy import KVPolicy

CONTINUED_INTERVAL = 10000  # KVPolicy's default: rounded up to the 2048 alignment, ds4's 10240
HELP = "generate from a prompt (or chat interactively) with a ds4 GGUF model"


class RunError(WorkbenchError):
    """Bad arguments for ``workbench run``."""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="ds4 GGUF file")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", type=utf8_text, help="user prompt text")
    src.add_argument("--prompt-file", help=f"regular file holding the user prompt (UTF-8, at most "
                                           f"{PROMPT_FILE_CAP // 2**20} MiB)")
    src.add_argument("--chat", action="store_true", help="interactive chat: one user turn per stdin line (UTF-8)")
    parser.add_argument("--system", type=utf8_text, default="", help="system prompt (default: none)")
    parser.add_argument("--think", action="store_true", help="thinking mode (prompt ends with <think>)")
    parser.add_argument("--chunk", type=number(int, 1), default=None,
                        help=f"prefill chunk size in tokens (default: min(ctx, {MAX_PREFILL_CHUNK}))")
    parser.add_argument("--ctx", type=number(int, 1), default=DEFAULT_CTX,
                        help=f"context limit in tokens, at most the model's context length (default {DEFAULT_CTX})")
    parser.add_argument("--max-tokens", type=number(int, 0), default=128, help="tokens to generate per turn (default 128)")
    add_sampling_args(parser)
    parser.add_argument("--kv-dir", default=None, help="disk KV cache directory (ds4 .kv files): reuse and save prefixes")
    parser.add_argument("--kv-budget-mb", type=number(float, 0, lo_open=True), default=4096.0,
                        help="disk budget of --kv-dir in MiB, > 0 (default 4096)")
    parser.add_argument("--kv-min-tokens", type=number(int, 1), default=512,
                        help="smallest checkpoint saved or used, in tokens (default 512)")
    parser.add_argument("--kv-align", type=number(int, 0), default=2048,
                        help="cold/continued save boundary alignment in tokens, 0: none (default 2048)")
    parser.add_argument("--kv-durable", action="store_true", help="fsync checkpoints and the directory")
    parser.add_argument("--kv-layout", choices=LAYOUTS, default="flat",
                        help="flat: ds4's <sha>.kv files (default); chain: chain/<sha>.kvd entries that store only "
                             "what is new over the stored checkpoint they extend (kv export makes the .kv)")
    parser.add_argument("--kv-continued-interval", type=number(int, 0), default=CONTINUED_INTERVAL,
                        help="tokens between continued saves, rounded up to --kv-align (default 10000: ds4's 10240; "
                             "0: none)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per turn, no progress bar")
    parser.add_argument("--layers", default=None,
                        help="under mlx.launch: the layer range of each rank, inclusive, e.g. 0-21,22-42 "
                             "(default: an even split)")


def prompt_text(args: argparse.Namespace) -> str:
    """The user prompt from ``--prompt`` or ``--prompt-file`` (a regular file of at most
    ``PROMPT_FILE_CAP`` bytes: a FIFO, device or directory is refused, never read)."""
    if args.prompt is not None:
        return args.prompt
    path = Path(args.prompt_file)
    try:
        return read_capped(path, PROMPT_FILE_CAP).decode("utf-8")
    except OSError as err:
        raise RunError(f"{path}: cannot read prompt file: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise RunError(f"{path}: prompt file is not UTF-8") from None


def progress_bar(enabled: bool) -> tuple[Callable[[Progress], None] | None, Callable[[], None]]:
    """A tqdm bar on stderr fed by :class:`Progress` updates, and a function closing it."""
    if not enabled:
        return None, lambda: None
    from tqdm import tqdm

    bars: dict[str, Any] = {}

    def update(p: Progress) -> None:
        bar = bars.get(p.stage)
        if bar is None or bar.total != p.total:
            if bar is not None:
                bar.close()
            unit = "layer" if p.stage == "load" else "tok"
            bar = bars[p.stage] = tqdm(total=p.total, initial=p.done, desc=p.stage, unit=unit, file=sys.stderr,
                                       leave=False)
        bar.update(p.done - bar.n)

    def close() -> None:
        for bar in bars.values():
            bar.close()
        bars.clear()

    return update, close


class TextStream:
    """Writes decoded token bytes as text as soon as they form whole UTF-8 characters."""

    def __init__(self, tok: Tokenizer, out: TextIO) -> None:
        self.tok, self.out = tok, out
        self.dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, token: int) -> None:
        self.out.write(self.dec.decode(self.tok.token_bytes(token)))
        self.out.flush()

    def finish(self) -> None:
        self.out.write(self.dec.decode(b"", final=True) + "\n")
        self.out.flush()


def stage_record(session: Session) -> dict[str, Any]:
    """``ranks`` (and ``pipeline`` on a pipeline): where the session's layers ran."""
    rec: dict[str, Any] = {"ranks": session.stage.ranks}
    if isinstance(session.stage, distributed.PipelineStage):
        rec["pipeline"] = session.stage.summary()
    return rec


def top_next(top: list[tuple[int, float]], tok: Tokenizer) -> list[dict[str, Any]]:
    return [{"id": i, "text": tok.decode_text([i]), "prob": round(p, 6)} for i, p in top]


def print_summary(rec: dict[str, Any], out: TextIO) -> None:
    """The human-readable lines of a turn record: tokens, where they came from, rates, top-5."""
    rate = rec["prefill_tokens_per_s"]
    print(f"prompt: {rec['prompt_tokens']} tokens, {rec['cached_tokens']} from {rec['source']}, "
          f"{rec['cache_write_tokens']} prefilled at {rate or 0:.1f} tok/s ({rec['prefill_seconds']:.2f} s); "
          f"time to first token {rec['ttft_seconds']:.2f} s; "
          f"decode: {rec['decode_tokens']} tokens, {rec['decode_tokens_per_s'] or 0:.2f} tok/s", file=out)
    top = ", ".join(f"{t['text']!r} {t['prob']:.4g}" for t in rec["top_next"])
    print(f"top-5 after the prompt: {top}", file=out)
    if rec.get("note"):
        print(f"cache: {rec['note']}", file=out)
    if rec.get("why"):
        print(f"why: {rec['why']}", file=out)


def describe_save(s_: dict[str, Any]) -> str:
    """One line for a save record (a failed one says why)."""
    if s_["status"] == "failed":
        return f"save {s_['reason']} FAILED: {s_['tokens']} tokens not saved: {s_['detail']}"
    detail = f", {s_['detail']}" if s_["detail"] else ""
    return (f"saved {s_['reason']}: {s_['tokens']} tokens -> {s_['path']} ({s_['status']}{detail}, "
            f"{s_['bytes'] / 2**20:.1f} MiB, {s_['seconds'] * 1000:.0f} ms)")


def assistant_message(reply: list[int], tok: Tokenizer) -> dict[str, str]:
    """The history entry for a reply: text before a ``</think>`` token is reasoning."""
    if tok.think_end in reply:
        cut = reply.index(tok.think_end)
        return {"role": "assistant", "reasoning_content": tok.decode_text(reply[:cut]),
                "content": tok.decode_text(reply[cut + 1 :])}
    return {"role": "assistant", "content": tok.decode_text(reply)}


def record(c: Completion, tok: Tokenizer) -> dict[str, Any]:
    """The JSON-ready record of one turn: the same fields with and without ``--kv-dir``."""
    t, u = c.timings, c.usage
    return {
        "source": u.source,
        "prompt_tokens": u.prompt_tokens,
        "cached_tokens": u.cached_tokens,
        "cache_write_tokens": u.cache_write_tokens,
        "ttft_seconds": round(t.ttft_s, 4),
        "restore_seconds": round(t.restore_s, 4),
        "prefill_seconds": round(t.prefill_s, 4),
        "prefill_tokens_per_s": round(u.cache_write_tokens / t.prefill_s, 2) if t.prefill_s > 0 else None,
        "decode_tokens": len(c.tokens),
        "decode_seconds": round(t.decode_s, 4),
        "decode_tokens_per_s": round(len(c.tokens) / t.decode_s, 2) if t.decode_s > 0 else None,
        "top_next": top_next(c.top_next, tok),
        "saved": [save_record(s) for s in c.saves],
        "note": c.note,
        "tokens": c.tokens,
        "text": c.text,
    }


def serve_turn(engine: Engine, args: argparse.Namespace, sampler: Sampler, tok: Tokenizer,
               **request: Any) -> dict[str, Any]:
    """One request through the engine: generated text streams to stdout (or one JSON
    object there), progress and the summary go to stderr; return the record."""
    progress, close = progress_bar(not args.json)
    engine.progress = progress
    stream = None if args.json else TextStream(tok, sys.stdout)
    why = miss_explanation(engine, request, args.think)
    try:
        c = engine.complete(max_tokens=args.max_tokens, sampler=sampler, thinking=args.think, on_token=stream,
                            **request)
    finally:
        close()
    rec = record(c, tok) | stage_record(engine.session)
    rec["why"] = "" if c.usage.source == "live" else why
    if stream is not None:
        stream.finish()
        print_summary(rec, sys.stderr)
    else:
        print(json.dumps(rec, ensure_ascii=False))
    for s_ in rec["saved"]:
        if s_["status"] == "failed" or stream is not None:
            print(describe_save(s_), file=sys.stderr)
    return rec


def miss_explanation(engine: Engine, request: dict[str, Any], thinking: bool) -> str:
    """In plain words, what the disk cache can do for this request, asked before serving
    it (``workbench kv lookup`` gives the details); "" without a cache directory."""
    if engine.store is None:
        return ""
    from workbench.lab.lookup import explain_lookup

    rendered = engine.render(request.get("prompt"), request.get("messages"), system=request.get("system", ""),
                             thinking=thinking)
    return explain_lookup(engine.store, rendered.encode("utf-8"), engine.policy, engine.session.ctx).explanation


def save_record(s: SaveRecord) -> dict[str, Any]:
    return {"reason": s.reason, "path": s.path, "status": s.status, "tokens": s.tokens, "bytes": s.bytes,
            "seconds": round(s.seconds, 4), "detail": s.detail}


def open_store(session: Session, args: argparse.Namespace) -> tuple[Any, KVPolicy]:
    """The ``--kv-dir`` store and its policy (None store without ``--kv-dir``)."""
    from workbench.kv.policy import KVPolicy

    policy = KVPolicy(min_tokens=args.kv_min_tokens, boundary_align=args.kv_align, budget_mb=args.kv_budget_mb,
                      continued_interval=args.kv_continued_interval)
    if args.kv_dir is None:
        return None, policy
    from workbench.gguf.fingerprint import checkpoint_identity
    from workbench.kv.store import KVStore

    from workbench.kv.events import BudgetHeld

    store = KVStore.from_policy(args.kv_dir, policy, kv_layout=args.kv_layout, **checkpoint_identity(session.file))
    for held in (e for e in store.events if isinstance(e, BudgetHeld)):
        print(f"workbench run: warning: {held.message}", file=sys.stderr)
        break
    return store, policy


def serve(session: Session, tok: Tokenizer, args: argparse.Namespace, sampler: Sampler, text: str | None) -> bool:
    """Serve the prompt, or each ``--chat`` stdin line as a user turn, through one engine
    (with ``--kv-dir``: its disk prefix cache and saves). A chat turn reuses the live
    state when the rendered conversation extends it. True when every save succeeded."""
    from workbench.engine import Engine

    store, policy = open_store(session, args)
    engine = Engine(session, store, policy, tokenizer=tok, durable=args.kv_durable, chunk=args.chunk)
    records: list[dict[str, Any]] = []
    try:
        if args.chat:
            messages: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
            try:
                for _, line in stdin_lines():
                    if not line.strip():
                        continue
                    messages.append({"role": "user", "content": line})
                    rec = serve_turn(engine, args, sampler, tok, messages=list(messages))
                    records.append(rec)
                    messages.append(assistant_message([t for t in rec["tokens"] if t != tok.eos], tok))
            except ValueError as err:
                raise RunError(str(err)) from None
        else:
            records.append(serve_turn(engine, args, sampler, tok, prompt=text, system=args.system))
    finally:
        last = engine.close()
    saves = [s for r in records for s in r["saved"]]
    if last is not None:
        saves.append(save_record(last))
        if args.json:
            print(json.dumps({"shutdown_save": saves[-1]}))
        if last.status == "failed" or not args.json:
            print(describe_save(saves[-1]), file=sys.stderr)
    return all(s["status"] != "failed" for s in saves)


def run(args: argparse.Namespace) -> int:
    sampler = sampler_from_args(args)
    group = distributed.init_group()
    drives = group is None or group.rank() == 0  # on a pipeline only rank 0 reads input and prints
    text = None if args.chat or not drives else prompt_text(args)
    progress, close = progress_bar(drives and not args.json)
    try:
        session = distributed.load(args.model, ctx=args.ctx, group=group, ranges=args.layers, progress=progress)
    finally:
        close()
    error = ""
    try:
        if isinstance(session.stage, distributed.PipelineStage) and not session.stage.drives:
            session.stage.serve(session)
            return 0
        tok = Tokenizer.from_gguf(session.file)
        return 0 if serve(session, tok, args, sampler, text) else 1
    except BaseException as err:
        error = f"{type(err).__name__}: {err}"
        raise
    finally:
        session.close(error)
