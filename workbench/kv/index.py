"""The store's in-memory index of a cache directory: what each file is, from one scan.

A checkpoint is ``<sha1(text)>.kv`` (40 hex digits; ds4's naming). Every other file is
an ``OtherFile`` (counted against the budget, never evicted): an invalid checkpoint, a
temp file ``<sha>.kv.tmp.<pid>``, a quarantined file, or anything foreign. ``DirIndex``
refreshes from one ``scandir`` and a ``stat`` per file, re-reading a header only for
files whose (inode, size, mtime) changed, and skips the scan when the directory's mtime
has not moved (unless it changed within ``RACY_S``, as timestamps are coarse).
"""

from __future__ import annotations

import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from workbench.kv.chain import CHAIN_DIR, CHAIN_SUFFIX, read_chain_header
from workbench.kv.errors import KVFormatError, KVStoreError
from workbench.kv.header import KVHeader, read_header
from workbench.kv.lock import LOCK_NAME

NAME_RE = re.compile(r"^([0-9a-fA-F]{40})\.kv$")
TMP_RE = re.compile(r"^[0-9a-fA-F]{40}\.kv\.tmp\.(\d+)$")
CHAIN_RE = re.compile(r"^([0-9a-f]{40})\.kvd$")
CHAIN_TMP_RE = re.compile(r"^[0-9a-f]{40}\.kvd\.tmp\.(\d+)$")
QUARANTINE_DIR = "quarantine"
RACY_S = 2.0  # a directory modified this recently is rescanned (timestamps are coarse)
StatKey = tuple[int, int, int]  # (inode, size, mtime_ns): a file unchanged since it was classified


def _header_field(name: str, doc: str) -> property:
    """A read-only attribute of an ``Entry`` taken from its header."""
    return property(lambda self: getattr(self.header, name), doc=doc)


@dataclass(frozen=True)
class Entry:
    """A valid-looking ``<sha>.kv`` file: its header (read without the payload) and stat.

    Its metadata properties are what the pure lookup and eviction decisions read
    (``workbench.kv.lookup``, ``workbench.kv.eviction``).
    """

    path: Path
    sha: str
    header: KVHeader
    mtime_ns: int

    tokens = _header_field("tokens", "tokens in the checkpoint")
    text_bytes = _header_field("text_bytes", "bytes of the stored text")
    file_size = _header_field("file_size", "bytes on disk")
    ctx = _header_field("ctx", "context the checkpoint was saved with")
    quant_bits = _header_field("quant_bits", "routed-expert quant bits (2 or 4)")
    hits = _header_field("hits", "loads so far")
    last_used = _header_field("last_used", "Unix seconds of the last save or load (0: never)")
    created_at = _header_field("created_at", "Unix seconds of the save")
    reason = _header_field("reason", "the SaveReason")
    model_id = _header_field("model_id", "header byte 7, the model id (ds4 Flash: 0)")
    parent: str | None = None  # chain entries: the parent's SHA-1 (None: a base or a flat file)
    depth: int = 0  # chain entries: links below this one (0: a base)

    @property
    def chained(self) -> bool:
        """True for a chain entry (``chain/<sha>.kvd``), False for a flat ``<sha>.kv``."""
        return self.path.suffix == CHAIN_SUFFIX

    @property
    def key(self) -> str:
        """The index's name for the file: relative to the cache directory."""
        return f"{CHAIN_DIR}/{self.path.name}" if self.chained else self.path.name


@dataclass(frozen=True)
class OtherFile:
    """Anything else in the directory: counted against the budget, never evicted."""

    path: Path
    size: int
    kind: str  # invalid | foreign | tmp | quarantined | shadowed
    problem: str


def _tree_size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for fn in files:
            try:
                total += os.lstat(os.path.join(root, fn)).st_size
            except OSError:
                pass
    return total


def _classify(path: Path, st: os.stat_result, name_re: re.Pattern, tmp_re: re.Pattern,
              entry: Callable[[Path, str, int], Entry], what: str) -> Entry | OtherFile:
    """A regular file whose name ``name_re`` matches becomes ``entry(path, sha, mtime_ns)``
    (an ``invalid`` file when its header does not parse), a ``tmp_re`` name a temp file,
    anything else a foreign file."""
    if not stat.S_ISREG(st.st_mode):
        return OtherFile(path, st.st_size, "foreign", "not a regular file")
    m = name_re.match(path.name)
    if m:
        try:
            return entry(path, m.group(1).lower(), st.st_mtime_ns)
        except KVFormatError as err:
            return OtherFile(path, st.st_size, "invalid", str(err))
    m = tmp_re.match(path.name)
    if m:
        return OtherFile(path, st.st_size, "tmp", f"temp file of pid {m.group(1)}")
    return OtherFile(path, st.st_size, "foreign", f"not {what}")


def classify(path: Path, st: os.stat_result) -> Entry | OtherFile:
    """What the file at ``path`` (with stat ``st``) is, reading at most its header."""
    return _classify(path, st, NAME_RE, TMP_RE, lambda p, sha, ns: Entry(p, sha, read_header(p), ns),
                     "a <sha1>.kv checkpoint")


def _chain_entry(path: Path, sha: str, mtime_ns: int) -> Entry:
    header, ref = read_chain_header(path)
    return Entry(path, sha, header, mtime_ns, ref.parent, ref.depth)


def classify_chain(path: Path, st: os.stat_result) -> Entry | OtherFile:
    """What the file at ``path`` in the ``chain/`` subdirectory is, reading at most its
    header and chain reference."""
    return _classify(path, st, CHAIN_RE, CHAIN_TMP_RE, _chain_entry, "a <sha1>.kvd chain entry")


class DirIndex:
    """Every file of one cache directory, classified; not locked (the store locks around it)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._cache: dict[str, tuple[StatKey, Entry | OtherFile]] = {}
        self._extra: list[OtherFile] = []  # subdirectories' contents
        self._dir_mtime_ns: tuple[int, int] | None = None

    def scan(self, full: bool) -> None:
        """Refresh; unless ``full``, skip when the directory is unchanged."""
        try:
            dst = os.stat(self.dir)
        except OSError as err:
            raise KVStoreError(f"{self.dir}: {err.strerror or err}") from err
        try:  # chain files change the subdirectory's mtime, not the top one's
            stamp = (dst.st_mtime_ns, os.stat(self.dir / CHAIN_DIR).st_mtime_ns)
        except OSError:
            stamp = (dst.st_mtime_ns, 0)
        if not full and self._dir_mtime_ns == stamp:
            return
        cache: dict[str, tuple[StatKey, Entry | OtherFile]] = {}
        extra: list[OtherFile] = []
        try:
            with os.scandir(self.dir) as it:
                for de in it:
                    if de.name == LOCK_NAME:
                        continue
                    path = self.dir / de.name
                    try:
                        st = de.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if stat.S_ISDIR(st.st_mode):
                        if de.name == CHAIN_DIR:
                            self._scan_chain(path, cache)
                        elif de.name == QUARANTINE_DIR:
                            extra += [OtherFile(q, q.lstat().st_size, "quarantined", "moved by kv verify")
                                      for q in sorted(path.iterdir()) if q.is_file()]
                        else:
                            extra.append(OtherFile(path, _tree_size(path), "foreign", "a subdirectory"))
                        continue
                    key = (st.st_ino, st.st_size, st.st_mtime_ns)
                    prev = self._cache.get(de.name)
                    cache[de.name] = (key, prev[1] if prev and prev[0] == key else classify(path, st))
        except OSError as err:
            raise KVStoreError(f"{self.dir}: cannot list cache directory: {err.strerror or err}") from err
        self._cache, self._extra = cache, extra
        # a directory changed within RACY_S may change again within the same timestamp tick
        racy = time.time() - max(stamp) / 1e9 < RACY_S
        self._dir_mtime_ns = None if racy else stamp

    def _scan_chain(self, path: Path, cache: dict[str, tuple[StatKey, Entry | OtherFile]]) -> None:
        """Classify the files of the ``chain/`` subdirectory into ``cache`` (keys ``chain/<name>``)."""
        with os.scandir(path) as it:
            for de in it:
                try:
                    st = de.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                key, sub = (st.st_ino, st.st_size, st.st_mtime_ns), f"{CHAIN_DIR}/{de.name}"
                prev = self._cache.get(sub)
                cache[sub] = (key, prev[1] if prev and prev[0] == key else classify_chain(path / de.name, st))

    def children(self) -> dict[str, list[Entry]]:
        """Chain entries by the SHA-1 of the parent they reference."""
        out: dict[str, list[Entry]] = {}
        for item in self.items():
            if isinstance(item, Entry) and item.parent is not None:
                out.setdefault(item.parent, []).append(item)
        return out

    def pinned(self, gone: set[str] = frozenset()) -> set[str]:
        """SHA-1s of the chain entries some entry (not shadowed, its key not in ``gone``)
        restores through: its parent, and up the chain through shadowed copies. Eviction
        spares them."""
        chains = {i.sha: i for i in self.items() if isinstance(i, Entry) and i.chained}
        todo = [e.parent for e in self.entries().values() if e.parent is not None and e.key not in gone]
        out: set[str] = set()
        while todo:
            sha = todo.pop()
            if sha not in out:
                out.add(sha)
                up = chains.get(sha)
                if up is not None and up.parent is not None:
                    todo.append(up.parent)
        return out

    def classify(self, path: Path, st: os.stat_result) -> Entry | OtherFile:
        """What a file of this directory or of its ``chain/`` subdirectory is."""
        return classify_chain(path, st) if path.parent.name == CHAIN_DIR else classify(path, st)

    def put(self, entry: Entry | OtherFile, st: os.stat_result) -> None:
        """Index a file this process just published (from the header it wrote)."""
        key = entry.key if isinstance(entry, Entry) else entry.path.name
        self._cache[key] = ((st.st_ino, st.st_size, st.st_mtime_ns), entry)

    def drop(self, name: str) -> None:
        self._cache.pop(name, None)

    def stat_key(self, name: str) -> StatKey | None:
        item = self._cache.get(name)
        return None if item is None else item[0]

    def items(self) -> list[Entry | OtherFile]:
        return [item for _, item in self._cache.values()] + self._extra

    def entries(self) -> dict[str, Entry]:
        """Checkpoints by SHA: one per name. A flat ``<sha>.kv`` wins over a chain entry of
        the same name (ds4's own file, restored from one piece); among names differing only
        in case, the first."""
        out: dict[str, Entry] = {}
        for item in self.items():
            if isinstance(item, Entry):
                prev = out.get(item.sha)
                if prev is None or (prev.chained and not item.chained):
                    out[item.sha] = item
        return out

    def others(self) -> list[OtherFile]:
        """Every non-checkpoint file, plus checkpoints whose name repeats another's: in other
        case (``invalid``), or a chain entry beside the flat file of its name (``shadowed``:
        never looked up nor evicted; ``kv gc`` removes it once no entry extends it)."""
        index = self.entries()
        dup = [OtherFile(i.path, i.file_size, "shadowed", f"same name as {index[i.sha].path.name}, which serves it")
               if i.chained and not index[i.sha].chained else
               OtherFile(i.path, i.file_size, "invalid", f"duplicate of {index[i.sha].path.name} (name case)")
               for i in self.items() if isinstance(i, Entry) and index[i.sha] is not i]
        return [i for i in self.items() if isinstance(i, OtherFile)] + dup

    def total(self) -> int:
        """Bytes of every file indexed."""
        return sum(i.file_size if isinstance(i, Entry) else i.size for i in self.items())

    def size_of(self, name: str) -> int:
        item = self._cache.get(name)
        if item is None:
            return 0
        return item[1].file_size if isinstance(item[1], Entry) else item[1].size
