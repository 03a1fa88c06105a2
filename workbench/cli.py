"""The ``workbench`` command line: one sub-command per module in ``workbench.commands``.

Each command module defines ``HELP`` (one line), ``configure(parser)`` and
``run(args) -> int``. Every command accepts ``--json`` where it prints results, and on
bad input exits non-zero with a one-line reason on stderr. Exit codes: 0 done; 1 bad input
(a :class:`WorkbenchError`), a failing machine (full disk, no memory) or work that
failed in part (a checkpoint that could not be saved, a file that failed ``kv verify``);
2 a bad argument (range-checked before anything is loaded); 70 a bug (one line, the
traceback with ``WORKBENCH_TRACEBACK=1``); 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from workbench.commands.common import ArgumentParser
from workbench.errors import WorkbenchError

COMMANDS = {
    "synth": "workbench.commands.synth",
    "inspect": "workbench.commands.inspect",
    "doctor": "workbench.commands.doctor",
    "run": "workbench.commands.run",
    "vectors": "workbench.commands.vectors",
    "kv": "workbench.commands.kv",
    "lab": "workbench.commands.lab",
    "demo": "workbench.commands.demo",
    "bench": "workbench.commands.bench",
    "distributed": "workbench.commands.distributed",
}


def _available() -> dict:
    mods = {}
    for name, path in COMMANDS.items():
        try:
            mods[name] = importlib.import_module(path)
        except ModuleNotFoundError as err:
            if err.name != path:  # a real import error inside an existing command
                raise
    return mods


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="workbench", description="DeepSeek V4 Flash workbench (MLX, ds4 GGUF, KV cache)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, mod in _available().items():
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.configure(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from workbench import _blas

    _blas.preload()
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except WorkbenchError as err:
        print(f"workbench {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"workbench {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `workbench kv ls DIR | head`: the reader left, stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except (OSError, MemoryError) as err:  # the machine, not the input: a full disk, no memory
        print(f"workbench {args.command}: error: {_describe(err)}", file=sys.stderr)
        return 1
    except Exception as err:  # a bug: still one line; WORKBENCH_TRACEBACK=1 shows where
        if os.environ.get("WORKBENCH_TRACEBACK"):
            raise
        print(f"workbench {args.command}: internal error: {_describe(err)} "
              f"(rerun with WORKBENCH_TRACEBACK=1 for the traceback)", file=sys.stderr)
        return 70


def _describe(err: BaseException) -> str:
    """One line for an unexpected exception: its type, its file if any, its message."""
    if isinstance(err, OSError) and err.strerror:
        where = f"{err.filename}: " if err.filename else ""
        return f"{where}{err.strerror}"
    return f"{type(err).__name__}: {err}".splitlines()[0] if str(err) else type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
