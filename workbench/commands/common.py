"""What the commands share: range-checked argument types, the one-line argument error,
and the sampling flags of the generating commands (``run``, ``bench``...).

Every user-facing value is checked where it enters: an ``argparse`` type below turns a
bad value into ``workbench CMD: error: argument --x: ...`` on one line (exit 2), before
any model is loaded.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Callable, Iterator, NoReturn

from workbench.sampling import Sampler

SEED_MAX = 2**64 - 1  # NumPy's seed range for one integer


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` whose usage errors are one line on stderr (``--help`` shows usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def number(kind: type, lo: float | None = None, hi: float | None = None,
           lo_open: bool = False) -> Callable[[str], int | float]:
    """An argparse type parsing ``kind`` (``int`` or ``float``) in ``[lo, hi]`` (``(lo, hi]``
    with ``lo_open``); floats must be finite (nan and inf are refused)."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if lo is not None and (value <= lo if lo_open else value < lo):
            raise argparse.ArgumentTypeError(f"{text} must be {'>' if lo_open else '>='} {lo:g}")
        if hi is not None and value > hi:
            raise argparse.ArgumentTypeError(f"{text} must be <= {hi:g}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def utf8_error(text: str | bytes) -> int | None:
    """Offset of the first byte that is not UTF-8 (None when all are). In ``str`` such
    bytes are lone surrogates, as Python decodes ``sys.argv`` and C-locale stdin."""
    try:
        text.decode("utf-8") if isinstance(text, bytes) else text.encode("utf-8")
    except (UnicodeDecodeError, UnicodeEncodeError) as err:
        return err.start
    return None


def utf8_text(text: str) -> str:
    """An argparse type for free text: refuses bytes that are not UTF-8."""
    bad = utf8_error(text)
    if bad is not None:
        raise argparse.ArgumentTypeError(f"byte {bad} is not valid UTF-8")
    return text


def stdin_lines() -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of each stdin line as strict UTF-8, without the newline.

    Raises ``ValueError`` naming the line and byte when it is not UTF-8 (read from the
    binary buffer where there is one)."""
    for n, raw in enumerate(getattr(sys.stdin, "buffer", None) or sys.stdin, 1):
        bad = utf8_error(raw)
        if bad is not None:
            raise ValueError(f"stdin line {n}: byte {bad} is not valid UTF-8")
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        yield n, text.rstrip("\r\n")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """``--temp --top-p --min-p --top-k --seed`` with ds4's defaults."""
    parser.add_argument("--temp", type=number(float), default=1.0, help="temperature; <= 0 is greedy (default 1.0)")
    parser.add_argument("--top-p", type=number(float, 0.0, 1.0, lo_open=True), default=1.0,
                        help="nucleus sampling mass in (0, 1] (default 1.0: off)")
    parser.add_argument("--min-p", type=number(float, 0.0, 1.0), default=0.05,
                        help="min-p in [0, 1] relative to the top token (default 0.05)")
    parser.add_argument("--top-k", type=number(int, 0), default=0, help="keep the k likeliest tokens (default 0: off)")
    parser.add_argument("--seed", type=number(int, 0, SEED_MAX), default=None,
                        help="sampling seed in 0..2^64-1 (default: random)")


def sampler_from_args(args: argparse.Namespace) -> Sampler:
    return Sampler(temperature=args.temp, top_p=args.top_p, min_p=args.min_p, top_k=args.top_k, seed=args.seed)
