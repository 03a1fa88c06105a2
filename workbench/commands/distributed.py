"""``workbench distributed``: sharded (DSVL) KV checkpoints of pipeline-parallel sessions.

    workbench distributed convert --to-shards <sha>.kv --out ckpt/ --ranks 2
    workbench distributed convert --to-kv ckpt/ --out kvcache/       # -> kvcache/<sha1(text)>.kv
    workbench distributed verify ckpt/

Generation over several ranks is ``workbench run`` started by ``mlx.launch`` (see
``workbench.commands.run``). Also runnable as ``python -m workbench.commands.distributed``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from workbench.commands.common import ArgumentParser, number
from workbench.commands.run import RunError
from workbench.errors import WorkbenchError
from workbench.gguf.reader import GGUFFile
from workbench.kv.shards import checkpoint_to_kv, kv_to_checkpoint, parse_ranges, read_manifest, verify_checkpoint
from workbench.spec.args import ModelArgs
from workbench.spec.statelayout import StateLayout

HELP = "sharded KV checkpoints of pipeline-parallel sessions: convert to and from .kv, verify"


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    c = sub.add_parser("convert", help="convert between a .kv file and a sharded checkpoint")
    way = c.add_mutually_exclusive_group(required=True)
    way.add_argument("--to-shards", metavar="KV", help=".kv file to split into a sharded checkpoint")
    way.add_argument("--to-kv", metavar="DIR", help="sharded checkpoint to join into one .kv file")
    c.add_argument("--out", required=True,
                   help="checkpoint directory (--to-shards), or .kv path or directory (--to-kv)")
    c.add_argument("--ranks", type=number(int, 1, 1024), default=2, help="number of even layer ranges (--to-shards, default 2)")
    c.add_argument("--layers", default=None, help="explicit inclusive ranges, e.g. 0-2,3-5 (--to-shards)")
    c.add_argument("--model", default=None, help="GGUF giving the exact layout (--to-shards; default: inferred)")
    c.add_argument("--no-checksum", action="store_true", help="write the .kv without the workbench footer (--to-kv)")
    c.add_argument("--json", action="store_true", help="print the result as JSON")

    v = sub.add_parser("verify", help="read every byte of a sharded checkpoint and check it")
    v.add_argument("directory", help="the checkpoint directory (holding manifest.json)")
    v.add_argument("--json", action="store_true", help="print the result as JSON")


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
    return {"convert": convert, "verify": verify}[args.action](args)


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``python -m workbench.commands.distributed``."""
    from workbench import _blas

    _blas.preload()
    parser = ArgumentParser(prog="workbench distributed", description=HELP)
    configure(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except WorkbenchError as err:
        print(f"workbench distributed {args.action}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
