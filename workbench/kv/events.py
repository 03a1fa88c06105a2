"""What a KV store did, as typed events: the one stream the engine, telemetry, the
dashboard and the demo read (``KVStore.subscribe``; ``workbench.telemetry`` maps them to rows).

Sizes are bytes, times Unix seconds (``time``) or durations in seconds (``seconds``);
``disk_bytes`` is every file in the cache directory right after the event. Each event
spells out its own fields, though several share (path, tokens, bytes): the classes are
the contract that telemetry and the cache lab read, so each stays readable on its own.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar


@dataclass(frozen=True, kw_only=True)
class KVEvent:
    """Base of the events a store records; ``row()`` is a flat dict of its fields."""

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
    reason: str  # the save reason: cold | continued | evict | shutdown | ...
    mode: str  # direct | the writer's name
    durable: bool
    disk_bytes: int


@dataclass(frozen=True, kw_only=True)
class SaveSkipped(KVEvent):
    kind: ClassVar[str] = "save-skipped"
    path: Path
    tokens: int
    bytes: int  # the file that was not written
    why: str  # already-stored | exceeds-budget | no-room
    reason: str  # the save reason
    seconds: float
    detail: str  # one line for people
    disk_bytes: int


@dataclass(frozen=True, kw_only=True)
class SaveFailed(KVEvent):
    kind: ClassVar[str] = "save-failed"
    path: Path
    tokens: int
    error: str  # the KVSaveError's message
    reason: str  # the save reason


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
    disk_bytes: int


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


@dataclass(frozen=True, kw_only=True)
class BudgetHeld(KVEvent):
    """Files the store does not own (foreign, invalid, temp, quarantined) exceed the
    budget on their own: evicting checkpoints cannot help, so none was evicted."""

    kind: ClassVar[str] = "budget-held"
    other_bytes: int  # bytes of the files the store does not own
    incoming: int  # bytes of the file about to be written (0: none)
    budget: int
    message: str
