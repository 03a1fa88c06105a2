"""Crash-safe publication: the final name holds either the old file or the whole new one."""

import os

import pytest

from workbench import atomic


def _temps(directory):
    return [p for p in directory.iterdir() if p.name.endswith(f".tmp.{os.getpid()}")]


def test_failure_keeps_the_old_file_and_removes_the_temp(tmp_path):
    final = tmp_path / "out.bin"
    final.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_write(final) as f:
            f.write(b"partial")
            raise RuntimeError("disk on fire")
    assert final.read_bytes() == b"old"
    assert _temps(tmp_path) == []


def test_success_replaces_and_durable_fsyncs(tmp_path):
    final = tmp_path / "out.bin"
    with atomic.atomic_write(final, durable=True) as f:
        f.write(b"new")
        assert atomic.tmp_path(final).exists() and not final.exists()
    assert final.read_bytes() == b"new" and _temps(tmp_path) == []
