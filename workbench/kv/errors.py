"""The errors of ``workbench.kv``: one line each, naming the file and the field."""

from __future__ import annotations

from workbench.errors import WorkbenchError


class KVFormatError(WorkbenchError):
    """A .kv file (or payload) is malformed, truncated, corrupt or does not fit the runtime."""


class ShardError(KVFormatError):
    """A sharded checkpoint (manifest or shard file) is malformed, corrupt or does not fit."""


class KVStoreError(WorkbenchError):
    """The cache directory cannot be used as asked."""


class KVLoadError(KVStoreError):
    """A checkpoint could not be restored (the file is kept; the caller's state is untouched)."""


class KVSaveError(KVStoreError):
    """A checkpoint could not be written (the temp file is removed; other files are untouched)."""


def check(cond: bool, name: str, message: str, error: type[KVFormatError] = KVFormatError) -> None:
    """Raise ``error("<name>: <message>")`` unless ``cond``."""
    if not cond:
        raise error(f"{name}: {message}")
