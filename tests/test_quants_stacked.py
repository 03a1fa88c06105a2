"""quants.stacked_experts: gate+up slabs dequantized in one pass, bit-identical to stacking."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from workbench.bench.dequant import random_blocks
from workbench.gguf.quants import QTensor, QuantError, stacked_experts
from workbench.spec.ggml import GGML_TYPES, IQ2_XXS, Q2_K, Q4_K


@pytest.mark.parametrize("ggml_type", [IQ2_XXS, Q2_K, Q4_K])
@pytest.mark.parametrize("as_numpy", [True, False])
def test_stacked_experts_equal_concatenated_experts(ggml_type: int, as_numpy: bool) -> None:
    shape_g, shape_u = (4, 3, 512), (4, 2, 512)
    def bank(shape: tuple[int, int, int], seed: int) -> QTensor:
        rows = shape[0] * shape[1]
        raw = random_blocks(ggml_type, 4096 * ((rows * shape[2] + 4095) // 4096), seed).reshape(-1)
        nbytes = rows * shape[2] // 256 * GGML_TYPES[ggml_type].block_bytes
        buf = raw[:nbytes].reshape(shape[0], shape[1], -1)
        return QTensor(buf if as_numpy else mx.array(buf), ggml_type, shape)
    gate, up = bank(shape_g, 1), bank(shape_u, 2)
    ids = np.array([3, 0, 3])
    got = np.array(stacked_experts([gate, up], ids))
    want = np.concatenate([np.array(gate.experts(ids)), np.array(up.experts(ids))], axis=1)
    assert got.shape == (3, 5, 512)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_stacked_experts_refuses_mixed_types_and_bad_ids() -> None:
    a = QTensor(np.zeros((2, 1, 66), np.uint8), IQ2_XXS, (2, 1, 256))
    b = QTensor(np.zeros((2, 1, 84), np.uint8), Q2_K, (2, 1, 256))
    with pytest.raises(QuantError, match="one type"):
        stacked_experts([a, b], [0])
    with pytest.raises(QuantError, match="out of range for 2 experts"):
        stacked_experts([a, a], [2])
