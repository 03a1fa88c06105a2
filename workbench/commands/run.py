"""``workbench run``: load a model, prefill a chat prompt with a progress bar, generate.

    workbench run --model data/tiny.gguf --prompt "Hello" --max-tokens 16 --temp 0
    workbench run --model M --chat            # interactive: one user turn per stdin line

The library does the work (:func:`workbench.session.generate`, or with ``--kv-dir`` the
:class:`~workbench.engine.Engine` and its disk prefix cache); this module only turns
arguments into calls and prints.

    workbench run --model M --prompt-file long.txt --kv-dir ~/.ds4-kv --kv-budget-mb 8192

With ``--kv-dir`` each turn reports where its prefix came from (live state, a disk
checkpoint, none), ``prompt_tokens``, ``cached_tokens``, ``cache_write_tokens`` (tokens
prefilled) and every checkpoint written (cold / continued / evict, and the shutdown save
at exit). Without ``--json`` the generated text streams to
stdout and a summary follows (progress bars go to stderr); with ``--json`` one object per
turn is printed.

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
from typing import Any, Callable, TextIO

from workbench.chat import render_messages, render_single
from workbench import distributed
from workbench.commands.common import add_sampling_args, sampler_from_args
from workbench.errors import WorkbenchError
from workbench.sampling import Sampler
from workbench.session import DEFAULT_CTX, Generation, Progress, Session, generate
from workbench.tokenizer import Tokenizer

HELP = "generate from a prompt (or chat interactively) with a ds4 GGUF model"


class RunError(WorkbenchError):
    """Bad arguments for ``workbench run``."""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="ds4 GGUF file")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="user prompt text")
    src.add_argument("--prompt-file", help="file holding the user prompt (UTF-8)")
    src.add_argument("--chat", action="store_true", help="interactive chat: one user turn per stdin line")
    parser.add_argument("--system", default="", help="system prompt (default: none)")
    parser.add_argument("--think", action="store_true", help="thinking mode (prompt ends with <think>)")
    parser.add_argument("--chunk", type=int, default=None, help="prefill chunk size (default: min(ctx, 2048))")
    parser.add_argument("--ctx", type=int, default=DEFAULT_CTX, help=f"context limit in tokens (default {DEFAULT_CTX})")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens to generate per turn (default 128)")
    add_sampling_args(parser)
    parser.add_argument("--kv-dir", default=None, help="disk KV cache directory (ds4 .kv files): reuse and save prefixes")
    parser.add_argument("--kv-budget-mb", type=float, default=4096.0, help="disk budget of --kv-dir in MiB (default 4096)")
    parser.add_argument("--kv-min-tokens", type=int, default=512, help="smallest checkpoint saved or used (default 512)")
    parser.add_argument("--kv-align", type=int, default=2048, help="cold/continued save boundary alignment (default 2048)")
    parser.add_argument("--kv-durable", action="store_true", help="fsync checkpoints and the directory")
    parser.add_argument("--json", action="store_true", help="print one JSON object per turn, no progress bar")
    parser.add_argument("--layers", default=None,
                        help="under mlx.launch: the layer range of each rank, inclusive, e.g. 0-21,22-42 "
                             "(default: an even split)")


def prompt_text(args: argparse.Namespace) -> str:
    """The user prompt from ``--prompt`` or ``--prompt-file``."""
    if args.prompt is not None:
        return args.prompt
    path = Path(args.prompt_file)
    try:
        return path.read_text(encoding="utf-8")
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
            bar = bars[p.stage] = tqdm(total=p.total, desc=p.stage, unit=unit, file=sys.stderr, leave=False)
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


def summary(gen: Generation, tok: Tokenizer) -> dict[str, Any]:
    """The JSON-ready record of one turn."""
    return {
        "prompt_tokens": gen.prompt_tokens,
        "prefill_seconds": round(gen.prefill.seconds, 4),
        "prefill_tokens_per_s": round(gen.prefill.tokens_per_s, 2),
        "decode_tokens": len(gen.tokens),
        "decode_seconds": round(gen.decode_seconds, 4),
        "decode_tokens_per_s": round(gen.decode_tokens_per_s, 2),
        "top_next": [{"id": i, "text": tok.decode_text([i]), "prob": round(p, 6)} for i, p in gen.top_next],
        "tokens": gen.tokens,
        "text": tok.decode_text(gen.tokens),
    }


def stage_record(session: Session) -> dict[str, Any]:
    """``ranks`` (and ``pipeline`` on a pipeline): where the session's layers ran."""
    rec: dict[str, Any] = {"ranks": session.stage.ranks}
    if isinstance(session.stage, distributed.PipelineStage):
        rec["pipeline"] = session.stage.summary()
    return rec


def print_summary(rec: dict[str, Any], out: TextIO) -> None:
    print(f"prompt: {rec['prompt_tokens']} tokens, prefill {rec['prefill_tokens_per_s']:.1f} tok/s "
          f"({rec['prefill_seconds']:.2f} s); decode: {rec['decode_tokens']} tokens, "
          f"{rec['decode_tokens_per_s']:.2f} tok/s", file=out)
    top = ", ".join(f"{t['text']!r} {t['prob']:.4g}" for t in rec["top_next"])
    print(f"top-5 after the prompt: {top}", file=out)


def turn(session: Session, tok: Tokenizer, tokens: list[int], args: argparse.Namespace,
         sampler: Sampler) -> dict[str, Any]:
    """Prefill ``tokens`` after the session's, generate, print; return the record."""
    progress, close = progress_bar(not args.json)
    stream = None if args.json else TextStream(tok, sys.stdout)
    try:
        gen = generate(session, tokens, args.max_tokens, sampler, stop=[tok.eos], chunk=args.chunk,
                       progress=progress, on_token=stream)
    finally:
        close()
    rec = summary(gen, tok) | stage_record(session)
    if stream is not None:
        stream.finish()
        print_summary(rec, sys.stdout)
    else:
        print(json.dumps(rec, ensure_ascii=False))
    return rec


def assistant_message(reply: list[int], tok: Tokenizer) -> dict[str, str]:
    """The history entry for a reply: text before a ``</think>`` token is reasoning."""
    if tok.think_end in reply:
        cut = reply.index(tok.think_end)
        return {"role": "assistant", "reasoning_content": tok.decode_text(reply[:cut]),
                "content": tok.decode_text(reply[cut + 1 :])}
    return {"role": "assistant", "content": tok.decode_text(reply)}


def chat_loop(session: Session, tok: Tokenizer, args: argparse.Namespace, sampler: Sampler) -> None:
    """One user turn per stdin line; the session is extended when the rendered
    conversation continues its tokens, and re-prefilled otherwise."""
    messages: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    for line in sys.stdin:
        text = line.rstrip("\n")
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        ids = tok.encode_rendered(render_messages(messages, thinking=args.think))
        have = session.tokens
        if ids[: len(have)] != have:
            session.reset()
            have = []
        rec = turn(session, tok, ids[len(have):], args, sampler)
        messages.append(assistant_message([t for t in rec["tokens"] if t != tok.eos], tok))


def cached_turn(engine: Any, args: argparse.Namespace, sampler: Sampler, tok: Tokenizer,
                **request: Any) -> dict[str, Any]:
    """One request through the engine (prefix reuse + saves); print and return the record."""
    progress, close = progress_bar(not args.json)
    session = engine.session
    engine.progress = progress
    stream = None if args.json else TextStream(tok, sys.stdout)
    try:
        c = engine.complete(max_tokens=args.max_tokens, sampler=sampler, thinking=args.think, on_token=stream,
                            **request)
    finally:
        close()
    t = c.timings
    rec = {
        "source": c.usage.source,
        "prompt_tokens": c.usage.prompt_tokens,
        "cached_tokens": c.usage.cached_tokens,
        "cache_write_tokens": c.usage.cache_write_tokens,
        "ttft_seconds": round(t.ttft_s, 4),
        "restore_seconds": round(t.restore_s, 4),
        "prefill_seconds": round(t.prefill_s, 4),
        "prefill_tokens_per_s": round(c.usage.cache_write_tokens / t.prefill_s, 2) if t.prefill_s > 0 else None,
        "decode_tokens": len(c.tokens),
        "decode_tokens_per_s": round(len(c.tokens) / t.decode_s, 2) if t.decode_s > 0 else None,
        "saved": [save_record(s) for s in c.saves],
        "note": c.note,
        "tokens": c.tokens,
        "text": c.text,
    } | stage_record(session)
    if stream is not None:
        stream.finish()
        print(f"prompt: {rec['prompt_tokens']} tokens, {rec['cached_tokens']} from {rec['source']}, "
              f"{rec['cache_write_tokens']} prefilled; time to first token {t.ttft_s:.2f} s", file=sys.stdout)
        for s_ in rec["saved"]:
            print(f"saved {s_['reason']}: {s_['tokens']} tokens -> {s_['path']} ({s_['status']}, "
                  f"{s_['bytes'] / 2**20:.1f} MiB, {s_['seconds'] * 1000:.0f} ms)", file=sys.stdout)
    else:
        print(json.dumps(rec, ensure_ascii=False))
    return rec


def save_record(s: Any) -> dict[str, Any]:
    return {"reason": s.reason, "path": s.path, "status": s.status, "tokens": s.tokens, "bytes": s.bytes,
            "seconds": round(s.seconds, 4)}


def run_cached(session: Session, tok: Tokenizer, args: argparse.Namespace, sampler: Sampler, text: str | None) -> None:
    """``--kv-dir``: serve the prompt (or each chat turn) through the engine's disk cache."""
    from workbench.engine import Engine
    from workbench.gguf.layout import routed_quant_bits
    from workbench.kv.policy import KVPolicy
    from workbench.kv.store import KVStore

    policy = KVPolicy(min_tokens=args.kv_min_tokens, boundary_align=args.kv_align, budget_mb=args.kv_budget_mb)
    store = KVStore.from_policy(args.kv_dir, policy, quant_bits=routed_quant_bits(session.file))
    engine = Engine(session, store, policy, tokenizer=tok, durable=args.kv_durable)
    try:
        if args.chat:
            messages: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
            for line in sys.stdin:
                if not line.strip():
                    continue
                messages.append({"role": "user", "content": line.rstrip("\n")})
                rec = cached_turn(engine, args, sampler, tok, messages=list(messages))
                messages.append(assistant_message([t for t in rec["tokens"] if t != tok.eos], tok))
        else:
            cached_turn(engine, args, sampler, tok, prompt=text, system=args.system)
    finally:
        last = engine.close()
    if last is not None:
        rec = {"shutdown_save": save_record(last)}
        print(json.dumps(rec) if args.json else
              f"saved shutdown: {last.tokens} tokens -> {last.path} ({last.status})")


def run(args: argparse.Namespace) -> int:
    if args.max_tokens < 0:
        raise RunError(f"--max-tokens must be >= 0, got {args.max_tokens}")
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
        if args.kv_dir is not None:
            run_cached(session, tok, args, sampler, text)
        elif args.chat:
            chat_loop(session, tok, args, sampler)
        else:
            ids = tok.encode_rendered(render_single(text, system=args.system, thinking=args.think))
            turn(session, tok, ids, args, sampler)
    except BaseException as err:
        error = f"{type(err).__name__}: {err}"
        raise
    finally:
        session.close(error)
    return 0
