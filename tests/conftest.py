"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CI model (``synth`` preset "tiny", seed 0), built once per test session."""
    from workbench.synth import synthesize

    return synthesize("tiny", tmp_path_factory.mktemp("models") / "tiny.gguf", seed=0)
