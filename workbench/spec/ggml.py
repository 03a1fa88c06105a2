"""ggml tensor types: ids, names and block geometry, taken from the ``gguf`` package.

``GGML_TYPES`` covers every type ``gguf.constants.GGML_QUANT_SIZES`` knows (so a new type
is sized and named without a table here); the constants below are the types ds4's files
use (F32, F16, Q8_0, Q2_K, Q4_K, IQ2_XXS, MXFP4, I32) and BF16. (``gguf`` sizes Q8_1
blocks at 40 bytes where ggml's are 36; no ds4 file holds Q8_1.)
"""

from __future__ import annotations

from typing import NamedTuple

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType


class GGMLType(NamedTuple):
    """One ggml type: ``block_elems`` elements along GGUF dim[0] per ``block_bytes`` bytes."""

    id: int
    name: str
    block_elems: int
    block_bytes: int


GGML_TYPES: dict[int, GGMLType] = {int(t): GGMLType(int(t), t.name, *GGML_QUANT_SIZES[t])
                                   for t in GGMLQuantizationType if t in GGML_QUANT_SIZES}
BY_NAME: dict[str, GGMLType] = {t.name: t for t in GGML_TYPES.values()}

F32, F16, Q8_0, Q2_K, Q4_K, IQ2_XXS, I32, BF16, MXFP4 = (
    BY_NAME[n].id for n in ("F32", "F16", "Q8_0", "Q2_K", "Q4_K", "IQ2_XXS", "I32", "BF16", "MXFP4"))


def type_names(types: frozenset[int] | set[int]) -> str:
    """``"IQ2_XXS/Q2_K/Q4_K"``: the sorted names of ``types``, for messages."""
    return "/".join(sorted(GGML_TYPES[t].name for t in types))


def row_bytes(ggml_type: int, n_elems: int) -> int:
    """Bytes of one row of ``n_elems`` elements (must be a whole number of blocks)."""
    t = GGML_TYPES[ggml_type]
    if n_elems % t.block_elems:
        raise ValueError(f"{t.name} rows need a multiple of {t.block_elems} elements, got {n_elems}")
    return n_elems // t.block_elems * t.block_bytes
