"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CI model (``synth`` preset "tiny", seed 0), built once per test session."""
    from workbench.synth import synthesize

    return synthesize("tiny", tmp_path_factory.mktemp("models") / "tiny.gguf", seed=0)


@pytest.fixture(params=["native", "mlx"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test on the native dequantization kernels (skipped when not built) and on the
    pure-MLX decoders."""
    from workbench.gguf import quants

    if request.param == "native":
        if not quants.native_available():
            pytest.skip("native kernels not built (make native)")
    else:
        monkeypatch.setattr(quants, "_NATIVE", None)
    return request.param


@pytest.fixture
def on_cpu():
    """Run MLX on the CPU (float32 matmuls), whatever the default device."""
    import mlx.core as mx

    previous = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(previous)
