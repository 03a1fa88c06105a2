"""Flags shared by the generating commands (``run``, ``chat``, ``bench``...): sampling."""

from __future__ import annotations

import argparse

from workbench.sampling import Sampler


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """``--temp --top-p --min-p --top-k --seed`` with ds4's defaults."""
    parser.add_argument("--temp", type=float, default=1.0, help="temperature; <= 0 is greedy (default 1.0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    parser.add_argument("--min-p", type=float, default=0.05, help="min-p relative to the top token (default 0.05)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens (default 0: off)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")


def sampler_from_args(args: argparse.Namespace) -> Sampler:
    return Sampler(temperature=args.temp, top_p=args.top_p, min_p=args.min_p, top_k=args.top_k, seed=args.seed)
