"""The disk prefix cache: a directory of ds4 ``.kv`` files keyed by rendered text.

Each file is ``<sha1(text)>.kv`` (40 lower-case hex), readable by ds4-server and written
exactly as today's ds4 writes them (model id, ABI 2, DSV4 version 2), plus the
workbench's footer (checksums, model fingerprint) that ds4 ignores (see
``workbench.kv.kvfile``). A load first checks the file belongs to this model
(``model_mismatch``: fingerprint, else model id and quant bits); a file of another model
is a miss with that reason, and is kept. The store keeps an in-memory index (``workbench.kv.index``)
refreshed only when the directory changed; which file serves a prompt and which files to
evict are pure decisions over that index's metadata (``workbench.kv.lookup``,
``workbench.kv.eviction``), so a replay without files runs the same rules.

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
``protect``-ed files (the lookup's hit) are spared only with ``protect_hit``. When the
files the store does not own exceed the budget on their own, nothing is evicted (a
``BudgetHeld`` event says so). Lookup skips
files of another model id (header byte 7) and, with ``reject_different_quant``, of other
quant bits, as ds4 does. Processes sharing a directory coordinate through
``workbench.kv.lock.DirLock``. Every operation records a typed event
(``workbench.kv.events``) in ``store.events`` and passes it to each subscriber.

Hostile directories: links and other non-regular files are foreign (never loaded, touched,
replaced or evicted: loads, touches, same-key checks and temp files open with
``O_NOFOLLOW``; quarantine and ``chain/`` are never entered through a link); a file that
failed to load is skipped by lookups and replaced by the next save of its key (the save's
``detail`` says so), while a same-name file this process cannot read, or a foreign one,
is kept and the save skipped with the reason.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Protocol

from workbench.atomic import fsync_dir, tmp_path
from workbench.kv.errors import KVFormatError, KVLoadError, KVSaveError, KVStoreError
from workbench.kv.events import (
    Consumed, Evicted, Hit, KVEvent, LoadFailed, Loaded, Miss, Replaced, Saved, SaveFailed, SaveSkipped,
)
from workbench.kv.header import (
    MODEL_FLASH, OFF_HITS, OFF_LAST_USED, TEXT_OFFSET, KVHeader, SaveReason, encode_text, parse_header, read_text,
    text_sha,
)
from workbench.kv.chain import CHAIN_SUFFIX, Link, read_chain
from workbench.kv.chainstore import MAX_DEPTH, ChainOps
from workbench.kv.index import NAME_RE, DirIndex, Entry, OtherFile
from workbench.kv.kvfile import kv_file_bytes, model_mismatch, read_kv_file, write_kv_file
from workbench.kv.lock import DirLock, LockError
from workbench.kv.lookup import LookupRules, decide
from workbench.kv.maintenance import MiB, Maintenance, budget_held_message
from workbench.kv.eviction import EvictionRules
from workbench.kv.policy import KVPolicy
from workbench.kv.stream import Progress
from workbench.kv.trailers import read_trailer
from workbench.safeopen import NotRegularFileError, open_regular
from workbench.spec.statelayout import StateLayout
from workbench.state import SessionState


READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)  # errnos of a directory this process may not write
DISK_WORDS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only disk",
              errno.EACCES: "no write permission", errno.EPERM: "no write permission"}


class _OtherModel(KVFormatError):
    """A checkpoint written by another model (``model_mismatch``'s reason)."""


class _Kept(KVStoreError):
    """A same-name file the save must not replace (the message says why)."""


class KVWriter(Protocol):
    """Writes a whole .kv file into ``f`` (``workbench.kv.kvfile.write_kv_file``'s signature);
    returns the header written and the byte count."""

    __name__: str

    def __call__(self, f: BinaryIO, state: SessionState, text: bytes, *, quant_bits: int, reason: SaveReason,
                 ext_flags: int = 0, checksum: bool = True, now: int, hits: int = 0,
                 progress: Progress | None = None, model_id: int = MODEL_FLASH,
                 fingerprint: bytes | None = None) -> tuple[KVHeader, int]: ...


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


class KVStore(ChainOps, Maintenance):
    """A ds4-compatible KV checkpoint directory with a disk budget.

    ``budget_mb`` (MiB, None: unlimited) caps the bytes of *all* files in the directory;
    ``min_tokens`` is the default lookup floor; ``quant_bits`` (2 or 4) is written into
    new headers and, with ``reject_different_quant``, required on lookup; ``model_id``
    (header byte 7, Flash 0) is required on lookup. ``eviction`` (None: today's ds4) says
    which files go and when. ``maintain``
    sweeps stale temp files of dead processes (older than ``tmp_grace_s``) and evicts to
    the budget on open, as ds4 does at startup; pass False to only read. ``on_event`` (and
    every ``subscribe``-d function) is called with each event, possibly while the
    directory lock is held: it must not call back into the store. ``kv_layout`` "flat"
    writes ds4's ``<sha>.kv`` files; "chain" writes ``chain/<sha>.kvd`` entries over a
    stored parent, at most ``max_depth`` links deep (``workbench.kv.chainstore``); either
    store reads both.
    """

    def __init__(self, directory: str | os.PathLike, budget_mb: float | None = 4096, min_tokens: int = 512, *,
                 quant_bits: int = 2, reject_different_quant: bool = False, checksum: bool = True,
                 eviction: EvictionRules | None = None, model_id: int = MODEL_FLASH, fingerprint: bytes | None = None,
                 consume_on_load_above: int | None = None,
                 tmp_grace_s: float = 60.0, create: bool = True,
                 maintain: bool = True, on_event: Callable[[KVEvent], None] | None = None, events_max: int = 1000,
                 kv_layout: str = "flat", max_depth: int = MAX_DEPTH):
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
        if max_depth < 1:
            raise KVStoreError(f"{self.dir}: chain max depth {max_depth}, expected >= 1")
        self.use_layout(kv_layout)
        self.max_depth = max_depth
        self.budget_mb = budget_mb
        self.min_tokens = min_tokens
        self.quant_bits = quant_bits
        self.reject_different_quant = reject_different_quant
        self.checksum = checksum
        self.eviction = eviction or EvictionRules()
        self.model_id = model_id
        self.fingerprint = fingerprint
        self.consume_on_load_above = consume_on_load_above
        self.tmp_grace_s = tmp_grace_s
        self.listeners: list[Callable[[KVEvent], None]] = [] if on_event is None else [on_event]
        self.events: deque[KVEvent] = deque(maxlen=events_max)
        self.lock = DirLock(self.dir)
        self.index = DirIndex(self.dir)
        self._save_mutex = threading.Lock()
        self._failed: dict[str, tuple[tuple[int, int, int], str, bool]] = {}  # name -> (stat key, why, replace)
        if maintain:
            self.sweep_tmp()
            try:
                self.evict_to_budget()
            except LockError as err:
                if err.errno not in READ_ONLY:
                    raise  # a directory this process may not write: saves will say so, reads work

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

    @property
    def budget_bytes(self) -> int | None:
        return None if self.budget_mb is None else int(self.budget_mb * MiB)

    @property
    def rules(self) -> LookupRules:
        return LookupRules(self.min_tokens, self.quant_bits, self.reject_different_quant, self.model_id)

    # ---- events -----------------------------------------------------------------------
    def subscribe(self, listener: Callable[[KVEvent], None]) -> Callable[[], None]:
        """Call ``listener`` with every event from now on; returns the function that stops it."""
        self.listeners.append(listener)
        return lambda: self.listeners.remove(listener) if listener in self.listeners else None

    def _emit(self, event: KVEvent) -> KVEvent:
        self.events.append(event)
        for listener in list(self.listeners):
            listener(event)
        return event

    # ---- the directory ----------------------------------------------------------------
    def entries(self) -> list[Entry]:
        """Valid-looking checkpoints, most recently used first, then newest, then by name
        (a stable order: timestamps have one-second resolution). Fresh stat of every file."""
        with self.lock.shared():
            self.index.scan(full=True)
        by_name = sorted(self.index.entries().values(), key=lambda e: e.sha)
        return sorted(by_name, key=lambda e: (e.last_used, e.created_at), reverse=True)

    def others(self) -> list[OtherFile]:
        """Every non-checkpoint file counted against the budget."""
        with self.lock.shared():
            self.index.scan(full=True)
        return self.index.others()

    def foreign(self) -> list[OtherFile]:
        """Files that are not ours to touch (plus quarantined ones and stale temp files)."""
        return [o for o in self.others() if o.kind != "invalid"]

    def invalid(self) -> list[OtherFile]:
        """``<sha>.kv`` names whose header does not parse (kept, counted, reported)."""
        return [o for o in self.others() if o.kind == "invalid"]

    def total_bytes(self) -> int:
        """Bytes of every file in the directory (what the budget limits)."""
        with self.lock.shared():
            self.index.scan(full=True)
        return self.index.total()

    # ---- lookup --------------------------------------------------------------------------
    def lookup(self, prompt_text: str | bytes, ctx: int, min_tokens: int | None = None) -> Entry | None:
        """The checkpoint whose text is the longest byte prefix of the prompt, usable at
        ``ctx`` (file ctx <= ctx) with at least ``min_tokens`` tokens; None on a miss
        (``workbench.kv.lookup.decide`` over the index; the winner's stored text is then
        compared byte for byte)."""
        prompt = encode_text(prompt_text)
        with self.lock.shared():
            self.index.scan(full=False)
            index = self.index.entries()
            failed = {e.sha for e in index.values() if self.failed_load(e.path.name, self.index.stat_key(e.key))}
            d = decide(prompt, index, ctx, self.rules, lambda e: self._text_matches(e, prompt), failed, min_tokens)
            if d.hit is not None:
                e = d.hit
                self._emit(Hit(path=e.path, tokens=e.tokens, text_bytes=e.text_bytes, prompt_bytes=len(prompt)))
                return e
        self._emit(Miss(prompt_bytes=len(prompt), reason=d.reason, candidates=d.candidates))
        return None

    def failed_load(self, name: str, key: tuple[int, int, int] | None) -> str | None:
        """Why the file ``name`` (with stat ``key``) failed to load in this store (None: it did
        not, or it changed since)."""
        bad = self._failed.get(name)
        return bad[1] if bad is not None and bad[0] == key else None

    def _text_matches(self, e: Entry, prompt: bytes) -> bool:
        try:
            with open_regular(e.path, follow=False) as f:
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
                if path.suffix == CHAIN_SUFFIX:
                    state, text, header, links = read_chain(path, layout, ctx, prefill_chunk=prefill_chunk,
                                                            verify=verify, model_check=self._piece_check(path))
                    trailer, ino = links[-1].trailer, os.stat(path).st_ino
                else:
                    with open_regular(path, follow=False) as f:  # links are foreign files: never read
                        self._check_model(f, name)
                        header, text, state, trailer = read_kv_file(f, layout, ctx, name=name, verify=verify,
                                                                    prefill_chunk=prefill_chunk, progress=progress)
                        ino = os.fstat(f.fileno()).st_ino
            m = NAME_RE.match(path.name)
            if m and text_sha(text) != m.group(1).lower():
                raise KVFormatError(f"{name}: cached text hash mismatch: SHA-1(text) != file name")
            if prompt is not None and not encode_text(prompt).startswith(text):
                raise KVFormatError(f"{name}: cached text prefix mismatch: stored text is not a prefix of the prompt")
        except FileNotFoundError as err:
            self._emit(LoadFailed(path=path, error=f"{name}: no longer exists"))
            raise KVLoadError(f"{name}: no longer exists (evicted or consumed?)") from err
        except _OtherModel as err:  # a valid file of another model: a miss, not a bad entry
            self._emit(LoadFailed(path=path, error=str(err)))
            raise KVLoadError(str(err)) from err
        except (KVFormatError, OSError) as err:
            msg = str(err) if isinstance(err, KVFormatError) else f"{name}: {err.strerror or err}"
            try:  # a broken file is replaced by the next save of its key; one we cannot read is kept
                st = os.lstat(path)
                self._failed[path.name] = ((st.st_ino, st.st_size, st.st_mtime_ns), msg,
                                           isinstance(err, KVFormatError))
            except OSError:
                pass
            self._emit(LoadFailed(path=path, error=msg))
            raise KVLoadError(msg) from err
        self._failed.pop(path.name, None)
        assert state is not None
        if (self.consume_on_load_above is not None and header.tokens > self.consume_on_load_above
                and path.name[:40].lower() not in self.index.children()):  # a parent stays
            self._consume(path, ino, header.tokens)
        else:
            self._touch(path, ino, hit=True)
        self._emit(Loaded(path=path, tokens=header.tokens, bytes=header.file_size, seconds=time.perf_counter() - t0,
                          checksum="absent" if trailer is None else trailer.checksum_status(verify)))
        return state, text

    def _check_model(self, f: BinaryIO, name: str) -> None:
        """Raise _OtherModel when the open file was written by another model (header and
        trailers only: the payload is not read)."""
        header = parse_header(f.read(TEXT_OFFSET), name, os.fstat(f.fileno()).st_size)
        why = model_mismatch(header, read_trailer(f, header, name), model_id=self.model_id,
                             quant_bits=self.quant_bits, fingerprint=self.fingerprint)
        if why is not None:
            raise _OtherModel(f"{name}: {why}")
        f.seek(0)

    def _piece_check(self, leaf: Path) -> Callable[[Link], None]:
        """The model check of a chain's pieces (called leaf first): a leaf of another model
        raises _OtherModel (a miss, as a flat file's); an ancestor of another model under
        this model's leaf makes the entry corrupt (KVFormatError)."""

        def check_piece(link: Link) -> None:
            why = model_mismatch(link.header, link.trailer, model_id=self.model_id, quant_bits=self.quant_bits,
                                 fingerprint=self.fingerprint)
            if why is not None:
                raise _OtherModel(f"{leaf}: {why}") if link.path == leaf else \
                    KVFormatError(f"{leaf}: chain piece {link.path.name} {why}")

        return check_piece

    def _touch(self, path: Path, ino: int, hit: bool) -> None:
        """hits += 1 (if ``hit``) and last_used = now, written in place under the exclusive
        lock. Each field is one small pwrite of a field the checksum does not cover, so a
        torn update leaves a valid file."""
        try:
            with self.lock.exclusive():  # O_NOFOLLOW: never write through a link out of the directory
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
                try:
                    if os.fstat(fd).st_ino != ino:
                        return  # replaced meanwhile: not the file we read
                    if hit:
                        (hits,) = struct.unpack("<I", os.pread(fd, 4, OFF_HITS))
                        os.pwrite(fd, struct.pack("<I", min(hits + 1, 2**32 - 1)), OFF_HITS)
                    os.pwrite(fd, struct.pack("<Q", int(time.time())), OFF_LAST_USED)
                finally:
                    os.close(fd)
        except (OSError, LockError):
            return  # gone, a link, or a read-only directory: the hit is not recorded, the load still succeeded

    def _consume(self, path: Path, ino: int, tokens: int) -> None:
        try:
            with self.lock.exclusive():
                if os.lstat(path).st_ino == ino:
                    os.unlink(path)
                    self._emit(Consumed(path=path, tokens=tokens))
        except (OSError, LockError):
            pass

    # ---- save -----------------------------------------------------------------------------
    def save(self, state: SessionState, text: str | bytes, reason: SaveReason, durable: bool = False, *,
             ext_flags: int = 0, protect: Iterable[Entry | str] = (), progress: Progress | None = None,
             writer: KVWriter | None = None) -> SaveResult:
        """Write ``state`` as ``<sha1(text)>.kv``.

        The file is streamed straight into ``<sha>.kv.tmp.<pid>`` in this directory by
        ``writer`` (None: ``write_kv_file``; the benchmark passes ds4's later staged writer,
        ``workbench.bench.staged``). The bytes written must equal the predicted size before
        the atomic rename; ``durable`` fsyncs the file and the directory. Room is made
        before writing; the files in ``protect`` (entries or shas) and the new file are not
        evicted. A same-key file that is compatible is kept (status "exists", last_used
        refreshed; for a chain save, the flat file of the name too: one entry per name,
        ``workbench.kv.chainstore``); an incompatible or invalid one is replaced. Raises KVSaveError on
        failure, after removing the temp file. ``progress`` gets (payload bytes written,
        payload bytes) after each layer.
        """
        key = encode_text(text)
        sha = text_sha(key)
        final = self.dir / f"{sha}.kv"
        why = SaveReason(reason).name.lower()
        rules = self.eviction
        keep = {sha} | ({p.sha if isinstance(p, Entry) else str(p).lower() for p in protect}
                        if rules.protect_hit else set())
        if self.kv_layout == "chain":  # fsynced before visible: a parent precedes its children on disk
            final, chain_size, writer, parent = self._chain_plan(state, key, sha)
            keep |= parent  # the parent this entry will name is never evicted to make room for it
            durable = True
        name = str(final.relative_to(self.dir))  # the index's key
        t0 = time.perf_counter()

        def skipped(status: str, nbytes: int, skip: str, detail: str, evicted: list[Evicted] = ()) -> SaveResult:
            seconds = time.perf_counter() - t0
            with self.lock.shared():
                self.index.scan(full=False)
            self._emit(SaveSkipped(path=final, tokens=state.n_tokens, bytes=nbytes, why=skip, reason=why,
                                   seconds=seconds, detail=detail, disk_bytes=self.index.total()))
            return SaveResult(final, status, 0, seconds, list(evicted), detail=detail)

        with self._save_mutex:
            try:
                predicted = chain_size if self.kv_layout == "chain" else kv_file_bytes(state, len(key), self.checksum)
            except KVFormatError as err:
                msg = f"{final}: {err}"
                self._emit(SaveFailed(path=final, tokens=state.n_tokens, error=msg, reason=why))
                raise KVSaveError(msg) from err
            try:
                existing, ino = self._same_key(final, key, state.ctx)
                if existing is None and self.kv_layout == "chain":  # one entry per name: a flat file wins
                    flat, flat_ino = self._same_key(self.dir / f"{sha}.kv", key, state.ctx)
                    if flat == "compatible":
                        final, existing, ino = self.dir / f"{sha}.kv", flat, flat_ino
            except _Kept as err:  # a link, FIFO or unreadable file holds the name: never replaced
                return skipped("skipped", predicted, "name-taken", str(err))
            if existing == "compatible":
                self._touch(final, ino, hit=False)
                return skipped("exists", 0, "already-stored", "already-stored")
            budget = self.budget_bytes
            if not rules.admits(predicted, budget):
                return skipped("skipped", predicted, "exceeds-budget",
                               f"file of {predicted} bytes exceeds the budget of {budget}")
            evicted: list[Evicted] = []
            room = True
            if budget is not None and rules.pre_write:
                try:
                    with self.lock.exclusive():
                        self.index.scan(full=True)
                        evicted = self._evict(budget, keep, incoming=predicted, replacing=name, why="make-room",
                                              incoming_text=key)
                        room = self.index.total() - self.index.size_of(name) + predicted <= budget
                except LockError as err:
                    self._emit(SaveFailed(path=final, tokens=state.n_tokens, error=str(err), reason=why))
                    raise KVSaveError(str(err)) from err
            if not room:
                other = self.unowned_bytes(name)
                return skipped("skipped", predicted, "no-room", budget_held_message(self.dir, other, predicted, budget)
                               if other + predicted > budget else "budget is held by protected, foreign or invalid "
                               "files", evicted)
            tmp = tmp_path(final)
            try:
                header, written = self._write_tmp(tmp, state, key, reason, ext_flags, writer, durable, progress)
                on_disk = os.stat(tmp).st_size
                if written != predicted or on_disk != predicted:
                    raise KVSaveError(f"{tmp}: wrote {written} bytes ({on_disk} on disk), predicted {predicted}; "
                                      "not publishing")
                with self.lock.exclusive():
                    os.replace(tmp, final)
                    if durable:
                        fsync_dir(self.dir)
                    st = os.stat(final)  # index the new file from the header just written
                    self.index.put(self.index.classify(final, st), st)
                    if existing is not None:
                        self._emit(Replaced(path=final, why=existing))
                    self.index.scan(full=True)
                    if budget is not None and rules.post_write:
                        evicted += self._evict(budget, keep, incoming=0, replacing="", why="disk-cache-full")
            except BaseException as err:
                try:
                    os.unlink(tmp)
                except OSError:  # never written (read-only directory) or already gone: the real error follows
                    pass
                if not isinstance(err, Exception):
                    raise
                msg = str(err) if isinstance(err, KVStoreError) else \
                    f"{final}: cannot save: {err.strerror or err}" if isinstance(err, OSError) else f"{tmp}: {err}"
                if isinstance(err, OSError) and err.errno in DISK_WORDS:
                    msg += f" ({DISK_WORDS[err.errno]})"
                self._emit(SaveFailed(path=final, tokens=state.n_tokens, error=msg, reason=why))
                raise KVSaveError(msg) from err
        seconds = time.perf_counter() - t0
        self._emit(Saved(path=final, tokens=state.n_tokens, bytes=predicted, seconds=seconds, reason=why,
                         mode="direct" if writer is None else writer.__name__, durable=durable,
                         disk_bytes=self.index.total()))
        return SaveResult(final, "saved", predicted, seconds, evicted,
                          detail="" if existing is None else f"replaced: {existing}")

    def _same_key(self, final: Path, key: bytes, ctx: int) -> tuple[str | None, int]:
        """(None: no file | 'compatible' | why the same-name file gets replaced, its inode).
        A file of another model (``model_mismatch``), an invalid one, or one that failed to
        load in this store is replaced, as ds4 replaces one of another model id. Raises
        ``_Kept`` when the name is held by something never replaced: a link or other
        non-regular file (foreign), or a file this process cannot read."""
        try:
            with self.lock.shared():
                with open_regular(final, follow=False) as f:
                    st = os.fstat(f.fileno())
                    bad = self._failed.get(final.name)
                    if bad is not None and bad[2] and bad[0] == (st.st_ino, st.st_size, st.st_mtime_ns):
                        return f"failed to load: {bad[1]}", st.st_ino
                    header = parse_header(f.read(TEXT_OFFSET), str(final), st.st_size)
                    text = read_text(f, header, str(final))
                    other = model_mismatch(header, read_trailer(f, header, str(final)), model_id=self.model_id,
                                           quant_bits=self.quant_bits, fingerprint=self.fingerprint)
        except FileNotFoundError:
            return None, 0
        except NotRegularFileError as err:
            raise _Kept(f"{final}: {err.strerror}: a foreign file holds this name, not replaced") from None
        except OSError as err:
            raise _Kept(f"{final}: cannot read the existing file ({err.strerror or err}), not replaced") from None
        except KVFormatError as err:
            return f"invalid file: {err}", 0
        if text != key:
            why = "stored text differs (SHA-1 collision)"
        elif header.ctx > ctx:
            why = f"written for a larger context ({header.ctx} > {ctx})"
        elif other is not None:  # as ds4 replaces a same-name file of another model id
            why = other
        elif self.reject_different_quant and header.quant_bits != self.quant_bits:
            why = f"quant bits {header.quant_bits} != {self.quant_bits}"
        else:
            why = "compatible"
        return why, st.st_ino

    def _write_tmp(self, tmp: Path, state: SessionState, key: bytes, reason: SaveReason, ext_flags: int,
                   writer: KVWriter | None, durable: bool, progress: Progress | None) -> tuple[KVHeader, int]:
        try:  # left by this very process (pids are unique among live processes); a link is only unlinked
            tmp.unlink()
        except FileNotFoundError:
            pass
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb", buffering=0) as f:
            header, n = (writer or write_kv_file)(f, state, key, quant_bits=self.quant_bits, reason=reason,
                                                  ext_flags=ext_flags, checksum=self.checksum, now=int(time.time()),
                                                  progress=progress, model_id=self.model_id,
                                                  fingerprint=self.fingerprint)
            if durable:
                os.fsync(f.fileno())
        return header, n
