"""The store's chained layout: choosing a parent, export to ds4 ``.kv``, import, orphans.

With ``KVStore(kv_layout="chain")`` a save is written as ``chain/<sha>.kvd``
(``workbench.kv.chain``) over the *parent*: the stored chain entry with the longest text
that is a byte prefix of the new text, whose tokens are a prefix of the new tokens, with
the same context and quant bits. No such entry: a base.

Re-basing rule: an entry is at most ``max_depth`` links above its base (default
``MAX_DEPTH`` = 16); a save whose parent is already at depth ``max_depth`` is written as a
new base. Restoring reads every appended row once whatever the depth (ancestors' raw
windows, frontiers and logits are seeked past), so depth costs one open and a few seeks
per link; the bound keeps that overhead small (measured by ``workbench bench kvchain``).

Eviction and shared rows (reference counting by the index): an entry that other chain
entries name as parent is never an eviction candidate, so evicting an entry frees exactly
its own file, which nobody else uses; once its last child is gone it becomes a leaf and a
candidate like any other.

One entry per name: a flat ``<sha>.kv`` and a chain entry of the same name (a ds4-server
or a flat store wrote the flat one) are one checkpoint and the flat file wins (ds4's own
file, restored from one piece): lookup, load, eviction and ``kv ls`` see it; the chain
copy is ``shadowed`` (counted, never looked up nor evicted, the entries restoring through
it keep their ancestors; ``kv gc`` removes it once no entry extends it; if the flat file is
evicted first, the copy becomes the entry of that name). A chain save whose name has a
compatible flat file writes nothing (status "exists"); a flat save always writes ds4's file.

Crash safety: every chain file is fsynced, renamed into place and the directory fsynced
before the save returns, so a parent is on disk before any child names it; a crash leaves
at worst a temp file (swept like ds4's). ``orphans`` lists what no valid chain reaches
(broken chains: a missing or mismatching ancestor), shadowed chain copies nothing
extends, and stale temp files; ``remove_orphans`` deletes them (``workbench kv gc``).
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable

from workbench.atomic import atomic_write
from workbench.kv.chain import (
    CHAIN_DIR, CHAIN_SUFFIX, ChainRef, chain_file_bytes, chain_path, chain_tokens, read_chain, read_link, walk,
    write_chain_file,
)
from workbench.kv.errors import KVFormatError, KVSaveError, KVStoreError
from workbench.kv.header import MODEL_FLASH, TEXT_OFFSET, ExtFlag, KVHeader, SaveReason, read_header
from workbench.kv.index import DirIndex, Entry
from workbench.kv.checksum import footer_bytes
from workbench.kv.dsv4 import payload_size
from workbench.kv.kvfile import model_mismatch, read_kv_file, write_kv_file
from workbench.kv.lock import DirLock
from workbench.kv.maintenance import TMP_PID_RE, pid_alive
from workbench.kv.stream import Progress
from workbench.spec.statelayout import StateLayout
from workbench.state import SessionState

MAX_DEPTH = 16
LAYOUTS = ("flat", "chain")
TRAILER_FLAGS = ExtFlag.TOOL_MAP | ExtFlag.TITLE  # trailers ds4 writes after a payload; chains keep none


@dataclass(frozen=True)
class EntryBytes:
    """What one entry costs on disk and what it stands for (bytes)."""

    sha: str
    chained: bool
    parent: str | None  # the entry it extends (chain entries; None: a base or a flat file)
    depth: int
    tokens: int
    own: int  # its file
    through: int  # its file and its ancestors' (what a restore opens)
    logical: int  # the same state as one flat .kv file (footer included when ``checksum``)

    @property
    def shared(self) -> int:
        """Bytes of the state it does not store itself (its ancestors' rows, shared)."""
        return max(self.logical - self.own, 0)


def entry_bytes(entries: Iterable[Entry], layout: StateLayout, checksum: bool = True) -> list[EntryBytes]:
    """Own, restore-path and logical bytes of each entry (in the given order); a chain
    entry's ancestors are looked up among ``entries``."""
    entries = list(entries)
    by_sha = {e.sha: e for e in entries}
    out = []
    for e in entries:
        payload = payload_size(layout, e.tokens, e.ctx)
        through, up = e.file_size, by_sha.get(e.parent) if e.parent else None
        while up is not None:
            through += up.file_size
            up = by_sha.get(up.parent) if up.parent else None
        out.append(EntryBytes(e.sha, e.chained, e.parent, e.depth, e.tokens, e.file_size, through,
                              TEXT_OFFSET + e.text_bytes + payload + (footer_bytes(payload) if checksum else 0)))
    return out


def chain_writer(ref: ChainRef):
    """A ``KVWriter`` that writes the chain file over ``ref``'s parent."""

    def write_chain(f: BinaryIO, state: SessionState, text: bytes, *, quant_bits: int, reason: SaveReason,
                    ext_flags: int = 0, checksum: bool = True, now: int, hits: int = 0,
                    progress: Progress | None = None, model_id: int = MODEL_FLASH,
                    fingerprint: bytes | None = None) -> tuple[KVHeader, int]:
        return write_chain_file(f, state, text, ref, quant_bits=quant_bits, reason=reason,
                                ext_flags=ext_flags & ~TRAILER_FLAGS, now=now, hits=hits, model_id=model_id,
                                checksum=checksum, fingerprint=fingerprint)

    return write_chain


class ChainOps:
    """The chained-layout operations of ``KVStore``, which provides these attributes and
    ``_text_matches(entry, text)``, ``entries()``, ``save(...)``."""

    dir: Path
    lock: DirLock
    index: DirIndex
    kv_layout: str
    max_depth: int
    quant_bits: int
    checksum: bool
    model_id: int
    fingerprint: bytes | None

    def use_layout(self, kv_layout: str) -> None:
        """Write flat ``.kv`` files or chain entries from now on (both are always read)."""
        if kv_layout not in LAYOUTS:
            raise KVStoreError(f"{self.dir}: kv layout {kv_layout!r}, expected one of {', '.join(LAYOUTS)}")
        self.kv_layout = kv_layout

    def _chain_parent(self, state: SessionState, key: bytes) -> ChainRef:
        """The reference a chain save of ``state`` under ``key`` gets (see the module doc)."""
        with self.lock.shared():
            self.index.scan(full=False)
            candidates = sorted((e for e in self.index.entries().values()
                                 if e.chained and e.text_bytes < len(key) and e.tokens < state.n_tokens
                                 and e.ctx == state.ctx and e.quant_bits == self.quant_bits),
                                key=lambda e: e.text_bytes, reverse=True)
            for e in candidates:
                if not self._text_matches(e, key):
                    continue
                try:
                    if self._other_model(e) or chain_tokens(e.path) != list(state.tokens[: e.tokens]):
                        continue
                except (KVFormatError, OSError):
                    continue
                if e.depth + 1 > self.max_depth:
                    break  # re-base
                return ChainRef(e.sha, e.tokens, e.depth + 1)
        return ChainRef(None, 0, 0)

    def usage(self, layout: StateLayout) -> list[EntryBytes]:
        """``entry_bytes`` of every entry, most recently used first (``entries``' order)."""
        return entry_bytes(self.entries(), layout, self.checksum)

    def _other_model(self, e: Entry) -> str | None:
        """Why chain entry ``e`` must not be a parent of this model's entries (None: it may)."""
        return model_mismatch(e.header, read_link(e.path).trailer, model_id=self.model_id,
                              quant_bits=self.quant_bits, fingerprint=self.fingerprint)

    def _chain_plan(self, state: SessionState, key: bytes, sha: str) -> tuple[Path, int, object, set[str]]:
        """(final path, predicted bytes, writer, shas to protect) of a chain save."""
        ref = self._chain_parent(state, key)
        chain_dir = self.dir / CHAIN_DIR
        try:
            chain_dir.mkdir(mode=0o700, exist_ok=True)
            linked = not stat.S_ISDIR(os.lstat(chain_dir).st_mode)
        except OSError as err:
            raise KVSaveError(f"{chain_dir}: cannot create: {err.strerror or err}") from None
        if linked:  # a link or a file: never write chain entries through it
            raise KVSaveError(f"{chain_dir}: not a directory (a link or a foreign file): chain entries not saved")
        protect = set() if ref.parent is None else {ref.parent}
        return chain_path(self.dir, sha), chain_file_bytes(state, len(key), ref.parent_tokens, self.checksum), \
            chain_writer(ref), protect

    def export(self, entry: Entry | str, out: str | os.PathLike, layout: StateLayout) -> Path:
        """Write entry ``entry`` (an Entry or its SHA-1) as a ds4 ``.kv`` file at ``out``
        through the flat writer: the same header fields (times now), text and payload."""
        e = self._find(entry)
        with self.lock.shared():
            if e.chained:
                state, text, header, _ = read_chain(e.path, layout)
            else:
                with open(e.path, "rb", buffering=0) as f:
                    header, text, state, _ = read_kv_file(f, layout, name=str(e.path))
        dest = Path(out)
        with atomic_write(dest) as f:
            write_kv_file(f, state, text, quant_bits=header.quant_bits, reason=header.reason,
                          ext_flags=header.ext_flags & ~TRAILER_FLAGS, checksum=self.checksum,
                          model_id=header.model_id,
                          fingerprint=self.fingerprint,
                          now=int(time.time()), hits=header.hits)
        return dest

    def import_dir(self, src: str | os.PathLike, layout: StateLayout) -> list[Path]:
        """Store every valid ds4 ``.kv`` file of directory ``src`` in this store, shortest
        text first (so a conversation's earlier checkpoints become its later ones'
        parents); returns what was saved. Each file is read once (its header first, for
        the order); files that do not load are skipped."""
        files = []
        for p in Path(src).glob("*.kv"):
            try:
                files.append((read_header(p).text_bytes, p.name, p))
            except KVFormatError:
                continue
        out = []
        for _, _, p in sorted(files):
            try:
                with open(p, "rb", buffering=0) as f:
                    header, text, state, _ = read_kv_file(f, layout, name=str(p))
            except (KVFormatError, OSError):
                continue
            res = self.save(state, text, header.reason, ext_flags=header.ext_flags & ~TRAILER_FLAGS)
            if res.saved:
                out.append(res.path)
        return out

    def _find(self, entry: Entry | str) -> Entry:
        if isinstance(entry, Entry):
            return entry
        want = str(entry).lower()
        if want.endswith(".kv") or want.endswith(CHAIN_SUFFIX):
            want = Path(want).stem
        for e in self.entries():
            if e.sha == want:
                return e
        raise KVStoreError(f"{self.dir}: no entry {entry}")

    def orphans(self) -> list[tuple[Path, int, str]]:
        """(path, bytes, why) of chain files no valid chain reaches (a missing or
        mismatching ancestor), of shadowed chain copies no entry extends, and of temp
        files of processes that are gone."""
        with self.lock.shared():
            return _orphans_of(self.index)

    def remove_orphans(self) -> list[tuple[Path, int, str]]:
        """Delete what ``orphans`` lists (under the exclusive lock); returns it."""
        gone = []
        with self.lock.exclusive():
            for path, size, why in _orphans_of(self.index):
                try:
                    path.unlink()
                except FileNotFoundError:
                    continue
                gone.append((path, size, why))
            self.index.scan(full=True)
        return gone


def _orphans_of(index: DirIndex) -> list[tuple[Path, int, str]]:
    """``ChainOps.orphans`` over an index the caller has locked (rescanned here)."""
    index.scan(full=True)
    out = []
    for e in index.entries().values():
        if e.chained:
            try:
                walk(e.path)
            except KVFormatError as err:
                out.append((e.path, e.file_size, str(err)))
    children = index.children()
    out += [(o.path, o.size, f"chain entry shadowed by the flat file of its name ({o.problem})")
            for o in index.others() if o.kind == "shadowed" and o.path.name[:40] not in children]
    for o in index.others():
        if o.kind == "tmp":
            m = TMP_PID_RE.search(o.path.name)
            if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
                out.append((o.path, o.size, "temp file of a process that is gone"))
    return out
