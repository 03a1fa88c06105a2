"""The disk prefix cache: a directory of ds4 ``.kv`` files keyed by rendered text.

Each file is ``<sha1(text)>.kv`` (40 lower-case hex), readable by ds4-server and written
exactly as it writes them, plus an optional checksum trailer it ignores (see
``workbench.kv.format``). The store keeps an in-memory index (sha -> header summary,
size, mtime) that is refreshed from one ``scandir`` and per-file ``stat`` only when the
directory changed, re-reading a header only for files whose stat changed.

How an engine uses it after a live-cache miss (the live state's text is not a byte
prefix of the new prompt), in this order::

    store = KVStore.from_policy(kv_dir, policy, quant_bits=2)  # once; 4 for Q4_K experts
    hit = store.lookup(prompt_text, ctx)                       # index + one SHA-1 pass
    if policy.evict_due(live.n_tokens):                        # keep the old conversation
        store.save(session.snapshot(), live_text, SaveReason.EVICT,
                   protect=[hit] if hit else [])               # never evict what we load next
    if hit:
        try:
            state, text = store.load(hit, layout, ctx, prompt=prompt_text)
        except KVLoadError:                                    # event recorded; file kept
            state = None                                       # fall through to a cold prefill
        if state is not None:
            session.restore(state)                             # tokens, logits, KV rows
            suffix = prompt_text.encode()[len(text):]          # bytes after the stored prefix
            session.prefill(tokenize_rendered(suffix))         # exact stored tokens + suffix
            schedule.loaded(state.n_tokens)

Looking up before the evict save (equivalent: the evicted text cannot match the prompt,
or the live cache would have hit) lets the save protect the hit from its own eviction
pass, which ds4 does not (issues #447/#448). A cold save then uses
``policy.cold_target``, continued saves ``ContinuedSchedule.due``, shutdown
``policy.shutdown_due``; the session is synced to exactly the saved length first.

Budget and eviction: every file in the directory counts (foreign, invalid, stale tmp,
quarantined), only valid ``.kv`` files are evicted, in the order and at the moments the
store's ``EvictionRules`` say (``workbench.kv.eviction``: today's ds4 by default, which
makes room before writing; the May-2026 preset evicts after the write, sparing the new
file); a file that alone exceeds the budget (plus ds4's 1% slack) is not written.
``protect``-ed files (the lookup's hit) are spared only with ``protect_hit``. Lookup skips
files of another model id (header byte 7) and, with ``reject_different_quant``, of other
quant bits, as ds4 does. Processes sharing a
directory coordinate through ``workbench.kv.lock.DirLock``. Every operation records a
small event dataclass in ``store.events`` (and passes it to ``on_event``).
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
import struct
import tempfile
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import BinaryIO, Callable, ClassVar, Iterable

from workbench.atomic import fsync_dir, tmp_path
from workbench.errors import WorkbenchError
from workbench.kv.format import (
    CHECKSUM_CHUNK, OFF_HITS, OFF_LAST_USED, TEXT_OFFSET, Checksums, ChunkCRC, KVFormatError, KVHeader, Progress,
    SaveReason, Trailer, encode_text, header_crc, infer_layout, kv_file_bytes,
    make_header, parse_header, read_header, read_kv_file, read_payload_summary, read_text, text_crc, write_all,
    write_kv_file, write_payload,
)
from workbench.kv.eviction import Candidate, EvictionRules, keep_value, plan_eviction
from workbench.kv.lock import LOCK_NAME, DirLock
from workbench.kv.policy import KVPolicy
from workbench.spec.statelayout import StateLayout
from workbench.state import SessionState

MiB = 1024 * 1024
NAME_RE = re.compile(r"^([0-9a-fA-F]{40})\.kv$")
TMP_RE = re.compile(r"^[0-9a-fA-F]{40}\.kv\.tmp\.(\d+)$")
QUARANTINE_DIR = "quarantine"
RACY_S = 2.0  # a directory modified this recently is rescanned (timestamps are coarse)
COPY_CHUNK = 8 * MiB  # staged mode's bounce buffer, as ds4's DS4_SESSION_IO_CHUNK


class KVStoreError(WorkbenchError):
    """The cache directory cannot be used as asked."""


class KVLoadError(KVStoreError):
    """A checkpoint could not be restored (the file is kept; the caller's state is untouched)."""


class KVSaveError(KVStoreError):
    """A checkpoint could not be written (the temp file is removed; other files are untouched)."""


def text_sha(text: bytes) -> str:
    """The file stem for a rendered text: SHA-1 hex, lower case."""
    return hashlib.sha1(text).hexdigest()


# ---- events -------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class KVEvent:
    """Base of the events a store records; ``row()`` is a flat dict for telemetry."""

    kind: ClassVar[str] = "event"
    time: float = field(default_factory=time.time)

    def row(self) -> dict:
        return {"event": self.kind, **{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}}


@dataclass(frozen=True, kw_only=True)
class Saved(KVEvent):
    kind: ClassVar[str] = "saved"
    path: Path
    tokens: int
    bytes: int
    seconds: float
    reason: str
    mode: str
    durable: bool


@dataclass(frozen=True, kw_only=True)
class SaveSkipped(KVEvent):
    kind: ClassVar[str] = "save-skipped"
    path: Path
    tokens: int
    bytes: int
    why: str  # already-stored | exceeds-budget | no-room


@dataclass(frozen=True, kw_only=True)
class SaveFailed(KVEvent):
    kind: ClassVar[str] = "save-failed"
    path: Path
    tokens: int
    error: str


@dataclass(frozen=True, kw_only=True)
class Replaced(KVEvent):
    kind: ClassVar[str] = "replaced"
    path: Path
    why: str


@dataclass(frozen=True, kw_only=True)
class Hit(KVEvent):
    kind: ClassVar[str] = "hit"
    path: Path
    tokens: int
    text_bytes: int
    prompt_bytes: int


@dataclass(frozen=True, kw_only=True)
class Miss(KVEvent):
    kind: ClassVar[str] = "miss"
    prompt_bytes: int
    # no-entries | no-prefix-match | below-min-tokens | ctx-too-large | model-mismatch | quant-mismatch
    # | text-mismatch
    # | failed-before (the file failed to load and has not changed since)
    reason: str
    candidates: int  # files whose SHA matched a prefix but were rejected


@dataclass(frozen=True, kw_only=True)
class Loaded(KVEvent):
    kind: ClassVar[str] = "loaded"
    path: Path
    tokens: int
    bytes: int
    seconds: float
    checksum: str  # verified | absent | dropped | skipped


@dataclass(frozen=True, kw_only=True)
class LoadFailed(KVEvent):
    kind: ClassVar[str] = "load-failed"
    path: Path
    error: str


@dataclass(frozen=True, kw_only=True)
class Evicted(KVEvent):
    kind: ClassVar[str] = "evicted"
    path: Path
    tokens: int
    bytes: int
    score: float
    save_reason: str
    why: str  # make-room | disk-cache-full


@dataclass(frozen=True, kw_only=True)
class Consumed(KVEvent):
    kind: ClassVar[str] = "consumed"
    path: Path
    tokens: int


@dataclass(frozen=True, kw_only=True)
class TmpSwept(KVEvent):
    kind: ClassVar[str] = "tmp-swept"
    path: Path
    bytes: int


@dataclass(frozen=True, kw_only=True)
class Quarantined(KVEvent):
    kind: ClassVar[str] = "quarantined"
    path: Path
    dest: Path
    error: str


# ---- index items ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """A valid-looking ``<sha>.kv`` file: its header (read without the payload) and stat."""

    path: Path
    sha: str
    header: KVHeader
    mtime_ns: int

    @property
    def tokens(self) -> int:
        return self.header.tokens

    @property
    def text_bytes(self) -> int:
        return self.header.text_bytes

    @property
    def file_size(self) -> int:
        return self.header.file_size

    @property
    def ctx(self) -> int:
        return self.header.ctx


@dataclass(frozen=True)
class OtherFile:
    """Anything else in the directory: counted against the budget, never evicted."""

    path: Path
    size: int
    kind: str  # invalid | foreign | tmp | quarantined
    problem: str


@dataclass(frozen=True)
class SaveResult:
    """Outcome of ``KVStore.save``: status saved | exists | skipped."""

    path: Path
    status: str
    bytes: int
    seconds: float
    evicted: list[Evicted] = field(default_factory=list)
    detail: str = ""

    @property
    def saved(self) -> bool:
        return self.status == "saved"


@dataclass(frozen=True)
class VerifyReport:
    """One file checked end to end by ``verify_file``."""

    path: Path
    ok: bool
    error: str = ""
    header: KVHeader | None = None
    layout_note: str = ""
    checksum: str = ""  # verified | absent | dropped (ds4 tool-map rewrite)
    notes: tuple[str, ...] = ()


def _checksum_status(trailer: Trailer, verified: bool) -> str:
    if trailer.checksums is not None:
        return "verified" if verified else "skipped"
    return "dropped" if any("dropped" in n for n in trailer.notes) else "absent"


def verify_file(path: str | os.PathLike, layout: StateLayout | None = None, ctx: int | None = None,
                layout_note: str = "") -> VerifyReport:
    """Read every byte of a .kv file and run every check: header, name = SHA-1(text),
    trailer, checksums, payload structure (against ``ctx``, default the saved one) and
    token count. ``layout`` None infers it from the payload header."""
    p = Path(path)
    name = str(p)
    header = None
    try:
        with open(p, "rb", buffering=0) as f:
            header = parse_header(f.read(TEXT_OFFSET), name, os.fstat(f.fileno()).st_size)
            if layout is None:
                layout, layout_note = infer_layout(read_payload_summary(f, header, name))
            header, text, _, trailer = read_kv_file(f, layout, ctx, name=name, keep=False)
        m = NAME_RE.match(p.name)
        if m and text_sha(text) != m.group(1).lower():
            raise KVFormatError(f"{name}: cached text hash mismatch: SHA-1(text) {text_sha(text)} != file name")
    except KVFormatError as err:
        return VerifyReport(p, False, str(err), header, layout_note)
    except OSError as err:
        return VerifyReport(p, False, f"{name}: {err.strerror or err}", header, layout_note)
    return VerifyReport(p, True, "", header, layout_note, _checksum_status(trailer, True), trailer.notes)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, OSError):
        return False
    return True


def _tree_size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for fn in files:
            try:
                total += os.lstat(os.path.join(root, fn)).st_size
            except OSError:
                pass
    return total


class KVStore:
    """A ds4-compatible KV checkpoint directory with a disk budget.

    ``budget_mb`` (MiB, None: unlimited) caps the bytes of *all* files in the directory;
    ``min_tokens`` is the default lookup floor; ``quant_bits`` (2 or 4) is written into
    new headers and, with ``reject_different_quant``, required on lookup; ``model_id``
    (header byte 7, Flash 0) is required on lookup. ``eviction`` (None: today's ds4) says
    which files go and when. ``maintain``
    sweeps stale temp files of dead processes (older than ``tmp_grace_s``) and evicts to
    the budget on open, as ds4 does at startup; pass False to only read. ``on_event`` is
    called with each event, possibly while the directory lock is held: it must not call
    back into the store.
    """

    def __init__(self, directory: str | os.PathLike, budget_mb: float | None = 4096, min_tokens: int = 512, *,
                 quant_bits: int = 2, reject_different_quant: bool = False, checksum: bool = True,
                 eviction: EvictionRules | None = None, model_id: int = 0, consume_on_load_above: int | None = None, tmp_grace_s: float = 60.0, create: bool = True,
                 maintain: bool = True, on_event: Callable[[KVEvent], None] | None = None, events_max: int = 1000):
        self.dir = Path(directory)
        if create:
            try:
                self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as err:
                raise KVStoreError(f"{self.dir}: cannot create cache directory: {err.strerror or err}") from err
        if not self.dir.is_dir():
            raise KVStoreError(f"{self.dir}: not a directory")
        if budget_mb is not None and budget_mb <= 0:
            raise KVStoreError(f"{self.dir}: budget must be > 0 MiB or None, got {budget_mb}")
        if quant_bits not in (2, 4):
            raise KVStoreError(f"{self.dir}: quant bits {quant_bits}, expected 2 or 4")
        self.budget_mb = budget_mb
        self.min_tokens = min_tokens
        self.quant_bits = quant_bits
        self.reject_different_quant = reject_different_quant
        self.checksum = checksum
        self.eviction = eviction or EvictionRules()
        self.model_id = model_id
        self.consume_on_load_above = consume_on_load_above
        self.tmp_grace_s = tmp_grace_s
        self.on_event = on_event
        self.events: deque[KVEvent] = deque(maxlen=events_max)
        self.lock = DirLock(self.dir)
        self._save_mutex = threading.Lock()
        self._cache: dict[str, tuple[tuple[int, int, int], Entry | OtherFile]] = {}
        self._extra: list[OtherFile] = []  # subdirectories' contents
        self._dir_mtime_ns: int | None = None
        self._failed: dict[str, tuple[int, int, int]] = {}  # name -> stat key of a file that failed to load
        if maintain:
            self.sweep_tmp()
            self.evict_to_budget()

    @classmethod
    def readonly(cls, directory: str | os.PathLike) -> "KVStore":
        """Look at a directory (e.g. a ds4-server cache) without changing it: no budget,
        no temp-file sweep, no eviction on open, no directory creation."""
        return cls(directory, budget_mb=None, create=False, maintain=False)

    @classmethod
    def from_policy(cls, directory: str | os.PathLike, policy: KVPolicy, **kw) -> "KVStore":
        """A store with the policy's budget, min tokens, eviction rules and consume rule."""
        return cls(directory, policy.budget_mb, policy.min_tokens, eviction=policy.eviction_rules(),
                   consume_on_load_above=policy.consume_on_load_above, **kw)

    # ---- index ------------------------------------------------------------------------
    @property
    def budget_bytes(self) -> int | None:
        return None if self.budget_mb is None else int(self.budget_mb * MiB)

    def _emit(self, event: KVEvent) -> KVEvent:
        self.events.append(event)
        if self.on_event is not None:
            self.on_event(event)
        return event

    def _classify(self, path: Path, st: os.stat_result) -> Entry | OtherFile:
        name = path.name
        if not stat.S_ISREG(st.st_mode):
            return OtherFile(path, st.st_size, "foreign", "not a regular file")
        m = NAME_RE.match(name)
        if m:
            try:
                return Entry(path, m.group(1).lower(), read_header(path), st.st_mtime_ns)
            except KVFormatError as err:
                return OtherFile(path, st.st_size, "invalid", str(err))
        m = TMP_RE.match(name)
        if m:
            return OtherFile(path, st.st_size, "tmp", f"temp file of pid {m.group(1)}")
        return OtherFile(path, st.st_size, "foreign", "not a <sha1>.kv checkpoint")

    def _scan(self, full: bool) -> None:
        """Refresh the index; unless ``full``, skip when the directory is unchanged."""
        try:
            dst = os.stat(self.dir)
        except OSError as err:
            raise KVStoreError(f"{self.dir}: {err.strerror or err}") from err
        if not full and self._dir_mtime_ns == dst.st_mtime_ns:
            return
        cache: dict[str, tuple[tuple[int, int, int], Entry | OtherFile]] = {}
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
                        if de.name == QUARANTINE_DIR:
                            extra += [OtherFile(q, q.lstat().st_size, "quarantined", "moved by kv verify")
                                      for q in sorted(path.iterdir()) if q.is_file()]
                        else:
                            extra.append(OtherFile(path, _tree_size(path), "foreign", "a subdirectory"))
                        continue
                    key = (st.st_ino, st.st_size, st.st_mtime_ns)
                    prev = self._cache.get(de.name)
                    cache[de.name] = (key, prev[1] if prev and prev[0] == key else self._classify(path, st))
        except OSError as err:
            raise KVStoreError(f"{self.dir}: cannot list cache directory: {err.strerror or err}") from err
        self._cache, self._extra = cache, extra
        # a directory changed within RACY_S may change again within the same timestamp tick
        racy = time.time() - dst.st_mtime < RACY_S
        self._dir_mtime_ns = None if racy else dst.st_mtime_ns

    def _items(self) -> list[Entry | OtherFile]:
        return [item for _, item in self._cache.values()] + self._extra

    def _index(self) -> dict[str, Entry]:
        out: dict[str, Entry] = {}
        for item in self._items():
            if isinstance(item, Entry) and item.sha not in out:
                out[item.sha] = item
        return out

    def entries(self) -> list[Entry]:
        """Valid-looking checkpoints, most recently used first, then newest, then by name
        (a stable order: timestamps have one-second resolution). Fresh stat of every file."""
        with self.lock.shared():
            self._scan(full=True)
        by_name = sorted(self._index().values(), key=lambda e: e.sha)
        return sorted(by_name, key=lambda e: (e.header.last_used, e.header.created_at), reverse=True)

    def others(self) -> list[OtherFile]:
        """Every non-checkpoint file counted against the budget."""
        with self.lock.shared():
            self._scan(full=True)
        index = self._index()
        dup = [OtherFile(i.path, i.file_size, "invalid", f"duplicate of {index[i.sha].path.name} (name case)")
               for i in self._items() if isinstance(i, Entry) and index[i.sha] is not i]
        return [i for i in self._items() if isinstance(i, OtherFile)] + dup

    def foreign(self) -> list[OtherFile]:
        """Files that are not ours to touch (plus quarantined ones and stale temp files)."""
        return [o for o in self.others() if o.kind != "invalid"]

    def invalid(self) -> list[OtherFile]:
        """``<sha>.kv`` names whose header does not parse (kept, counted, reported)."""
        return [o for o in self.others() if o.kind == "invalid"]

    def total_bytes(self) -> int:
        """Bytes of every file in the directory (what the budget limits)."""
        with self.lock.shared():
            self._scan(full=True)
        return self._total()

    def _total(self) -> int:
        return sum(i.file_size if isinstance(i, Entry) else i.size for i in self._items())

    # ---- lookup --------------------------------------------------------------------------
    def lookup(self, prompt_text: str | bytes, ctx: int, min_tokens: int | None = None) -> Entry | None:
        """The checkpoint whose text is the longest byte prefix of the prompt, usable at
        ``ctx`` (file ctx <= ctx) with at least ``min_tokens`` tokens; None on a miss.

        Hashes the prompt once, incrementally, taking a SHA-1 digest at each text length
        present in the index; the winner's stored text is then compared byte for byte.
        """
        prompt = encode_text(prompt_text)
        floor = self.min_tokens if min_tokens is None else min_tokens
        with self.lock.shared():
            self._scan(full=False)
            index = self._index()
            lengths = sorted({e.text_bytes for e in index.values() if e.text_bytes <= len(prompt)})
            h, pos, matched = hashlib.sha1(), 0, []
            for n in lengths:
                h.update(prompt[pos:n])
                pos = n
                e = index.get(h.hexdigest())
                if e is not None and e.text_bytes == n:
                    matched.append(e)
            rejected: list[str] = []
            for e in reversed(matched):
                why = self._reject(e, ctx, floor)
                if why is None and not self._text_matches(e, prompt):
                    why = "text-mismatch"
                if why is None:
                    self._emit(Hit(path=e.path, tokens=e.tokens, text_bytes=e.text_bytes, prompt_bytes=len(prompt)))
                    return e
                rejected.append(why)
        reason = rejected[0] if rejected else ("no-entries" if not index else "no-prefix-match")
        self._emit(Miss(prompt_bytes=len(prompt), reason=reason, candidates=len(rejected)))
        return None

    def _reject(self, e: Entry, ctx: int, floor: int) -> str | None:
        failed = self._failed.get(e.path.name)
        if failed is not None and self._cache.get(e.path.name, (None,))[0] == failed:
            return "failed-before"  # unchanged since a load of it failed: don't pay for it again
        if e.tokens < floor:
            return "below-min-tokens"
        if e.ctx > ctx:
            return "ctx-too-large"
        if e.header.reserved7 != self.model_id:
            return "model-mismatch"
        if self.reject_different_quant and e.header.quant_bits != self.quant_bits:
            return "quant-mismatch"
        return None

    def _text_matches(self, e: Entry, prompt: bytes) -> bool:
        try:
            with open(e.path, "rb") as f:
                f.seek(TEXT_OFFSET)
                return f.read(e.text_bytes) == prompt[: e.text_bytes]
        except OSError:
            return False

    # ---- load ----------------------------------------------------------------------------
    def load(self, entry_or_path: Entry | str | os.PathLike, layout: StateLayout, ctx: int, *,
             prompt: str | bytes | None = None, prefill_chunk: int | None = None, verify: bool = True,
             progress: Progress | None = None) -> tuple[SessionState, bytes]:
        """Restore a checkpoint as a new SessionState for a runtime of ``ctx`` tokens, and
        its stored text (bytes). With ``prompt``, the text must be its byte prefix.

        Runs every check (header, SHA-1 name, checksums unless ``verify`` is False, every
        payload check, token count) while holding the shared lock. On success the header's
        hits and last_used are updated in place (or the file is consumed when configured);
        on failure raises KVLoadError, records LoadFailed and keeps the file. ``progress``
        gets (payload bytes read, payload bytes) as the payload streams in.
        """
        path = entry_or_path.path if isinstance(entry_or_path, Entry) else Path(entry_or_path)
        name = str(path)
        t0 = time.perf_counter()
        try:
            with self.lock.shared():
                with open(path, "rb", buffering=0) as f:
                    header, text, state, trailer = read_kv_file(f, layout, ctx, name=name, prefill_chunk=prefill_chunk,
                                                                verify=verify, progress=progress)
                    ino = os.fstat(f.fileno()).st_ino
            m = NAME_RE.match(path.name)
            if m and text_sha(text) != m.group(1).lower():
                raise KVFormatError(f"{name}: cached text hash mismatch: SHA-1(text) != file name")
            if prompt is not None and not encode_text(prompt).startswith(text):
                raise KVFormatError(f"{name}: cached text prefix mismatch: stored text is not a prefix of the prompt")
        except FileNotFoundError as err:
            self._emit(LoadFailed(path=path, error=f"{name}: no longer exists"))
            raise KVLoadError(f"{name}: no longer exists (evicted or consumed?)") from err
        except (KVFormatError, OSError) as err:
            msg = str(err) if isinstance(err, KVFormatError) else f"{name}: {err.strerror or err}"
            try:
                st = os.stat(path)
                self._failed[path.name] = (st.st_ino, st.st_size, st.st_mtime_ns)
            except OSError:
                pass
            self._emit(LoadFailed(path=path, error=msg))
            raise KVLoadError(msg) from err
        self._failed.pop(path.name, None)
        assert state is not None
        if self.consume_on_load_above is not None and header.tokens > self.consume_on_load_above:
            self._consume(path, ino, header.tokens)
        else:
            self._touch(path, ino, hit=True)
        self._emit(Loaded(path=path, tokens=header.tokens, bytes=header.file_size, seconds=time.perf_counter() - t0,
                          checksum=_checksum_status(trailer, verify)))
        return state, text

    def _touch(self, path: Path, ino: int, hit: bool) -> None:
        """hits += 1 (if ``hit``) and last_used = now, written in place under the exclusive
        lock. Each field is one small pwrite of a field the checksum does not cover, so a
        torn update leaves a valid file."""
        try:
            with self.lock.exclusive():
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
                try:
                    if os.fstat(fd).st_ino != ino:
                        return  # replaced meanwhile: not the file we read
                    if hit:
                        (hits,) = struct.unpack("<I", os.pread(fd, 4, OFF_HITS))
                        os.pwrite(fd, struct.pack("<I", min(hits + 1, 2**32 - 1)), OFF_HITS)
                    os.pwrite(fd, struct.pack("<Q", int(time.time())), OFF_LAST_USED)
                finally:
                    os.close(fd)
        except FileNotFoundError:
            return
        except OSError:
            return  # a read-only directory: the hit is not recorded, the load still succeeded

    def _consume(self, path: Path, ino: int, tokens: int) -> None:
        with self.lock.exclusive():
            try:
                if os.stat(path).st_ino == ino:
                    os.unlink(path)
                    self._emit(Consumed(path=path, tokens=tokens))
            except OSError:
                pass

    # ---- save -----------------------------------------------------------------------------
    def save(self, state: SessionState, text: str | bytes, reason: SaveReason, durable: bool = False,
             mode: str = "direct", *, ext_flags: int = 0, protect: Iterable[Entry | str] = (),
             progress: Progress | None = None) -> SaveResult:
        """Write ``state`` as ``<sha1(text)>.kv``.

        ``mode`` "direct" streams header, text and payload straight into
        ``<sha>.kv.tmp.<pid>`` in this directory; "staged" (for benchmarks: later upstream
        ds4's way) first serializes the payload to a temp file under the system temp dir
        and copies it in. The bytes written must equal the predicted size before the
        atomic rename; ``durable`` fsyncs the file and the directory. Room is made before
        writing; the files in ``protect`` (entries or shas) and the new file are not
        evicted. A same-key file that is compatible is kept (status "exists", last_used
        refreshed); an incompatible or invalid one is replaced. Raises KVSaveError on
        failure, after removing the temp file. ``progress`` gets (payload bytes written,
        payload bytes) after each layer.
        """
        if mode not in ("direct", "staged"):
            raise KVStoreError(f"save mode {mode!r}, expected 'direct' or 'staged'")
        key = encode_text(text)
        sha = text_sha(key)
        final = self.dir / f"{sha}.kv"
        rules = self.eviction
        keep = {sha} | ({p.sha if isinstance(p, Entry) else str(p).lower() for p in protect}
                        if rules.protect_hit else set())
        t0 = time.perf_counter()
        with self._save_mutex:
            try:
                predicted = kv_file_bytes(state, len(key), self.checksum)
            except KVFormatError as err:
                self._emit(SaveFailed(path=final, tokens=state.n_tokens, error=str(err)))
                raise KVSaveError(f"{final}: {err}") from err
            existing, ino = self._same_key(final, key, state.ctx)
            if existing == "compatible":
                self._touch(final, ino, hit=False)
                self._emit(SaveSkipped(path=final, tokens=state.n_tokens, bytes=0, why="already-stored"))
                return SaveResult(final, "exists", 0, time.perf_counter() - t0, detail="already-stored")
            budget = self.budget_bytes
            if not rules.admits(predicted, budget):
                self._emit(SaveSkipped(path=final, tokens=state.n_tokens, bytes=predicted, why="exceeds-budget"))
                return SaveResult(final, "skipped", 0, time.perf_counter() - t0,
                                  detail=f"file of {predicted} bytes exceeds the budget of {budget}")
            evicted: list[Evicted] = []
            room = True
            if budget is not None and rules.pre_write:
                with self.lock.exclusive():
                    self._scan(full=True)
                    evicted = self._evict(budget, keep, incoming=predicted, replacing=final.name, why="make-room",
                                          incoming_text=key)
                    room = self._total() - self._size_of(final.name) + predicted <= budget
            if not room:
                self._emit(SaveSkipped(path=final, tokens=state.n_tokens, bytes=predicted, why="no-room"))
                return SaveResult(final, "skipped", 0, time.perf_counter() - t0, evicted,
                                  detail="budget is held by protected, foreign or invalid files")
            tmp = tmp_path(final)
            try:
                header, written = self._write_tmp(tmp, state, key, reason, ext_flags, mode, durable, progress)
                on_disk = os.stat(tmp).st_size
                if written != predicted or on_disk != predicted:
                    raise KVSaveError(f"{tmp}: wrote {written} bytes ({on_disk} on disk), predicted {predicted}; "
                                      "not publishing")
                with self.lock.exclusive():
                    os.replace(tmp, final)
                    if durable:
                        fsync_dir(self.dir)
                    st = os.stat(final)  # index the new file from the header just written
                    self._cache[final.name] = ((st.st_ino, st.st_size, st.st_mtime_ns), Entry(
                        final, sha, replace(header, file_size=st.st_size), st.st_mtime_ns))
                    if existing is not None:
                        self._emit(Replaced(path=final, why=existing))
                    if budget is not None and rules.post_write:
                        self._scan(full=True)
                        evicted += self._evict(budget, keep, incoming=0, replacing="", why="disk-cache-full")
            except BaseException as err:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
                if not isinstance(err, Exception):
                    raise
                msg = str(err) if isinstance(err, KVStoreError) else \
                    f"{tmp}: {err.strerror or err}" if isinstance(err, OSError) else f"{tmp}: {err}"
                if isinstance(err, OSError) and err.errno == errno.ENOSPC:
                    msg += " (disk full)"
                self._emit(SaveFailed(path=final, tokens=state.n_tokens, error=msg))
                raise KVSaveError(msg) from err
        seconds = time.perf_counter() - t0
        self._emit(Saved(path=final, tokens=state.n_tokens, bytes=predicted, seconds=seconds,
                         reason=SaveReason(reason).name.lower(), mode=mode, durable=durable))
        return SaveResult(final, "saved", predicted, seconds, evicted)

    def _same_key(self, final: Path, key: bytes, ctx: int) -> tuple[str | None, int]:
        """(None: no file | 'compatible' | why the same-name file gets replaced, its inode)."""
        try:
            with self.lock.shared():
                with open(final, "rb") as f:
                    st = os.fstat(f.fileno())
                    header = parse_header(f.read(TEXT_OFFSET), str(final), st.st_size)
                    text = read_text(f, header, str(final))
        except FileNotFoundError:
            return None, 0
        except (KVFormatError, OSError) as err:
            return f"invalid file: {err}", 0
        if text != key:
            why = "stored text differs (SHA-1 collision)"
        elif header.ctx > ctx:
            why = f"written for a larger context ({header.ctx} > {ctx})"
        elif self.reject_different_quant and header.quant_bits != self.quant_bits:
            why = f"quant bits {header.quant_bits} != {self.quant_bits}"
        else:
            why = "compatible"
        return why, st.st_ino

    def _write_tmp(self, tmp: Path, state: SessionState, key: bytes, reason: SaveReason, ext_flags: int,
                   mode: str, durable: bool, progress: Progress | None) -> tuple[KVHeader, int]:
        if tmp.exists():  # left by this very process (pids are unique among live processes)
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "wb", buffering=0) as f:
            now = int(time.time())
            if mode == "direct":
                header, n = write_kv_file(f, state, key, quant_bits=self.quant_bits, reason=reason,
                                          ext_flags=ext_flags, checksum=self.checksum, now=now, progress=progress)
            else:
                header, n = self._write_staged(f, state, key, reason, ext_flags, now, progress)
            if durable:
                os.fsync(f.fileno())
        return header, n

    def _write_staged(self, f: BinaryIO, state: SessionState, key: bytes, reason: SaveReason, ext_flags: int,
                      now: int, progress: Progress | None) -> tuple[KVHeader, int]:
        sfd, spath = tempfile.mkstemp(prefix="ds4-session-payload.")
        try:
            with os.fdopen(sfd, "w+b", buffering=0) as sf:
                crc = ChunkCRC() if self.checksum else None
                write_payload(sf, state, crc, progress)
                measured = os.fstat(sf.fileno()).st_size
                header = make_header(state, key, quant_bits=self.quant_bits, reason=reason, ext_flags=ext_flags,
                                     checksum=self.checksum, now=now, payload_len=measured)
                head = header.pack()
                n = write_all(f, head) + write_all(f, key)
                sf.seek(0)
                buf = bytearray(COPY_CHUNK)
                view = memoryview(buf)
                while True:
                    got = sf.readinto(view)
                    if not got:
                        break
                    n += write_all(f, view[:got])
                if crc is not None:
                    n += write_all(f, Checksums(CHECKSUM_CHUNK, header_crc(head), text_crc(key), crc.finish(),
                                                crc.algorithm).pack())
            return header, n
        finally:
            os.unlink(spath)

    # ---- eviction ---------------------------------------------------------------------------
    def remove(self, entry: Entry | str | os.PathLike) -> Path:
        """Delete one checkpoint of this directory (under the exclusive lock, so no other
        process is mid-read of it). Only ``<sha>.kv`` files are removed."""
        path = entry.path if isinstance(entry, Entry) else Path(entry)
        if path.parent.resolve() != self.dir.resolve() or not NAME_RE.match(path.name):
            raise KVStoreError(f"{path}: not a checkpoint of {self.dir}")
        with self.lock.exclusive():
            try:
                path.unlink()
            except FileNotFoundError:
                raise KVStoreError(f"{path}: no longer exists") from None
        return path

    def score(self, entry: Entry, now: float | None = None) -> float:
        """The entry's keep-worthiness under the store's eviction order (higher survives longer)."""
        return keep_value(self._candidate(entry, b""), time.time() if now is None else now, self.eviction)[0]

    @staticmethod
    def _candidate(e: Entry, incoming_text: bytes) -> Candidate:
        """Eviction's view of an entry; ``incoming_text`` is the text being written (or b"")."""
        h = e.header
        prefix = (h.reason == SaveReason.CONTINUED and h.text_bytes < len(incoming_text)
                  and text_sha(incoming_text[:h.text_bytes]) == e.sha)
        return Candidate(e.sha, h.tokens, h.file_size, h.hits, h.last_used, h.created_at, h.reason, prefix)

    def _size_of(self, name: str) -> int:
        item = self._cache.get(name)
        if item is None:
            return 0
        return item[1].file_size if isinstance(item[1], Entry) else item[1].size

    def _evict(self, budget: int | None, protect: set[str], incoming: int, replacing: str, why: str,
               dry_run: bool = False, incoming_text: bytes = b"") -> list[Evicted]:
        """Unlink the entries ``plan_eviction`` picks until the directory plus ``incoming``
        bytes (minus the file being replaced) fits ``budget``. Caller holds the exclusive
        lock, index fresh. ``dry_run`` only returns what would go (no unlink, no events)."""
        if budget is None:
            return []
        now = time.time()
        entries = {e.sha: e for e in self._index().values() if e.path.name != replacing}
        candidates = [self._candidate(e, incoming_text) for e in entries.values()]
        victims = plan_eviction(candidates, self._total() - self._size_of(replacing), budget, self.eviction, now,
                                incoming, protect)
        out = []
        for c in victims:
            e = entries[c.key]
            event = Evicted(path=e.path, tokens=e.tokens, bytes=e.file_size, score=keep_value(c, now, self.eviction)[0],
                            save_reason=e.header.reason.name.lower(), why=why)
            if dry_run:
                out.append(event)
                continue
            try:
                os.unlink(e.path)
            except FileNotFoundError:
                pass
            except OSError:
                break  # as ds4: stop the pass when an unlink fails
            self._cache.pop(e.path.name, None)
            out.append(self._emit(event))
        return out

    def evict_to_budget(self, budget_mb: float | None = None, dry_run: bool = False) -> list[Evicted]:
        """Evict until every file together fits the budget (``budget_mb`` overrides the
        store's); ``dry_run`` lists the victims without removing them."""
        budget = self.budget_bytes if budget_mb is None else int(budget_mb * MiB)
        if budget is None:
            return []
        try:
            with self.lock.exclusive():
                self._scan(full=True)
                return self._evict(budget, set(), 0, "", "disk-cache-full", dry_run)
        except OSError as err:
            raise KVStoreError(f"{self.dir}: cannot lock for eviction: {err.strerror or err}") from err

    def sweep_tmp(self) -> list[TmpSwept]:
        """Remove ``<sha>.kv.tmp.<pid>`` files whose process is gone and that are older than
        the grace period (crash leftovers, ds4's included)."""
        out = []
        now = time.time()
        try:
            with self.lock.exclusive():
                self._scan(full=True)
                for item in self._items():
                    if not isinstance(item, OtherFile) or item.kind != "tmp":
                        continue
                    pid = int(TMP_RE.match(item.path.name).group(1))
                    try:
                        age = now - item.path.stat().st_mtime
                    except FileNotFoundError:
                        continue
                    if pid == os.getpid() or _pid_alive(pid) or age < self.tmp_grace_s:
                        continue
                    try:
                        item.path.unlink()
                    except OSError:
                        continue
                    out.append(self._emit(TmpSwept(path=item.path, bytes=item.size)))
                if out:
                    self._scan(full=True)
        except OSError:
            return out  # read-only directory: nothing to sweep
        return out

    # ---- verification -------------------------------------------------------------------------
    def verify(self, layout: StateLayout | None = None, ctx: int | None = None, quarantine: bool = False,
               layout_note: str = "") -> list[VerifyReport]:
        """Check every checkpoint end to end against ``layout`` (None: per file, inferred)
        and runtime ``ctx`` (None: each file's own), and report invalid ones; with
        ``quarantine``, move failing files to ``<dir>/quarantine/``. Never deletes anything."""
        reports = []
        for path in sorted(e.path for e in self.entries()) + sorted(o.path for o in self.invalid()):
            with self.lock.shared():
                rep = verify_file(path, layout, ctx, layout_note)
            if not rep.ok and quarantine:
                self.quarantine(path, rep.error)
            reports.append(rep)
        return reports

    def quarantine(self, path: str | os.PathLike, error: str = "") -> Path:
        """Move a file into ``<dir>/quarantine/`` (kept, still counted, no longer looked up)."""
        src = Path(path)
        qdir = self.dir / QUARANTINE_DIR
        with self.lock.exclusive():
            qdir.mkdir(mode=0o700, exist_ok=True)
            dest = qdir / src.name
            n = 1
            while dest.exists():
                dest = qdir / f"{src.name}.{n}"
                n += 1
            os.replace(src, dest)
            self._cache.pop(src.name, None)
        self._emit(Quarantined(path=src, dest=dest, error=error))
        return dest

