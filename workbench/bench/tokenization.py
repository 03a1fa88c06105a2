"""Tokenizer throughput: ``workbench.tokenizer.Tokenizer`` (built from the GGUF's
vocabulary arrays) against Hugging Face ``tokenizers`` used directly with the official
``tokenizer.json``, on the same text.

The text is ds4's speed-bench ``promessi_sposi.txt`` (Italian prose, 1.3 MB) when the
shared data is present, else Python standard-library sources (about the same size).
Figures: ``encode`` (plain text) and ``encode_rendered`` (the text as one chat turn,
specials recognised) against the reference's ``encode`` of the same string.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Any

from workbench.bench.core import BenchContext, BenchResult, Figure, best_pair
from workbench.bench.report import grouped_bars

NAME = "tokenizer"
PROMESSI = Path(__file__).resolve().parents[3] / "shared" / "data" / "ds4" / "speed-bench" / "promessi_sposi.txt"
STDLIB_BYTES = 1_300_000


def bench_text(max_bytes: int | None = None) -> tuple[str, str]:
    """(text, where it came from): promessi_sposi.txt if present, else stdlib sources;
    cut to ``max_bytes`` characters when given."""
    if PROMESSI.exists():
        text, source = PROMESSI.read_text(encoding="utf-8"), PROMESSI.name
    else:
        parts, size = [], 0
        for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
            parts.append(p.read_text(encoding="utf-8", errors="replace"))
            size += len(parts[-1])
            if size >= STDLIB_BYTES:
                break
        text, source = "".join(parts), "Python standard-library sources"
    return (text[:max_bytes] if max_bytes else text), source


def run(ctx: BenchContext, max_bytes: int | None = None) -> BenchResult:
    """Run the benchmark (``max_bytes`` cuts the text; quick mode: its first 256,000
    characters)."""
    import tokenizers

    from workbench.chat import render_single
    from workbench.gguf.reader import GGUFFile
    from workbench.tokenizer import Tokenizer
    from workbench.vocab import tokenizer_json_path

    result = BenchResult(NAME)
    text, source = bench_text(max_bytes or ctx.pick(256_000, None))
    ctx.step(f"tokenizer: building from {ctx.tiny_model().name}")
    with GGUFFile(ctx.tiny_model()) as f:
        ours = Tokenizer.from_gguf(f)
    ref = tokenizers.Tokenizer.from_file(tokenizer_json_path())
    rendered = render_single(text)
    n_bytes = len(text.encode("utf-8"))
    reps = ctx.repeats
    for what, ours_fn, string in (("encode", ours.encode, text), ("encode_rendered", ours.encode_rendered, rendered)):
        ctx.step(f"tokenizer: {what}, {n_bytes / 1e6:.2f} MB")
        ids = ours_fn(string)
        ref_ids = ref.encode(string, add_special_tokens=False).ids
        if ids != ref_ids:
            result.notes.append(f"tokenizer {what}: ids differ from tokenizer.json's on {source} "
                                f"({len(ids)} vs {len(ref_ids)} tokens)")
        ours_s, ref_s = best_pair(lambda: ours_fn(string), lambda: ref.encode(string, add_special_tokens=False).ids,
                                  reps)
        result.add_row({"call": what, "text": source, "bytes": n_bytes, "tokens": len(ids), "workbench_s": ours_s,
                        "tokenizers_s": ref_s, "workbench_mbps": n_bytes / ours_s / 1e6, "tokenizers_mbps": n_bytes / ref_s / 1e6,
                        "workbench_tokens_per_s": len(ids) / ours_s})
        result.figures.append(Figure(NAME, f"tokenizer.{what}", f"{source}, {n_bytes / 1e6:.2f} MB, {len(ids):,} tokens",
                                     n_bytes / ours_s / 1e6, "MB/s", "tokenizers.Tokenizer.encode, official tokenizer.json",
                                     n_bytes / ref_s / 1e6, True, f"{len(ids) / ours_s:,.0f} tokens/s"))
    result.charts = charts(result.tables)
    return result


def charts(tables: dict[str, list[dict]]) -> list[Any]:
    """The benchmark's plotly figures from its tables (as run, or read back from the CSVs)."""
    rows = tables[NAME]
    series = [("workbench Tokenizer", [r["workbench_mbps"] for r in rows]),
              ("tokenizers (tokenizer.json)", [r["tokenizers_mbps"] for r in rows])]
    return [grouped_bars([r["call"] for r in rows], series, "Tokenizer throughput", "MB/s")]
