"""``workbench kv ls|show|verify|gc|export|import``: inspect and maintain a KV checkpoint directory.

Works on ds4-server cache directories without a model: a payload whose header says
43 layers x 512 x 128 x 129280 is read with ds4-server's layout; other layouts come from
``--model F.gguf`` metadata, or are inferred from the payload header (and said so).
``ls``/``show``/``verify`` never modify anything except ``verify --quarantine``, which
moves failing files to ``DIR/quarantine/``; ``gc`` sweeps dead temp files, removes
broken chains (``workbench.kv.chainstore``) and evicts to a budget; ``export`` writes
any entry (flat or chained) as a ds4 ``.kv`` file; ``import`` stores a directory of ds4
``.kv`` files as chains.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from workbench.commands.common import number
from workbench.errors import WorkbenchError
from workbench.kv.errors import KVFormatError
from workbench.kv.events import BudgetHeld
from workbench.kv.chain import CHAIN_SUFFIX, chain_summary, walk
from workbench.kv.dsv4 import payload_size
from workbench.kv.chainstore import MAX_DEPTH
from workbench.kv.header import TEXT_OFFSET, ExtFlag, KVHeader, parse_header
from workbench.kv.inspection import file_layout, file_trailer, infer_layout, inspect_file, stored_text
from workbench.kv.trailers import Trailer
from workbench.safeopen import open_regular
from workbench.kv.maintenance import MiB, verify_chain_file, verify_file
from workbench.kv.store import KVStore
from workbench.spec.statelayout import StateLayout

HELP = "list, show, verify and garbage-collect KV checkpoint (.kv) files"
PREVIEW = 160  # characters of text shown


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="kv_command", required=True)
    p = sub.add_parser("ls", help="list the checkpoints and other files of a cache directory")
    p.add_argument("dir", type=Path, help="cache directory (holds <sha1>.kv files)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p = sub.add_parser("show", help="header, text preview and per-layer payload bytes of one .kv file")
    p.add_argument("file", type=Path, help="one .kv file")
    p.add_argument("--model", type=Path, help="GGUF whose metadata gives the state layout")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p = sub.add_parser("verify", help="read every byte of every checkpoint and run every check")
    p.add_argument("path", type=Path, help="cache directory or one .kv file")
    p.add_argument("--model", type=Path, help="GGUF whose metadata gives the state layout; files of another model "
                                              "(fingerprint, else model id and quant bits) get a note")
    p.add_argument("--ctx", type=number(int, 1), help="runtime context in tokens the files must fit "
                                                     "(default: each file's own)")
    p.add_argument("--quarantine", action="store_true", help="move failing files to DIR/quarantine/")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p = sub.add_parser("lookup", help="why a prompt does (not) hit: longest stored prefix, divergence, alignment")
    p.add_argument("dir", type=Path, help="cache directory")
    p.add_argument("--prompt-file", type=Path, required=True,
                   help="the user prompt (UTF-8), rendered as `workbench run` does; see --rendered")
    p.add_argument("--rendered", action="store_true", help="the prompt file is already the rendered chat text")
    p.add_argument("--system", default="", help="system prompt used when rendering (default: none)")
    p.add_argument("--think", action="store_true", help="render in thinking mode, as `run --think`")
    p.add_argument("--model", type=Path, help="GGUF whose tokenizer makes token positions exact (default: estimated)")
    p.add_argument("--ctx", type=int, help="runtime context (default: any file's)")
    p.add_argument("--min-tokens", type=int, default=512, help="lookup floor and save minimum (default 512)")
    p.add_argument("--kv-align", type=int, default=2048, help="the boundary alignment in use (default 2048)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p = sub.add_parser("gc", help="remove dead temp files and broken chains, evict checkpoints down to a budget")
    p.add_argument("dir", type=Path, help="cache directory (holds <sha1>.kv files and chain/)")
    p.add_argument("--budget-mb", type=number(float, 0, lo_open=True),
                   help="budget in MiB (> 0) for all files in DIR (default: evict nothing)")
    p.add_argument("--dry-run", action="store_true", help="only list what would be evicted")
    p.add_argument("--json", action="store_true", help="print one JSON object")


    p = sub.add_parser("export", help="write one entry (flat or chained) as a ds4 .kv file")
    p.add_argument("dir", type=Path, help="cache directory holding the entry")
    p.add_argument("entry", help="the entry's SHA-1 (its file name without extension)")
    p.add_argument("--out", type=Path, required=True, help="the .kv file to write")
    p.add_argument("--model", type=Path, help="GGUF whose metadata gives the state layout")
    p = sub.add_parser("import", help="store every ds4 .kv file of a directory as chain entries")
    p.add_argument("src", type=Path, help="directory of ds4 .kv files (not modified)")
    p.add_argument("--into", type=Path, required=True, help="cache directory to store the chains in")
    p.add_argument("--max-depth", type=number(int, 1), default=MAX_DEPTH, help="links above a base before re-basing")
    p.add_argument("--model", type=Path, help="GGUF whose metadata gives the state layout")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    return {"ls": _ls, "show": _show, "verify": _verify, "gc": _gc, "lookup": _lookup, "export": _export,
            "import": _import}[args.kv_command](args)


# ---- helpers --------------------------------------------------------------------------
def _model_layout(path: Path | None) -> tuple[StateLayout | None, str]:
    if path is None:
        return None, ""
    from workbench.gguf.reader import GGUFFile
    from workbench.spec.args import ModelArgs

    with GGUFFile(path) as g:
        return StateLayout.from_args(ModelArgs.from_metadata(g.metadata)), f"from {path}"


def _model_identity(path: Path | None) -> dict | None:
    """``checkpoint_identity`` of ``--model`` (None without one)."""
    if path is None:
        return None
    from workbench.gguf.fingerprint import checkpoint_identity
    from workbench.gguf.reader import GGUFFile

    with GGUFFile(path) as g:
        return checkpoint_identity(g)


def _iso(ts: int) -> str | None:
    """ISO-8601 UTC of a header timestamp (None for 0; a value no calendar holds, e.g.
    beyond year 9999 in a crafted file, is shown as such instead of failing the listing)."""
    if not ts:
        return None
    try:
        return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return f"out of range ({ts})"


def _age(ts: int, now: float) -> str:
    if not ts:
        return "-"
    s = max(0, now - ts)
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s / n:.1f}{unit}"
    return f"{s:.0f}s"


def _preview(text: bytes, n: int = PREVIEW) -> str:
    s = text.decode("utf-8", "replace")
    if len(s) > n:
        s = s[: n // 2] + " … " + s[-n // 2:]
    return json.dumps(s, ensure_ascii=False)[1:-1]


def _flags(ext: int) -> list[str]:
    return [f.name.lower() for f in ExtFlag if ext & f]


def _header_dict(h: KVHeader) -> dict[str, Any]:
    d = asdict(h)
    d.update(reason=h.reason.name.lower(), ext_flags=_flags(h.ext_flags), created_at=_iso(h.created_at),
             last_used=_iso(h.last_used), reserved21=h.reserved21.hex(), abi_name=h.abi_name, stripped=h.stripped)
    return d


def _trailer_dict(t: Trailer) -> dict[str, Any]:
    """The trailer fields ``ls``/``show`` print: parts, title, tool ids, footer."""
    return {"trailer": t.kind, "trailer_bytes": t.bytes, "title": t.title_text,
            "tool_map_entries": t.tool_map_entries, "tool_ids": list(t.tool_ids) if t.tool_ids is not None else None,
            "checksum": None if t.checksums is None else ("footer" if t.checksums.version == 2 else "bit 3 trailer"),
            "model_fingerprint": t.fingerprint.hex() if t.fingerprint is not None else None, "notes": list(t.notes)}


def _print(obj: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj, indent=1, default=str))


def _abi_lines(h: KVHeader, r: dict[str, Any]) -> list[str]:
    """The ABI, title, tool map, checksum place and payload state of a file, one per line."""
    lines = [f"abi: {h.abi_name}"]
    if r["title"] is not None:
        lines.append(f"title: {json.dumps(r['title'], ensure_ascii=False)}")
    if r["tool_ids"] is not None:
        lines.append(f"tool map: {len(r['tool_ids'])} ids ({', '.join(r['tool_ids'][:4])}"
                     f"{', ...' if len(r['tool_ids']) > 4 else ''})")
    if r["checksum"] is not None:
        fp = r["model_fingerprint"]
        lines.append(f"checksum: {r['checksum']}" + (f", model fingerprint {fp[:16]}..." if fp else ""))
    if h.stripped:
        lines.append("payload: none (ds4 agent /strip): listed, never loaded")
    return lines


# ---- ls -----------------------------------------------------------------------------------
def _ls(args: argparse.Namespace) -> int:
    store = KVStore.readonly(args.dir)
    now = time.time()
    entries = store.entries()
    others = store.others()
    rows = []
    for e in entries:
        try:
            text = stored_text(e.path, e.header)
        except KVFormatError as err:  # removed or unreadable since the listing
            text = f"({err})".encode()
        trailer = _trailer_dict(file_trailer(e.path, e.header))
        rows.append({"sha": e.sha, "path": str(e.path), "layout": "chain" if e.chained else "flat",
                     "parent": e.parent, "depth": e.depth, "tokens": e.tokens, "ctx": e.ctx,
                     "reason": e.header.reason.name.lower(), "hits": e.header.hits, "bytes": e.file_size,
                     "created_at": _iso(e.header.created_at), "last_used": _iso(e.header.last_used),
                     "abi": e.header.abi, "abi_name": e.header.abi_name, "model_id": e.header.model_id,
                     "quant_bits": e.header.quant_bits, "payload_bytes": e.header.payload_bytes,
                     "ext_flags": _flags(e.header.ext_flags), "score": store.score(e, now),
                     "text_bytes": e.text_bytes, "preview": _preview(text, 60), **trailer})
    other_rows = [{"path": str(o.path), "kind": o.kind, "bytes": o.size, "problem": o.problem} for o in others]
    total = sum(r["bytes"] for r in rows) + sum(o["bytes"] for o in other_rows)
    out = {"dir": str(args.dir), "entries": rows, "others": other_rows, "total_bytes": total}
    if args.json:
        _print(out, True)
        return 0
    print(f"{args.dir}: {len(rows)} checkpoints, {len(other_rows)} other files, {total / MiB:,.1f} MiB in all")
    if rows:
        print(f"  {'sha':<12} {'layout':<20} {'tokens':>8} {'ctx':>8} {'reason':<13} {'hits':>4} {'MiB':>9} "
              f"{'used':>6} abi crc  text")
        for r, e in zip(rows, entries):
            link = "flat" if not e.chained else "chain base" if e.parent is None \
                else f"chain {e.depth} <- {e.parent[:8]}"
            print(f"  {r['sha'][:12]} {link:<20} {r['tokens']:>8,} {r['ctx']:>8,} {r['reason']:<13} {r['hits']:>4} "
                  f"{r['bytes'] / MiB:>9.1f} {_age(e.header.last_used, now):>6} {r['abi']:>3} "
                  f"{'yes' if r['checksum'] else 'no ':<4} {r['preview']}")
            for line in _abi_lines(e.header, r):
                print(f"  {'':<12} {line}")
    for o in other_rows:
        print(f"  [{o['kind']}] {Path(o['path']).name}  {o['bytes'] / MiB:.2f} MiB  {o['problem']}")
    return 0


# ---- show -----------------------------------------------------------------------------------
def _show(args: argparse.Namespace) -> int:
    path: Path = args.file
    if path.suffix == CHAIN_SUFFIX:
        return _show_chain(args)
    layout, note = _model_layout(args.model)
    ins = inspect_file(path, layout, note)
    header, summary, trailer, layout, rows = ins.header, ins.summary, ins.trailer, ins.layout, ins.breakdown
    by_kind = ins.bytes_by_kind
    out = {"path": str(path), "header": _header_dict(header),
           "payload_header": asdict(summary.header) if summary is not None else None,
           "layout": asdict(layout) if layout is not None else None, "layout_source": ins.layout_note,
           **_trailer_dict(trailer), "text_preview": _preview(ins.text), "bytes_by_kind": by_kind, "layers": rows,
           "payload_accounted": sum(by_kind.values())}
    if args.json:
        _print(out, True)
        return 0
    h = header
    print(f"{path}")
    print(f"  tokens {h.tokens:,}  ctx {h.ctx:,}  reason {h.reason.name.lower()}  hits {h.hits}  "
          f"quant {h.quant_bits}-bit  model id {h.model_id}  flags {','.join(_flags(h.ext_flags)) or '-'}")
    for line in _abi_lines(h, out):
        print(f"  {line}")
    print(f"  created {_iso(h.created_at)}  last used {_iso(h.last_used)}")
    print(f"  file {h.file_size:,} B = header 52 + text {h.text_bytes:,} + payload {h.payload_bytes:,} "
          f"+ trailer {trailer.bytes:,} ({trailer.kind})")
    for n in trailer.notes:
        print(f"  note: {n}")
    print(f"  text: {out['text_preview']}")
    if summary is None or layout is None:
        print(f"  payload: none ({ins.layout_note})")
        return 0
    ph = summary.header
    print(f"  payload: DSV4 version {ph.version}, prefill chunk {ph.prefill_chunk}, raw cap {ph.raw_cap}, "
          f"raw window {ph.raw_window}, "
          f"comp cap {ph.comp_cap}, raw rows {ph.raw_live}")
    print(f"  layout: {ins.layout_note}")
    kinds = [k for k in ("raw window", "compressed", "indexer", "frontiers") if k in by_kind]
    print(f"\n  {'layer':>5} {'ratio':>5} " + " ".join(f"{k:>12}" for k in kinds) + f" {'total':>12}")
    for L in range(layout.n_layer):
        per = {r["kind"]: r["bytes"] for r in rows if r["layer"] == L}
        print(f"  {L:>5} {layout.ratios[L]:>5} " + " ".join(f"{per.get(k, 0):>12,}" for k in kinds)
              + f" {sum(per.values()):>12,}")
    print("\n  bytes by kind: " + ", ".join(f"{k} {v:,}" for k, v in by_kind.items()))
    return 0


def _show_chain(args: argparse.Namespace) -> int:
    """``kv show`` of a chain entry: its header, its chain (base first) and what each file adds."""
    path: Path = args.file
    try:
        links = walk(path)
    except KVFormatError as err:
        raise WorkbenchError(str(err)) from err
    leaf = links[-1]
    summary = chain_summary(path)
    layout = _entry_layout(path, args.model)
    flat = payload_size(layout, leaf.header.tokens, summary.header.ctx)
    chain = [{"path": str(k.path), "tokens": k.header.tokens, "depth": k.ref.depth, "parent": k.ref.parent,
              "bytes": k.header.file_size} for k in links]
    out = {"path": str(path), "header": _header_dict(leaf.header), "payload_header": asdict(summary.header),
           "flat_payload_bytes": flat, "chain": chain, "chain_bytes": sum(c["bytes"] for c in chain),
           "text_preview": _preview(stored_text(path, leaf.header))}
    if args.json:
        _print(out, True)
        return 0
    h = leaf.header
    print(f"{path}")
    print(f"  chain entry: tokens {h.tokens:,}  ctx {h.ctx:,}  reason {h.reason.name.lower()}  hits {h.hits}  "
          f"depth {leaf.ref.depth}")
    print(f"  file {h.file_size:,} B; the whole chain {out['chain_bytes']:,} B; flat payload {flat:,} B")
    for c in chain:
        print(f"    depth {c['depth']:>3}  {Path(c['path']).name}  {c['tokens']:>8,} tokens  {c['bytes']:>12,} B")
    print(f"  text: {out['text_preview']}")
    return 0


# ---- verify -----------------------------------------------------------------------------------
def _verify(args: argparse.Namespace) -> int:
    layout, note = _model_layout(args.model)
    target: Path = args.path
    if target.is_dir():
        store = KVStore.readonly(target)
        reports = store.verify(layout, args.ctx, quarantine=args.quarantine, layout_note=note,
                               identity=_model_identity(args.model))
        quarantined = args.quarantine
    else:
        reports = [verify_chain_file(target, layout, args.ctx, note) if target.suffix == CHAIN_SUFFIX else
                   verify_file(target, layout, args.ctx, note, identity=_model_identity(args.model))]
        quarantined = False
    bad = [r for r in reports if not r.ok]
    stuck = [r for r in bad if r.quarantine_error]
    if args.json:
        _print({"path": str(target), "checked": len(reports), "failed": len(bad), "quarantined": quarantined,
                "files": [{"path": str(r.path), "ok": r.ok, "error": r.error, "checksum": r.checksum,
                           "layout": r.layout_note, "notes": list(r.notes),
                           "tokens": r.header.tokens if r.header else None,
                           "moved_to": None if r.moved_to is None else str(r.moved_to),
                           "quarantine_error": r.quarantine_error} for r in reports]}, True)
    else:
        for r in reports:
            state = f"ok  ({r.checksum} checksum)" if r.ok else "FAIL " + r.error
            print(f"  {r.path.name}  {state}")
            for n in r.notes:
                print(f"      note: {n}")
        moved = f" ({len(bad) - len(stuck)} moved to quarantine/)" if quarantined and bad else ""
        print(f"{target}: {len(reports) - len(bad)} ok, {len(bad)} failed{moved}")
    if stuck:
        raise WorkbenchError(f"{len(stuck)} failing file(s) not quarantined: {stuck[0].quarantine_error}")
    return 1 if bad else 0


# ---- gc -----------------------------------------------------------------------------------------
def _gc(args: argparse.Namespace) -> int:
    store = KVStore(args.dir, budget_mb=args.budget_mb, create=False, maintain=False)
    swept = [] if args.dry_run else store.sweep_tmp()
    orphans = store.orphans() if args.dry_run else store.remove_orphans()
    evicted = store.evict_to_budget(dry_run=args.dry_run)
    total = store.total_bytes()
    out = {"dir": str(args.dir), "budget_bytes": store.budget_bytes, "dry_run": args.dry_run,
           "swept": [str(s.path) for s in swept],
           "orphans": [{"path": str(p), "bytes": n, "why": why} for p, n, why in orphans],
           "evicted": [{"path": str(e.path), "tokens": e.tokens, "bytes": e.bytes, "score": e.score,
                        "save_reason": e.save_reason} for e in evicted],
           "total_bytes": total - (sum(e.bytes for e in evicted) if args.dry_run else 0)}
    for held in (e for e in store.events if isinstance(e, BudgetHeld)):
        print(f"workbench kv: warning: {held.message}", file=sys.stderr)
        break
    if args.json:
        _print(out, True)
        return 0
    verb = "would evict" if args.dry_run else "evicted"
    for e in evicted:
        print(f"  {verb} {e.path.name}  {e.tokens:,} tokens  {e.bytes / MiB:.1f} MiB  score {e.score:.3g}")
    for s in swept:
        print(f"  removed stale temp file {s.path.name}")
    for p, n, why in orphans:
        print(f"  {'would remove' if args.dry_run else 'removed'} orphan {p.name}  {n / MiB:.2f} MiB  {why}")
    budget = store.budget_bytes
    over = " (still over: protected by foreign/invalid files)" if budget is not None and out["total_bytes"] > budget \
        else ""
    of = "" if args.budget_mb is None else f" of {args.budget_mb:,.1f} MiB"
    print(f"{args.dir}: {len(evicted)} {verb}, {len(swept)} temp files removed, {len(orphans)} orphans, "
          f"{out['total_bytes'] / MiB:,.1f} MiB{of}{over}")
    return 0


# ---- export / import -------------------------------------------------------------------------
def _entry_layout(path: Path, model: Path | None) -> StateLayout:
    """The layout from ``--model``, else inferred from the file's payload header."""
    layout, _ = _model_layout(model)
    if layout is not None:
        return layout
    if path.suffix == CHAIN_SUFFIX:
        return infer_layout(chain_summary(path))[0]
    try:
        with open_regular(path) as f:  # a FIFO named *.kv must not block
            header = parse_header(f.read(TEXT_OFFSET), str(path), os.fstat(f.fileno()).st_size)
            return file_layout(f, header, str(path))[0]
    except OSError as err:
        raise KVFormatError(f"{path}: {err.strerror or err}") from None


def _first_layout(files: list[Path], model: Path | None) -> StateLayout:
    """``_entry_layout`` of the first of ``files`` it can be read from."""
    errors = []
    for path in files:
        try:
            return _entry_layout(path, model)
        except KVFormatError as err:
            errors.append(str(err))
    raise WorkbenchError(f"no .kv file to take the layout from ({len(errors)} unreadable; first: {errors[0]})")


def _export(args: argparse.Namespace) -> int:
    store = KVStore.readonly(args.dir)
    entry = store._find(args.entry)
    out = store.export(entry, args.out, _entry_layout(entry.path, args.model))
    print(f"{out}: {out.stat().st_size:,} bytes, {entry.tokens:,} tokens "
          f"({'chain depth ' + str(entry.depth) if entry.chained else 'flat'} entry {entry.sha})")
    return 0


def _import(args: argparse.Namespace) -> int:
    files = sorted(args.src.glob("*.kv"))
    if not files:
        raise WorkbenchError(f"{args.src}: no .kv files to import")
    store = KVStore(args.into, budget_mb=None, kv_layout="chain", max_depth=args.max_depth)
    saved = store.import_dir(args.src, _first_layout(files, args.model))
    entries = {e.path: e for e in store.entries()}
    rows = [{"path": str(p), "depth": entries[p].depth if p in entries else None,
             "bytes": entries[p].file_size if p in entries else 0} for p in saved]
    if args.json:
        _print({"src": str(args.src), "into": str(args.into), "files": len(files), "saved": rows,
                "total_bytes": store.total_bytes()}, True)
        return 0
    for r in rows:
        print(f"  {Path(r['path']).name}  depth {r['depth']}  {r['bytes'] / MiB:.2f} MiB")
    print(f"{args.into}: {len(saved)} of {len(files)} files stored as chains, {store.total_bytes() / MiB:,.1f} MiB "
          f"(source {sum(f.stat().st_size for f in files) / MiB:,.1f} MiB)")
    return 0


def _lookup(args: argparse.Namespace) -> int:
    from workbench.kv.policy import KVPolicy, KVPolicyError
    from workbench.lab.lookup import explain_lookup

    from workbench.chat import render_single
    from workbench.safeopen import PROMPT_FILE_CAP, read_capped

    try:
        prompt = read_capped(args.prompt_file, PROMPT_FILE_CAP)
        if not args.rendered:
            prompt = render_single(prompt.decode("utf-8"), system=args.system, thinking=args.think).encode("utf-8")
    except OSError as err:
        raise WorkbenchError(f"{args.prompt_file}: {err.strerror or err}") from err
    except UnicodeDecodeError:
        raise WorkbenchError(f"{args.prompt_file}: not UTF-8 text") from None
    try:
        policy = KVPolicy(min_tokens=args.min_tokens, boundary_align=args.kv_align, budget_mb=None)
    except KVPolicyError as err:
        raise WorkbenchError(str(err)) from None
    tokenize = None
    if args.model is not None:
        from workbench.gguf.reader import GGUFFile
        from workbench.tokenizer import Tokenizer
        tok = Tokenizer.from_gguf(GGUFFile(args.model))
        tokenize = lambda text: len(tok.encode_rendered(text.decode("utf-8", errors="replace")))  # noqa: E731
    out = explain_lookup(KVStore.readonly(args.dir), prompt, policy, args.ctx, tokenize)
    if args.json:
        print(json.dumps(out.as_dict()))
    else:
        print(out.explanation)
        if out.longest_file:
            where = ("whole prefix" if out.diverges_at_byte is None else
                     f"diverges at byte {out.diverges_at_byte}, token {'~' if out.tokens_estimated else ''}"
                     f"{out.diverges_at_token}")
            print(f"longest stored prefix: {out.longest_file} ({out.stored_tokens} tokens), {where}")
    return 0

