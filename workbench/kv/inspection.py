"""Looking into checkpoints without a model: stored text, layout inference, byte breakdown.

One function per question, used by ``workbench kv``, the widgets, the demo and the
notebooks: ``stored_text`` (the rendered text a file was saved under), ``infer_layout``
(a layout from the payload header alone), ``payload_breakdown`` (payload bytes per layer
and kind), ``file_trailer`` (a listed file's trailers: ABI, title, tool map, footer) and
``inspect_file`` (all of it for one file).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from workbench.kv.dsv4 import PAYLOAD_HEADER_BYTES, PayloadSummary, read_payload_summary
from workbench.kv.errors import KVFormatError
from workbench.kv.header import TEXT_OFFSET, KVHeader, parse_header, read_header, read_text
from workbench.kv.trailers import Trailer, read_trailer
from workbench.safeopen import open_regular
from workbench.spec.args import ds4_ratio_schedule
from workbench.spec.statelayout import F32, StateLayout

DS4_DIMS = (43, 512, 128, 129280)  # n_layer, head_dim, idx_dim, vocab of ds4-server's model


def file_trailer(path: str | os.PathLike, header: KVHeader) -> Trailer:
    """What follows a listed file's payload (kind "invalid", the error in its notes, when
    it does not parse); a few small reads."""
    name = os.fspath(path)
    try:
        with open_regular(name) as f:  # never blocks on a FIFO swapped in since the listing
            return read_trailer(f, header, name)
    except (OSError, KVFormatError) as err:
        msg = str(err) if isinstance(err, KVFormatError) else f"{name}: {err.strerror or err}"
        return Trailer("invalid", max(0, header.file_size - header.payload_end), notes=(msg,))


def stored_text(path: str | os.PathLike, header: KVHeader | None = None) -> bytes:
    """The rendered text a .kv file was saved under (``header``: already read, saves a read)."""
    name = os.fspath(path)
    try:
        with open_regular(name) as f:
            return read_text(f, read_header(name) if header is None else header, name)
    except OSError as err:
        raise KVFormatError(f"{name}: cannot read text: {err.strerror or err}") from err


def infer_layout(summary: PayloadSummary) -> tuple[StateLayout, str]:
    """A layout for reading a payload without a model, and how it was obtained.

    ds4-server's dimensions give ``StateLayout.ds4()``. Otherwise the header gives layers
    and widths; n_swa is the raw window (exact when ctx > window); ratios follow ds4's
    schedule unless the row counts contradict it, in which case they are read off the
    counts (unambiguous from 128 tokens on).
    """
    ph = summary.header
    if (ph.n_layer, ph.head_dim, ph.idx_dim, ph.vocab) == DS4_DIMS:
        return StateLayout.ds4(), "ds4-server layout (43 layers x 512, indexer 128, vocab 129280)"
    T = ph.tokens
    ratios = ds4_ratio_schedule(ph.n_layer)
    note = "inferred from the payload header (ds4 layer schedule"

    def fits(rs: tuple[int, ...]) -> bool:
        return all(summary.n_comp[L] == (T // r if r else 0) and summary.n_idx[L] == (T // 4 if r == 4 else 0)
                   for L, r in enumerate(rs))

    if not fits(ratios):
        guess = []
        for L in range(ph.n_layer):
            c, i = summary.n_comp[L], summary.n_idx[L]
            guess.append(4 if i or (c and c == T // 4) else (128 if c and c == T // 128 else 0))
        ratios = tuple(guess)
        note = "inferred from the payload header (ratios from the row counts"
    n_swa = ph.raw_window
    note += f", n_swa {n_swa}{'' if ph.ctx > ph.raw_window else ' or more'}); pass --model for certainty"
    return StateLayout(ph.n_layer, ph.head_dim, ph.idx_dim, ph.vocab, n_swa, ratios), note


def file_layout(f: BinaryIO, header: KVHeader, name: str) -> tuple[StateLayout, str]:
    """``infer_layout`` of an open .kv file's payload."""
    return infer_layout(read_payload_summary(f, header, name))


def payload_breakdown(layout: StateLayout, summary: PayloadSummary) -> list[dict]:
    """Per-layer payload bytes by kind (rows: layer, ratio, kind, bytes; the layout's
    ``layer_bytes_at`` with the payload's raw rows), plus layer -1 rows for the header,
    tokens, logits and row counts."""
    ph = summary.header
    rows = [{"layer": -1, "ratio": None, "kind": "header", "bytes": PAYLOAD_HEADER_BYTES + 8 * ph.n_layer},
            {"layer": -1, "ratio": None, "kind": "tokens", "bytes": 4 * ph.tokens},
            {"layer": -1, "ratio": None, "kind": "logits", "bytes": F32 * ph.vocab}]
    return rows + layout.layer_bytes_at(ph.tokens, ph.raw_live)


@dataclass(frozen=True)
class Inspection:
    """One .kv file looked at without reading its tensors."""

    path: Path
    header: KVHeader
    text: bytes
    trailer: Trailer  # kind "invalid" (with the error as its note) when it does not parse
    summary: PayloadSummary | None  # None: no payload (ds4's agent /strip)
    layout: StateLayout | None
    layout_note: str  # where the layout came from
    breakdown: list[dict]  # payload_breakdown rows

    @property
    def bytes_by_kind(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.breakdown:
            out[r["kind"]] = out.get(r["kind"], 0) + r["bytes"]
        return out


def inspect_file(path: str | os.PathLike, layout: StateLayout | None = None, layout_note: str = "",
                 must_fit: bool = True) -> Inspection:
    """Header, text, trailer, payload summary, layout and breakdown of one .kv file.

    ``layout`` None infers one from the payload header; a given layout whose dimensions
    differ from the payload's raises (``must_fit``) or is replaced by the inferred one.
    A trailer that does not parse is reported, not raised (``kv verify`` fails on it). A
    file without a payload has no summary, layout or breakdown.
    """
    p = Path(path)
    name = str(p)
    try:
        with open_regular(p) as f:  # a FIFO named *.kv must not block the reader
            header = parse_header(f.read(TEXT_OFFSET), name, os.fstat(f.fileno()).st_size)
            text = read_text(f, header, name)
            try:
                trailer = read_trailer(f, header, name)
            except KVFormatError as err:
                trailer = Trailer("invalid", header.file_size - header.payload_end, notes=(str(err),))
            summary = None if header.stripped else read_payload_summary(f, header, name)
    except OSError as err:
        raise KVFormatError(f"{name}: cannot read: {err.strerror or err}") from err
    if summary is None:
        return Inspection(p, header, text, trailer, None, None, "no payload (ds4 agent /strip): listed, never loaded",
                          [])
    ph = summary.header
    if layout is not None and (layout.n_layer, layout.head_dim, layout.idx_dim, layout.n_vocab) != (
            ph.n_layer, ph.head_dim, ph.idx_dim, ph.vocab):
        if must_fit:
            raise KVFormatError(f"{name}: payload is {ph.n_layer} layers x {ph.head_dim}, indexer {ph.idx_dim}, "
                                f"vocab {ph.vocab}; the model's layout is {layout.n_layer} x {layout.head_dim}, "
                                f"{layout.idx_dim}, {layout.n_vocab}")
        layout = None
    if layout is None:
        layout, layout_note = infer_layout(summary)
    return Inspection(p, header, text, trailer, summary, layout, layout_note, payload_breakdown(layout, summary))
