"""``workbench distributed``: pipeline-parallel generation under ``mlx.launch``, and sharded checkpoints.

    mlx.launch --backend ring --hostfile hosts.json -- \\
        workbench distributed run --model M.gguf --prompt "Hello" --max-tokens 32 --temp 0 --save ckpt/
    workbench distributed convert --to-shards <sha>.kv --out ckpt/ --ranks 2
    workbench distributed convert --to-kv ckpt/ --out kvcache/       # -> kvcache/<sha1(text)>.kv
    workbench distributed verify ckpt/

``run`` is started once per rank (by ``mlx.launch``); every rank loads only its layers,
and only the last rank (which holds the output head and the logits) prints: the streamed
text and a summary, or one JSON object with ``--json``. Also runnable as
``python -m workbench.commands.distributed``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np

from workbench.chat import render_single
from workbench.commands.run import RunError, TextStream, print_summary, progress_bar, prompt_text, summary
from workbench.commands.common import add_sampling_args, sampler_from_args
from workbench.errors import WorkbenchError
from workbench.gguf.reader import GGUFFile
from workbench.kv.format import SaveReason
from workbench.kv.shards import checkpoint_to_kv, kv_to_checkpoint, parse_ranges, read_manifest, verify_checkpoint
from workbench.model.config import ModelArgs
from workbench.sampling import top_tokens
from workbench.session import DEFAULT_CTX, Generation
from workbench.state import StateLayout
from workbench.tokenizer import Tokenizer

HELP = "pipeline-parallel generation over mx.distributed (run under mlx.launch) and sharded KV checkpoints"


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    r = sub.add_parser("run", help="one rank of a pipeline-parallel generation (start it with mlx.launch)")
    r.add_argument("--model", required=True, help="ds4 GGUF file (the same path on every host)")
    src = r.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="user prompt text (rendered with the chat template)")
    src.add_argument("--prompt-file", help="file holding the user prompt (UTF-8)")
    src.add_argument("--tokens", help="raw token ids to prefill, comma-separated (no template)")
    r.add_argument("--system", default="", help="system prompt (default: none)")
    r.add_argument("--think", action="store_true", help="thinking mode (prompt ends with <think>)")
    r.add_argument("--ctx", type=int, default=DEFAULT_CTX, help=f"context limit in tokens (default {DEFAULT_CTX})")
    r.add_argument("--chunk", type=int, default=None, help="prefill chunk size (default: min(ctx, 2048))")
    r.add_argument("--max-tokens", type=int, default=128, help="tokens to generate (default 128)")
    add_sampling_args(r)
    r.add_argument("--layers", default=None,
                   help="layer range of each rank, inclusive, e.g. 0-21,22-42 (default: even split)")
    r.add_argument("--logits", choices=("last", "all"), default="last",
                   help="where next-token logits live: the last rank only (default) or broadcast to all")
    r.add_argument("--backend", default="any", help="mx.distributed backend: any, ring, jaccl, mpi (default any)")
    r.add_argument("--restore", default=None, help="sharded checkpoint directory to continue from (any layout)")
    r.add_argument("--save", default=None, help="save a sharded checkpoint here after generating")
    r.add_argument("--durable", action="store_true", help="fsync shards and manifest")
    r.add_argument("--separate-dirs", action="store_true",
                   help="the --save directory is not shared between hosts: every rank writes the manifest")
    r.add_argument("--dump-logits", default=None, help="write the logits after the prefill to this .npy (last rank)")
    r.add_argument("--json", action="store_true", help="print one JSON object (last rank), no progress bar")

    c = sub.add_parser("convert", help="convert between a .kv file and a sharded checkpoint")
    way = c.add_mutually_exclusive_group(required=True)
    way.add_argument("--to-shards", metavar="KV", help=".kv file to split into a sharded checkpoint")
    way.add_argument("--to-kv", metavar="DIR", help="sharded checkpoint to join into one .kv file")
    c.add_argument("--out", required=True,
                   help="checkpoint directory (--to-shards), or .kv path or directory (--to-kv)")
    c.add_argument("--ranks", type=int, default=2, help="number of even layer ranges (--to-shards, default 2)")
    c.add_argument("--layers", default=None, help="explicit inclusive ranges, e.g. 0-2,3-5 (--to-shards)")
    c.add_argument("--model", default=None, help="GGUF giving the exact layout (--to-shards; default: inferred)")
    c.add_argument("--no-checksum", action="store_true", help="write the .kv without the KCS trailer (--to-kv)")
    c.add_argument("--json", action="store_true", help="print the result as JSON")

    v = sub.add_parser("verify", help="read every byte of a sharded checkpoint and check it")
    v.add_argument("directory")
    v.add_argument("--json", action="store_true", help="print the result as JSON")


def _prompt_ids(args: argparse.Namespace, tok: Tokenizer) -> list[int]:
    if args.tokens is not None:
        try:
            return [int(t) for t in args.tokens.split(",") if t.strip()]
        except ValueError:
            raise RunError(f"--tokens {args.tokens!r}: expected comma-separated integers") from None
    if args.prompt is None and args.prompt_file is None:
        return []
    return tok.encode_rendered(render_single(prompt_text(args), system=args.system, thinking=args.think))


def run_rank(args: argparse.Namespace) -> int:
    """One rank of ``workbench distributed run``."""
    from workbench import distributed

    if args.max_tokens < 0:
        raise RunError(f"--max-tokens must be >= 0, got {args.max_tokens}")
    if args.tokens is None and args.prompt is None and args.prompt_file is None and args.restore is None:
        raise RunError("give --prompt, --prompt-file, --tokens or --restore")
    group = distributed.init_group(args.backend)
    speaker = group.rank() == group.size() - 1
    progress, close = progress_bar(speaker and not args.json)
    try:
        ranges = None
        if args.layers is not None:
            with GGUFFile(args.model) as f:
                ranges = parse_ranges(args.layers, ModelArgs.from_metadata(f.metadata).n_layer)
        s = distributed.load(args.model, ctx=args.ctx, group=group, ranges=ranges, logits_on=args.logits,
                             progress=progress)
    finally:
        close()
    try:
        tok = Tokenizer.from_gguf(s.file)
        restored = s.restore_checkpoint(args.restore).n_tokens if args.restore else 0
        ids = _prompt_ids(args, tok)
        progress, close = progress_bar(speaker and not args.json)
        try:
            stats = s.prefill(ids, chunk=args.chunk, progress=progress)
        finally:
            close()
        if s.logits is not None and args.dump_logits:
            np.save(args.dump_logits, np.asarray(s.logits, dtype=np.float32))
        top = top_tokens(s.logits, 5) if s.logits is not None else []
        sampler = sampler_from_args(args)
        stream = TextStream(tok, sys.stdout) if speaker and not args.json else None
        t0 = time.perf_counter()
        room = min(args.max_tokens, s.ctx - s.n_tokens)
        out = s.decode(room, sampler, stop=[tok.eos], on_token=stream) if room > 0 else []
        gen = Generation(len(ids), stats, top, out, time.perf_counter() - t0)
        saved = None
        if args.save:
            saved = s.save_checkpoint(args.save, tok.decode(s.tokens), reason=SaveReason.SHUTDOWN, durable=args.durable,
                                      shared_dir=not args.separate_dirs)
        if not speaker:
            return 0
        rec: dict[str, Any] = summary(gen, tok)
        rec.update({
            "ranks": s.size, "layers": [[a, b - 1] for a, b in s.ranges], "restored_tokens": restored,
            "n_tokens": s.n_tokens, "hc_bytes_per_token": s.hc_bytes_per_token(), "traffic": vars(s.traffic),
            "saved": None if saved is None else {"manifest": str(saved.manifest), "bytes": saved.bytes,
                                                 "seconds": round(saved.seconds, 4)},
        })
        if stream is not None:
            stream.finish()
            print_summary(rec, sys.stdout)
            print(f"{s.size} ranks, layers {rec['layers']}; hyper-connection state {rec['hc_bytes_per_token']} B/token "
                  f"per boundary; this rank received {s.traffic.hc_received_bytes} B", file=sys.stdout)
        else:
            print(json.dumps(rec, ensure_ascii=False), flush=True)
        return 0
    finally:
        s.close()


def convert(args: argparse.Namespace) -> int:
    if args.to_shards:
        layout = None
        if args.model:
            with GGUFFile(args.model) as f:
                layout = StateLayout.from_args(ModelArgs.from_metadata(f.metadata))
        if args.layers:
            if layout is None:
                raise RunError("--layers needs --model (the layer count comes from the model)")
            ranges: Any = parse_ranges(args.layers, layout.n_layer)
        else:
            ranges = args.ranks
        m = kv_to_checkpoint(args.to_shards, args.out, ranges, layout)
        rec = {"checkpoint": args.out, "tokens": m.n_tokens, "layers": [[a, b - 1] for a, b in m.ranges],
               "bytes": m.total_bytes, "shards": [s.file for s in m.shards]}
    else:
        dest = checkpoint_to_kv(args.to_kv, args.out, checksum=not args.no_checksum)
        rec = {"kv": str(dest), "bytes": dest.stat().st_size}
    print(json.dumps(rec) if args.json else "  ".join(f"{k}: {v}" for k, v in rec.items()))
    return 0


def verify(args: argparse.Namespace) -> int:
    problems = verify_checkpoint(args.directory)
    rec: dict[str, Any] = {"checkpoint": args.directory, "ok": not problems, "problems": problems}
    if not problems:
        m = read_manifest(args.directory)
        rec.update(tokens=m.n_tokens, ctx=m.ctx, layers=[[a, b - 1] for a, b in m.ranges], bytes=m.total_bytes)
    if args.json:
        print(json.dumps(rec))
    else:
        print(f"{args.directory}: " + ("ok, " + f"{rec['tokens']} tokens, layers {rec['layers']}, {rec['bytes']} bytes"
                                       if not problems else "BROKEN"))
        for p in problems:
            print(f"  {p}")
    return 0 if not problems else 1


def run(args: argparse.Namespace) -> int:
    return {"run": run_rank, "convert": convert, "verify": verify}[args.action](args)


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``python -m workbench.commands.distributed``."""
    from workbench import _blas

    _blas.preload()
    parser = argparse.ArgumentParser(prog="workbench distributed", description=HELP)
    configure(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except WorkbenchError as err:
        print(f"workbench distributed {args.action}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
