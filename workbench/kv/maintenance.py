"""Keeping a cache directory healthy: stale-temp sweep, verification, quarantine, eviction.

``sweep_stale_tmp`` removes the ``*.tmp.<pid>`` files of processes that are gone (crash
leftovers of ``workbench.atomic`` publications and of ds4: ``<sha>.kv.tmp.<pid>``).
``verify_file`` reads every byte of one ``.kv`` file and runs every check;
``verify_chain_file`` restores a chain entry from its whole chain. ``Maintenance`` gives
``KVStore`` the directory-wide operations built on them and on ``workbench.kv.eviction``:
``sweep_tmp``, ``verify``, ``quarantine``, ``remove`` and ``evict_to_budget``, each under
the directory lock, each recording its events. Nothing here deletes a file that is not a
dead temp file or a checkpoint chosen for eviction.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

from workbench.kv.errors import KVFormatError, KVStoreError
from workbench.kv.eviction import Candidate, EvictionRules, keep_value, plan_eviction
from workbench.kv.events import BudgetHeld, Evicted, Quarantined, TmpSwept
from workbench.kv.chain import CHAIN_DIR, CHAIN_SUFFIX, chain_summary, read_chain, read_chain_header
from workbench.kv.header import TEXT_OFFSET, KVHeader, SaveReason, parse_header, text_sha
from workbench.kv.index import CHAIN_RE, NAME_RE, QUARANTINE_DIR, DirIndex, Entry, OtherFile
from workbench.kv.inspection import file_layout, infer_layout
from workbench.kv.kvfile import model_mismatch, read_kv_file
from workbench.kv.lock import DirLock, LockError
from workbench.safeopen import open_regular
from workbench.spec.statelayout import StateLayout

MiB = 1024 * 1024
TMP_PID_RE = re.compile(r"\.tmp\.(\d+)$")  # <final name>.tmp.<pid> (workbench.atomic, ds4)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (``kill(pid, 0)``)."""
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


def sweep_stale_tmp(directory: str | os.PathLike, grace_s: float = 0.0, names: Iterable[str] | None = None
                    ) -> list[tuple[Path, int]]:
    """Remove the ``*.tmp.<pid>`` files in ``directory`` (or among ``names`` there) whose
    process is gone and that are at least ``grace_s`` seconds old; never this process's.
    Returns (path, bytes) of each file removed; unreadable directories remove nothing."""
    d = Path(directory)
    if names is None:
        try:
            names = os.listdir(d)
        except OSError:
            return []
    out, now = [], time.time()
    for name in names:
        m = TMP_PID_RE.search(name)
        if not m:
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or pid_alive(pid):
            continue
        path = d / name
        try:
            st = path.lstat()
            if now - st.st_mtime < grace_s:
                continue
            path.unlink()
        except OSError:
            continue
        out.append((path, st.st_size))
    return out


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
    moved_to: Path | None = None  # where ``verify(quarantine=True)`` moved the failing file
    quarantine_error: str = ""  # why that move failed (the file stays where it was)


def verify_file(path: str | os.PathLike, layout: StateLayout | None = None, ctx: int | None = None,
                layout_note: str = "", follow: bool = True, identity: dict | None = None) -> VerifyReport:
    """Read every byte of a .kv file and run every check a load runs: header, name =
    SHA-1(text), trailer, checksums, payload structure (against ``ctx``, default the saved
    one), token ids and logits, and token count; with ``identity`` (the keyword arguments
    of ``workbench.gguf.fingerprint.checkpoint_identity``) also whether the file belongs
    to that model (``model_mismatch``): a file of another model is valid, and a miss for
    this one, as in a load (a note says so; it is not quarantined). ``layout`` None
    infers it from the payload header.
    ``follow=False`` refuses a link (inside a cache directory links are foreign)."""
    p = Path(path)
    name = str(p)
    header = None
    try:
        with open_regular(p, follow) as f:  # a FIFO or device is reported, never read
            header = parse_header(f.read(TEXT_OFFSET), name, os.fstat(f.fileno()).st_size)
            if layout is None and not header.stripped:
                layout, layout_note = file_layout(f, header, name)
            header, text, _, trailer = read_kv_file(f, layout, ctx, name=name, keep=False)
        other = None if identity is None else model_mismatch(header, trailer, **identity)
        m = NAME_RE.match(p.name)
        if m and m.group(1).lower() not in trailer.names(text, header.created_at):
            raise KVFormatError(f"{name}: cached text hash mismatch: SHA-1(text) {text_sha(text)} != file name"
                                + (" (nor SHA-1 of title and created_at)" if trailer.title is not None else ""))
        if header.stripped:
            layout_note = "no payload (ds4 agent /strip): listed, never loaded"
    except KVFormatError as err:
        return VerifyReport(p, False, str(err), header, layout_note)
    except OSError as err:
        return VerifyReport(p, False, f"{name}: {err.strerror or err}", header, layout_note)
    notes = trailer.notes + ((f"not loaded by this model: {other}",) if other is not None else ())
    return VerifyReport(p, True, "", header, layout_note, trailer.checksum_status(True), notes)


def budget_held_message(directory: Path, other: int, incoming: int, budget: int) -> str:
    """In words: files the store does not own hold the budget, so nothing was evicted."""
    new = f" plus the {incoming / MiB:,.1f} MiB being written" if incoming else ""
    return (f"{directory}: files the store does not own (foreign, invalid, temp, quarantined) hold "
            f"{other / MiB:,.1f} MiB{new}, over the budget of {budget / MiB:,.1f} MiB on their own: no checkpoint "
            f"evicted (see `workbench kv ls`)")


def candidate(e: Entry, incoming_text: bytes) -> Candidate:
    """Eviction's view of an entry; ``incoming_text`` is the text being written (or b"")."""
    prefix = (e.reason == SaveReason.CONTINUED and e.text_bytes < len(incoming_text)
              and text_sha(incoming_text[:e.text_bytes]) == e.sha)
    return Candidate(e.sha, e.tokens, e.file_size, e.hits, e.last_used, e.created_at, e.reason, prefix)


def verify_chain_file(path: Path, layout: StateLayout | None = None, ctx: int | None = None,
                      layout_note: str = "", follow: bool = True) -> VerifyReport:
    """Restore a chain entry from its whole chain (every file, every check, every piece's
    checksums when it has a footer) and report; ``follow=False`` refuses a link."""
    name, header = str(path), None
    try:
        if not follow and path.is_symlink():
            raise KVFormatError(f"{name}: is a symbolic link, not a regular file")
        header, ref = read_chain_header(path)
        if layout is None:
            layout, layout_note = infer_layout(chain_summary(path))
        links = read_chain(path, layout, ctx)[3]
    except KVFormatError as err:
        return VerifyReport(path, False, str(err), header, layout_note)
    except OSError as err:
        return VerifyReport(path, False, f"{name}: {err.strerror or err}", header, layout_note)
    link = "a base" if ref.parent is None else f"over {ref.parent} ({ref.parent_tokens} tokens)"
    footers = all(k.trailer is not None and k.trailer.checksums is not None for k in links)
    return VerifyReport(path, True, "", header, layout_note, "verified" if footers else "absent",
                        (f"chain depth {ref.depth}, {link}",))


class Maintenance:
    """The directory-wide operations of ``KVStore``, which provides the attributes below
    and ``_emit(event)``, ``entries()`` and ``invalid()``."""

    dir: Path
    lock: DirLock
    index: DirIndex
    budget_bytes: int | None
    tmp_grace_s: float
    eviction: EvictionRules

    def sweep_tmp(self) -> list[TmpSwept]:
        """Remove ``<sha>.kv.tmp.<pid>`` files whose process is gone and that are older than
        the grace period (crash leftovers, ds4's included)."""
        try:
            with self.lock.exclusive():
                self.index.scan(full=True)
                tmp = [str(o.path.relative_to(self.dir)) for o in self.index.items()
                       if isinstance(o, OtherFile) and o.kind == "tmp"]
                out = [TmpSwept(path=p, bytes=n) for p, n in sweep_stale_tmp(self.dir, self.tmp_grace_s, tmp)]
                for event in out:
                    self._emit(event)
                if out:
                    self.index.scan(full=True)
        except OSError:
            return []  # read-only directory: nothing to sweep
        except LockError as err:
            if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                return []  # read-only directory: nothing to sweep
            raise
        return out

    def score(self, entry: Entry, now: float | None = None) -> float:
        """The entry's keep-worthiness under the store's eviction order (higher survives longer)."""
        return keep_value(candidate(entry, b""), time.time() if now is None else now, self.eviction)[0]

    def _evict(self, budget: int | None, protect: set[str], incoming: int, replacing: str, why: str,
               dry_run: bool = False, incoming_text: bytes = b"") -> list[Evicted]:
        """Unlink the entries ``plan_eviction`` picks until the directory plus ``incoming``
        bytes (minus the file named ``replacing``) fits ``budget``. An entry another entry
        restores through (``DirIndex.pinned``) is not a candidate until that one is gone
        (evicting frees only its own file); the plan is redone after each victim, so a
        leaf's parent may follow it in the same pass. Caller holds the exclusive lock, index fresh.
        ``dry_run`` only returns what would go (no unlink, no events). When the files the
        store does not own exceed the budget on their own, nothing is evicted and a
        ``BudgetHeld`` event says so (evicting every checkpoint would not help)."""
        if budget is None:
            return []
        now = time.time()
        total = self.index.total() - self.index.size_of(replacing)
        other = self.unowned_bytes(replacing)
        if other + incoming > budget and total + incoming > budget:
            if not dry_run:
                self._emit(BudgetHeld(other_bytes=other, incoming=incoming, budget=budget,
                                      message=budget_held_message(self.dir, other, incoming, budget)))
            return []
        out: list[Evicted] = []
        gone: set[str] = set()
        while True:
            parents = self.index.pinned(gone)
            entries = {e.sha: e for e in self.index.entries().values()
                       if e.key != replacing and e.key not in gone and e.sha not in parents}
            victims = plan_eviction([candidate(e, incoming_text) for e in entries.values()], total, budget,
                                    self.eviction, now, incoming, protect)
            if not victims:
                return out
            c = victims[0]
            e = entries[c.key]
            total -= e.file_size
            gone.add(e.key)
            if not dry_run:
                try:
                    os.unlink(e.path)
                except FileNotFoundError:
                    pass
                except OSError:
                    return out  # as ds4: stop the pass when an unlink fails
                self.index.drop(e.key)
            score = keep_value(c, now, self.eviction)[0]
            event = Evicted(path=e.path, tokens=e.tokens, bytes=e.file_size, score=score,
                            save_reason=e.reason.name.lower(), why=why,
                            disk_bytes=total + self.index.size_of(replacing))
            out.append(event if dry_run else self._emit(event))

    def unowned_bytes(self, replacing: str = "") -> int:
        """Bytes of the indexed files that are not checkpoints (foreign, invalid, temp,
        quarantined), leaving out the file named ``replacing``; no scan."""
        entries = sum(e.file_size for e in self.index.entries().values() if e.key != replacing)
        return self.index.total() - self.index.size_of(replacing) - entries

    def evict_to_budget(self, budget_mb: float | None = None, dry_run: bool = False) -> list[Evicted]:
        """Evict until every file together fits the budget (``budget_mb`` overrides the
        store's); ``dry_run`` lists the victims without removing them."""
        budget = self.budget_bytes if budget_mb is None else int(budget_mb * MiB)
        if budget is None:
            return []
        try:
            with self.lock.exclusive():
                self.index.scan(full=True)
                return self._evict(budget, set(), 0, "", "disk-cache-full", dry_run)
        except OSError as err:
            raise KVStoreError(f"{self.dir}: cannot lock for eviction: {err.strerror or err}") from err

    def remove(self, entry: Entry | str | os.PathLike) -> Path:
        """Delete one checkpoint of this directory (under the exclusive lock, so no other
        process is mid-read of it). Only regular ``<sha>.kv`` files are removed (a link is foreign)."""
        path = entry.path if isinstance(entry, Entry) else Path(entry)
        flat = path.parent.resolve() == self.dir.resolve() and NAME_RE.match(path.name)
        chained = path.parent.resolve() == (self.dir / CHAIN_DIR).resolve() and CHAIN_RE.match(path.name)
        if not (flat or chained):
            raise KVStoreError(f"{path}: not a checkpoint of {self.dir}")
        if chained and path.name[:40] in self.index.children():
            raise KVStoreError(f"{path}: other chain entries extend it (remove them first)")
        with self.lock.exclusive():
            try:
                if not stat.S_ISREG(path.lstat().st_mode):
                    raise KVStoreError(f"{path}: not a regular file (a foreign file): not removed")
                path.unlink()
            except FileNotFoundError:
                raise KVStoreError(f"{path}: no longer exists") from None
        return path

    def verify(self, layout: StateLayout | None = None, ctx: int | None = None, quarantine: bool = False,
               layout_note: str = "", identity: dict | None = None) -> list[VerifyReport]:
        """Check every checkpoint end to end against ``layout`` (None: per file, inferred)
        and runtime ``ctx`` (None: each file's own), and report invalid ones; with
        ``quarantine``, move failing files to ``<dir>/quarantine/`` (a move that fails is
        reported in the file's ``quarantine_error``). Never deletes anything."""
        reports = []
        for path in sorted(e.path for e in self.entries()) + sorted(o.path for o in self.invalid()):
            with self.lock.shared():
                if path.suffix == CHAIN_SUFFIX:
                    reports.append(verify_chain_file(path, layout, ctx, layout_note, follow=False))
                else:
                    reports.append(verify_file(path, layout, ctx, layout_note, follow=False, identity=identity))
        for i, rep in enumerate(reports):  # after every check: a chain entry's quarantine moves its descendants too
            if not rep.ok and quarantine and os.path.lexists(rep.path):
                try:
                    reports[i] = replace(rep, moved_to=self.quarantine(rep.path, rep.error))
                except KVStoreError as err:
                    reports[i] = replace(rep, quarantine_error=str(err))
        return reports

    def quarantine(self, path: str | os.PathLike, error: str = "") -> Path:
        """Move a file into ``<dir>/quarantine/`` (kept, still counted, no longer looked up);
        returns where it went. A chain entry takes the chain entries above it along (they
        cannot restore without it), so no broken chain is left for ``kv gc`` to remove.

        Neither a file nor ``quarantine/`` may be a link (links are foreign files: nothing
        is moved out of the directory); raises KVStoreError with the reason (a read-only or
        full disk, a foreign ``quarantine``) after the moves that were made."""
        src = Path(path)
        qdir = self.dir / QUARANTINE_DIR
        moved, failure = [], None
        try:
            with self.lock.exclusive():
                for p in [src] + (self._descendants(src) if src.suffix == CHAIN_SUFFIX else []):
                    moved.append((p, _quarantine_one(p, qdir)))
                    self.index.drop(f"{CHAIN_DIR}/{p.name}" if p.suffix == CHAIN_SUFFIX else p.name)
        except OSError as err:
            failure = KVStoreError(f"{src}: cannot move to {qdir}: {err.strerror or err}")
        except KVStoreError as err:
            failure = err
        for p, dest in moved:
            self._emit(Quarantined(path=p, dest=dest, error=error if p == src else f"its chain parent: {error}"))
        if failure is not None:
            raise failure
        return moved[0][1]

    def _descendants(self, leaf: Path) -> list[Path]:
        """Every chain entry that names ``leaf`` as ancestor (caller holds the lock)."""
        self.index.scan(full=True)
        children, out, todo = self.index.children(), [], [leaf.name[:40]]
        while todo:
            kids = children.get(todo.pop(), [])
            out += [k.path for k in kids]
            todo += [k.sha for k in kids]
        return out


def _quarantine_one(src: Path, qdir: Path) -> Path:
    """Rename the regular file ``src`` into ``qdir`` under a free name, through directory
    descriptors opened without following links (caller holds the exclusive lock)."""
    src_dir = os.open(src.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.lstat(src.name, dir_fd=src_dir).st_mode):
            raise KVStoreError(f"{src}: not a regular file: not quarantined")
        try:
            os.mkdir(qdir, 0o700)
        except FileExistsError:
            pass
        try:
            q = os.open(qdir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as err:
            if err.errno in (errno.ELOOP, errno.ENOTDIR):
                raise KVStoreError(f"{qdir}: not a directory (a link or a foreign file): nothing quarantined") \
                    from None
            raise
        try:
            name, n = src.name, 1
            while _exists_at(name, q):
                name, n = f"{src.name}.{n}", n + 1
            os.rename(src.name, name, src_dir_fd=src_dir, dst_dir_fd=q)
        finally:
            os.close(q)
    finally:
        os.close(src_dir)
    return qdir / name


def _exists_at(name: str, dir_fd: int) -> bool:
    try:
        os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return True
