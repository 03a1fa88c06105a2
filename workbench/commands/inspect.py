"""``workbench inspect FILE [--json]``: metadata, tensor table, bytes per type, routed expert
types per layer (and the KV quant bits ds4 derives from them), ds4 layout check.

Exits 1 when the file is not a valid ds4-layout GGUF (the problems are listed); a file
that is not even well-formed GGUF raises GGUFError, which the CLI prints on one line.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from workbench.gguf.layout import ds4_compat_problems, expert_types, routed_quant_bits, validate_ds4
from workbench.gguf.reader import GGUFFile, value_type_name
from workbench.spec.args import ModelArgs

HELP = "show a GGUF file's metadata and tensors and check it against the ds4 layout"
ARRAY_HEAD = 8  # arrays longer than this are summarised: type, length, first items
MiB = 1 << 20


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="GGUF file")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _json_safe(v: Any) -> Any:
    """Non-finite floats become strings so the output stays strict JSON."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, list):
        return [_json_safe(x) for x in v]
    return v


def summarize_metadata(f: GGUFFile) -> dict[str, Any]:
    """key -> value, with arrays over ARRAY_HEAD items replaced by
    ``{"type": "array[T]", "length": n, "head": first ARRAY_HEAD items}``."""
    out: dict[str, Any] = {}
    for key, value in f.metadata.items():
        if isinstance(value, list) and len(value) > ARRAY_HEAD:
            out[key] = {"type": value_type_name(f.metadata_types[key]), "length": len(value),
                        "head": _json_safe(value[:ARRAY_HEAD])}
        else:
            out[key] = _json_safe(value)
    return out


def report(f: GGUFFile) -> dict[str, Any]:
    """The whole inspection as one JSON-ready dict (the ``--json`` output)."""
    tensors = [{"name": t.name, "type": t.type_name, "shape": list(t.shape), "offset": t.offset,
                "nbytes": t.nbytes} for t in f.tensors.values()]
    per_type: dict[str, int] = {}
    for t in f.tensors.values():
        per_type[t.type_name] = per_type.get(t.type_name, 0) + t.nbytes
    problems = validate_ds4(f)
    # compared only for a valid file (its metadata is complete and consistent)
    compat = None if problems else ds4_compat_problems(ModelArgs.from_metadata(f.metadata))
    return {
        "path": f.path, "version": f.version, "metadata": summarize_metadata(f), "tensors": tensors,
        "bytes_per_type": dict(sorted(per_type.items(), key=lambda kv: -kv[1])),
        "expert_types": [{"layer": L, "gate": g, "up": u, "down": d} for L, g, u, d in expert_types(f)],
        "kv_quant_bits": routed_quant_bits(f),
        "n_tensors": len(f.tensors), "file_bytes": f.file_size, "valid": not problems,
        "problems": problems, "ds4_compat": compat,
    }


def expert_runs(rows: list[dict[str, Any]]) -> list[tuple[int, int, str]]:
    """(first layer, last layer, "gate/up/down") for each run of consecutive layers whose
    routed experts have the same types."""
    runs: list[tuple[int, int, str]] = []
    for row in rows:
        types = f"{row['gate']}/{row['up']}/{row['down']}"
        if runs and runs[-1][2] == types and runs[-1][1] == row["layer"] - 1:
            runs[-1] = (runs[-1][0], row["layer"], types)
        else:
            runs.append((row["layer"], row["layer"], types))
    return runs


def _print_text(r: dict[str, Any]) -> None:
    print(f"{r['path']}: GGUF v{r['version']}, {r['n_tensors']} tensors, {r['file_bytes'] / MiB:,.1f} MiB")
    print("\nmetadata:")
    for key, value in r["metadata"].items():
        if isinstance(value, dict):
            value = f"[{value['length']:,} x {value['type'][6:-1]}] {value['head']}..."
        print(f"  {key} = {value}")
    print("\ntensors:")
    width = max((len(t["name"]) for t in r["tensors"]), default=4)
    print(f"  {'name':<{width}}  {'type':<8} {'shape':<24} {'MiB':>10}")
    for t in r["tensors"]:
        print(f"  {t['name']:<{width}}  {t['type']:<8} {str(t['shape']):<24} {t['nbytes'] / MiB:>10.2f}")
    print("\nbytes per type:")
    for name, n in r["bytes_per_type"].items():
        print(f"  {name:<8} {n:>16,} B {n / MiB:>12,.1f} MiB")
    print("\nrouted experts (gate/up/down) per layer:")
    for first, last, types in expert_runs(r["expert_types"]):
        print(f"  layers {first}-{last}: {types}" if last > first else f"  layer {first}: {types}")
    print(f"  KV header quant bits (as ds4 derives them): {r['kv_quant_bits']}")
    if r["valid"]:
        print("\nds4 layout: valid")
    else:
        print(f"\nds4 layout: {len(r['problems'])} problem(s)")
        for p in r["problems"]:
            print(f"  - {p}")
    if r["ds4_compat"]:
        print("\ndiffers from ds4's compiled-in constants (ds4 itself would refuse this file):")
        for p in r["ds4_compat"]:
            print(f"  - {p}")


def run(args: argparse.Namespace) -> int:
    with GGUFFile(args.file) as f:
        r = report(f)
    if args.json:
        print(json.dumps(r))
    else:
        _print_text(r)
    return 0 if r["valid"] else 1
