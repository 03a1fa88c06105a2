"""ggml tensor types: ids, names and block geometry (elements and bytes per block)."""

from __future__ import annotations

from typing import NamedTuple


class GGMLType(NamedTuple):
    id: int
    name: str
    block_elems: int  # elements per block along GGUF dim[0]
    block_bytes: int  # bytes per block


# Standard ggml ids. ds4's files use F32, F16, Q8_0, Q2_K, Q4_K, IQ2_XXS, MXFP4 and I32;
# the others are known for size accounting and clear errors.
_TYPES = [
    (0, "F32", 1, 4), (1, "F16", 1, 2), (2, "Q4_0", 32, 18), (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22), (7, "Q5_1", 32, 24), (8, "Q8_0", 32, 34), (9, "Q8_1", 32, 36),
    (10, "Q2_K", 256, 84), (11, "Q3_K", 256, 110), (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176), (14, "Q6_K", 256, 210), (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66), (17, "IQ2_XS", 256, 74), (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50), (20, "IQ4_NL", 32, 18), (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82), (23, "IQ4_XS", 256, 136), (24, "I8", 1, 1), (25, "I16", 1, 2),
    (26, "I32", 1, 4), (27, "I64", 1, 8), (28, "F64", 1, 8), (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2), (39, "MXFP4", 32, 17),
]
GGML_TYPES: dict[int, GGMLType] = {t[0]: GGMLType(*t) for t in _TYPES}
BY_NAME: dict[str, GGMLType] = {t.name: t for t in GGML_TYPES.values()}

F32, F16, Q8_0, Q2_K, Q4_K, IQ2_XXS, I32, BF16, MXFP4 = (
    BY_NAME[n].id for n in ("F32", "F16", "Q8_0", "Q2_K", "Q4_K", "IQ2_XXS", "I32", "BF16", "MXFP4"))
# the types this workbench can dequantize and run
SUPPORTED = frozenset({F32, F16, BF16, I32, Q8_0, Q2_K, Q4_K, IQ2_XXS, MXFP4})


def row_bytes(ggml_type: int, n_elems: int) -> int:
    """Bytes of one row of ``n_elems`` elements (must be a whole number of blocks)."""
    t = GGML_TYPES[ggml_type]
    if n_elems % t.block_elems:
        raise ValueError(f"{t.name} rows need a multiple of {t.block_elems} elements, got {n_elems}")
    return n_elems // t.block_elems * t.block_bytes
