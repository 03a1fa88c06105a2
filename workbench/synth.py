"""Synthetic ds4-layout GGUF models: the real file's tensors, types, metadata and tokenizer,
with random weights at chosen widths.

Presets (deterministic per seed):

* ``tiny``: 6 layers (ratios 0,0,4,128,4,128), n_embd 256, 4 heads × 128, 8 experts × 256
  with 2 used, IQ2_XXS gate/up and Q2_K down experts, indexer top-k 8; about 110 MB.
* ``tiny-q4``: the same with Q4_K for all three expert tensors.
* ``tiny-mxfp4``: the same with MXFP4 experts (ggml type 39, as ds4's ``ds4f-mxfp4``).
* ``tiny-q2q4``: the last layer Q4_K, the others IQ2_XXS/Q2_K (as ds4's ``ds4f-q2-q4``).
* ``real-dims-N``: the real widths (ds4-architecture.md §0) for the first N layers
  (1 <= N <= 43) with q2 expert types; about 1.6 GB + 1.95 GB per layer (q2).

``experts`` (``workbench synth --experts``) gives any preset the routed experts of one of
ds4's downloads (:data:`EXPERT_FORMATS`): ``q2`` (IQ2_XXS gate/up, Q2_K down), ``q4``
(Q4_K), ``mxfp4`` (MXFP4) or ``q2q4`` (q2 with Q4_K on layers 37-42 as in ``ds4f-q2-q4``;
a model of at most 37 layers gets Q4_K on its last layer, so it still mixes both).

Weights are random but scaled so that activations stay finite and well conditioned over
long contexts: projections have RMS 1/sqrt(fan_in) (they roughly preserve the RMS of a
normalised input), norms are near 1, the HC projections are small so the Sinkhorn inputs are
O(1), the HC bases make the pre weights about 1/n_hc, the post gains about 1 and the
combine matrix diagonal-heavy, sinks, APE, router and expert biases are small, and the
compressor gates are small enough that their per-channel softmax is not degenerate.

Quantized tensors are valid random blocks: random codes and sub-block scales, with each
block's f16 ``d`` (and ``dmin``) chosen so the block's expected mean is 0 and its expected
RMS is the target. All randomness comes from SFC64 raw output, one stream per tensor seeded
by (seed, crc32(name)), so files are byte-identical across runs and NumPy versions.
"""

from __future__ import annotations

import functools
import math
import re
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from gguf import GGUFValue, GGUFValueType

from workbench.errors import WorkbenchError
from workbench.gguf.writer import TensorInfo, write_gguf
from workbench.spec.args import ModelArgs, ds4_ratio_schedule
from workbench.spec.ggml import F16, F32, GGML_TYPES, IQ2_XXS, MXFP4, Q2_K, Q4_K, Q8_0
from workbench.spec.keys import METADATA_KEYS
from workbench.spec.tensors import ExpertIds, ExpertTypes, HCBase, Noise, PlannedTensor, uniform_experts
from workbench.spec.tensors import plan_tensors as plan_for_args
from workbench.vocab import official_vocab

REAL_N_LAYER = 43
CHUNK_BYTES = 2 << 20  # bytes of tensor data produced per chunk: bounds memory, stays cache-friendly


class SynthError(WorkbenchError):
    """Unknown preset or bad synthesis parameters."""


@dataclass(frozen=True)
class Preset:
    """A synthetic model: its hyperparameters and, per layer, the ggml types of the
    routed experts (``experts[L]``: gate, up, down)."""

    name: str
    args: ModelArgs
    experts: tuple[ExpertTypes, ...]


EXPERTS_Q2 = ExpertTypes(IQ2_XXS, IQ2_XXS, Q2_K)
EXPERTS_Q4 = ExpertTypes(Q4_K, Q4_K, Q4_K)
EXPERTS_MXFP4 = ExpertTypes(MXFP4, MXFP4, MXFP4)
Q2Q4_FIRST_Q4 = 37  # ds4f-q2-q4: layers 37-42 have Q4_K experts


def q2q4_experts(n_layer: int) -> tuple[ExpertTypes, ...]:
    """q2 experts with Q4_K from layer 37 on (the last layer when there are at most 37)."""
    first = min(Q2Q4_FIRST_Q4, n_layer - 1)
    return tuple(EXPERTS_Q4 if L >= first else EXPERTS_Q2 for L in range(n_layer))


# expert format name -> routed-expert types of each of n_layer layers
EXPERT_FORMATS: dict[str, Callable[[int], tuple[ExpertTypes, ...]]] = {
    "q2": functools.partial(uniform_experts, EXPERTS_Q2),
    "q4": functools.partial(uniform_experts, EXPERTS_Q4),
    "mxfp4": functools.partial(uniform_experts, EXPERTS_MXFP4),
    "q2q4": q2q4_experts,
}


def _tiny_args() -> ModelArgs:
    n_layer = 6
    return ModelArgs(
        n_layer=n_layer, n_embd=256, n_vocab=129280, n_head=4, n_head_kv=1, head_dim=128, n_rot=64,
        q_lora_rank=128, o_lora_rank=64, o_groups=2, n_expert=8, n_expert_used=2, n_ff_exp=256,
        n_expert_shared=1, n_hash_layer=3, n_swa=128, idx_heads=4, idx_dim=128, idx_topk=8,
        n_hc=4, sinkhorn_iters=20, compress_ratios=ds4_ratio_schedule(n_layer),
        swiglu_clamp=(10.0,) * n_layer, context_length=65536,
        name="DeepSeek-V4-Flash synthetic tiny")


def _real_args(n_layer: int) -> ModelArgs:
    return ModelArgs(
        n_layer=n_layer, n_embd=4096, n_vocab=129280, n_head=64, n_head_kv=1, head_dim=512, n_rot=64,
        q_lora_rank=1024, o_lora_rank=1024, o_groups=8, n_expert=256, n_expert_used=6, n_ff_exp=2048,
        n_expert_shared=1, n_hash_layer=min(3, n_layer), n_swa=128, idx_heads=64, idx_dim=128,
        idx_topk=512, n_hc=4, sinkhorn_iters=20, compress_ratios=ds4_ratio_schedule(n_layer),
        swiglu_clamp=(10.0,) * n_layer, context_length=1048576,
        name=f"DeepSeek-V4-Flash synthetic real-dims-{n_layer}")


_TINY = _tiny_args()
PRESETS: dict[str, Preset] = {
    "tiny": Preset("tiny", _TINY, uniform_experts(EXPERTS_Q2, _TINY.n_layer)),
    "tiny-q4": Preset("tiny-q4", replace(_TINY, name="DeepSeek-V4-Flash synthetic tiny-q4"),
                      uniform_experts(EXPERTS_Q4, _TINY.n_layer)),
    "tiny-mxfp4": Preset("tiny-mxfp4", replace(_TINY, name="DeepSeek-V4-Flash synthetic tiny-mxfp4"),
                         uniform_experts(EXPERTS_MXFP4, _TINY.n_layer)),
    "tiny-q2q4": Preset("tiny-q2q4", replace(_TINY, name="DeepSeek-V4-Flash synthetic tiny-q2q4"),
                        q2q4_experts(_TINY.n_layer)),
}
PRESET_NAMES = (*PRESETS, "real-dims-N")
_REAL_DIMS = re.compile(r"real-dims-(\d+)")


def resolve_preset(name: str, experts: str | None = None) -> Preset:
    """The preset called ``name``: one of :data:`PRESETS` or ``real-dims-N``, 1 <= N <= 43;
    ``experts`` (a key of :data:`EXPERT_FORMATS`) replaces its routed-expert types."""
    if experts is not None and experts not in EXPERT_FORMATS:
        raise SynthError(f"unknown expert format {experts!r}; choose one of {', '.join(EXPERT_FORMATS)}")
    if name in PRESETS:
        p = PRESETS[name]
    else:
        m = _REAL_DIMS.fullmatch(name)
        if m is None:
            raise SynthError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
        n = int(m.group(1))
        if not 1 <= n <= REAL_N_LAYER:
            raise SynthError(f"preset {name!r}: N must be 1..{REAL_N_LAYER}, got {n}")
        p = Preset(name, _real_args(n), uniform_experts(EXPERTS_Q2, n))
    if experts is None:
        return p
    return replace(p, args=replace(p.args, name=f"{p.args.name} {experts}"),
                   experts=EXPERT_FORMATS[experts](p.args.n_layer))


def plan_tensors(preset: Preset) -> list[PlannedTensor]:
    """Every tensor of the preset's file, in file order, with ds4's names, logical shapes,
    types and fill rules (the tensor table of :mod:`workbench.spec.tensors`)."""
    return plan_for_args(preset.args, preset.experts)


def metadata(preset: Preset, seed: int) -> dict[str, GGUFValue]:
    """The GGUF key/value pairs: ``general.*``, every ``deepseek4.*`` key ds4 reads
    (ds4-architecture.md §1.2) with the preset's values, and the official tokenizer."""
    a = preset.args
    tokens, merges = official_vocab()
    if len(tokens) != a.n_vocab:
        raise SynthError(f"preset {preset.name}: vocab_size {a.n_vocab} but the official "
                         f"tokenizer has {len(tokens)} tokens")
    return {
        "general.architecture": GGUFValue("deepseek4", GGUFValueType.STRING),
        "general.name": GGUFValue(a.name, GGUFValueType.STRING),
        "workbench.synth.preset": GGUFValue(preset.name, GGUFValueType.STRING),
        "workbench.synth.seed": GGUFValue(seed, GGUFValueType.UINT64),
        **{k.key: _meta_value(k.write_type, _key_value(k.value_field, k.ds4, a)) for k in METADATA_KEYS},
        "tokenizer.ggml.model": GGUFValue("gpt2", GGUFValueType.STRING),
        "tokenizer.ggml.pre": GGUFValue("joyai-llm", GGUFValueType.STRING),
        "tokenizer.ggml.tokens": GGUFValue(list(tokens), GGUFValueType.ARRAY, GGUFValueType.STRING),
        "tokenizer.ggml.merges": GGUFValue(list(merges), GGUFValueType.ARRAY, GGUFValueType.STRING),
        "tokenizer.ggml.bos_token_id": GGUFValue(0, GGUFValueType.UINT32),
        "tokenizer.ggml.eos_token_id": GGUFValue(1, GGUFValueType.UINT32),
    }


def _key_value(field: str | None, ds4: Any, a: ModelArgs) -> Any:
    return ds4 if field is None else getattr(a, field)


def _meta_value(write_type: Any, value: Any) -> GGUFValue:
    if isinstance(write_type, tuple):
        return GGUFValue(list(value), GGUFValueType.ARRAY, GGUFValueType(write_type[1]))
    return GGUFValue(value, GGUFValueType(write_type))


# ---- random data, chunk by chunk ------------------------------------------------------------

# Second moments of the random codes (uniform over their ranges), used to pick block scales:
_Q8_0_MEAN_SQ = 1398144 / 256  # mean of q² over int8 -128..127
_Q2_K_Q_VAR = 1.25  # variance of q uniform on 0..3
_Q4_K_Q_VAR = 21.25  # variance of q uniform on 0..15
_IQ2XXS_GRID_MEAN_SQ = 1094513 / 2048  # mean of byte² over ggml's iq2xxs grid (256 × 8 magnitudes)
_MXFP4_MEAN_SQ = 68.5 / 8  # mean of v² over the E2M1 values 0, 0.5, 1, 1.5, 2, 3, 4, 6 (both signs)


def _bitgen(seed: int, name: str) -> np.random.SFC64:
    return np.random.SFC64(np.random.SeedSequence([seed, zlib.crc32(name.encode("utf-8"))]))


def _random_bytes(bg: np.random.SFC64, n: int) -> np.ndarray:
    """``n`` uniformly random, writable uint8."""
    return bg.random_raw((n + 7) // 8).view(np.uint8)[:n]


def _spans(total: int, unit_bytes: int) -> Iterator[int]:
    """Sizes (in units of ``unit_bytes`` of output) of consecutive chunks covering ``total``
    units. Every chunk but the last is a multiple of 8 units, so each consumes whole 64-bit
    random words and the bytes do not depend on :data:`CHUNK_BYTES`."""
    step = max(8, CHUNK_BYTES // unit_bytes // 8 * 8)
    for start in range(0, total, step):
        yield min(step, total - start)


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    """float [n] -> [n, 2] uint8 of little-endian f16."""
    return x.astype("<f2").view(np.uint8).reshape(-1, 2)


def _float_chunks(t: PlannedTensor, bg: np.random.SFC64) -> Iterator[np.ndarray]:
    fill = t.fill
    assert isinstance(fill, Noise)
    dtype = "<f2" if t.ggml_type == F16 else "<f4"
    n = t.n_elements
    amplitude = fill.std * math.sqrt(3.0) / 32768.0  # int16 -> uniform of the given std
    for k in _spans(n, 2):
        u = _random_bytes(bg, 2 * k).view("<i2").astype(np.float32)
        yield (u * np.float32(amplitude) + np.float32(fill.mean)).astype(dtype)


def _hc_base(t: PlannedTensor, bg: np.random.SFC64) -> Iterator[np.ndarray]:
    fill = t.fill
    assert isinstance(fill, HCBase)
    n = fill.n_hc
    pre = math.log(1.0 / (n - 1))  # sigmoid(pre) = 1/n_hc
    if fill.combine:
        base = np.concatenate([np.full(n, pre), np.zeros(n), 2.0 * np.eye(n).ravel()])
    else:
        base = np.full(n, pre)
    u = _random_bytes(bg, 2 * base.size).view("<i2").astype(np.float64) / 32768.0
    yield (base + fill.jitter * math.sqrt(3.0) * u).astype("<f4")


def _expert_ids(t: PlannedTensor, bg: np.random.SFC64) -> Iterator[np.ndarray]:
    """Rows of distinct ids by Floyd's sampling, vectorised over rows."""
    fill = t.fill
    assert isinstance(fill, ExpertIds)
    n_rows, k = t.shape
    if k > fill.n_expert:
        raise SynthError(f"{t.name}: {k} ids per row but only {fill.n_expert} experts")
    for rows in _spans(n_rows, 8 * k):
        words = bg.random_raw((rows, k))  # k words per row, row-major: chunking-independent
        ids = np.empty((rows, k), dtype="<i4")
        for col, j in enumerate(range(fill.n_expert - k, fill.n_expert)):
            draw = (words[:, col] % np.uint64(j + 1)).astype(np.int32)
            taken = (ids[:, :col] == draw[:, None]).any(axis=1)
            ids[:, col] = np.where(taken, j, draw)
        yield ids


def _q8_0_blocks(nb: int, std: float, bg: np.random.SFC64) -> np.ndarray:
    """int8 codes uniform on -128..127, one constant scale."""
    blocks = _random_bytes(bg, nb * 34).reshape(nb, 34)
    blocks[:, 0:2] = _f16_bytes(np.array([std / math.sqrt(_Q8_0_MEAN_SQ)]))
    return blocks


def _d_dmin(sc: np.ndarray, q_var: float, std: float, mid: float) -> tuple[np.ndarray, np.ndarray]:
    """K-quant block scales for sub-block scales ``sc`` [nb, n] and codes of variance
    ``q_var`` centred on ``mid``: f16 ``d`` (expected block RMS ``std``) and ``dmin = mid·d``
    (mean 0), each as [nb, 2] bytes."""
    d16 = (std / np.sqrt(q_var * (sc.astype(np.float32) ** 2).mean(axis=1))).astype("<f2")
    return d16.view(np.uint8).reshape(-1, 2), _f16_bytes(d16.astype(np.float32) * mid)


def _q2_k_blocks(nb: int, std: float, bg: np.random.SFC64) -> np.ndarray:
    """16 sub-blocks with scale sc in 1..15 and min m = sc, dmin = 1.5·d: each sub-block is
    d·sc·(q − 1.5), mean 0; d sets the expected block RMS to ``std``."""
    blocks = _random_bytes(bg, nb * 84).reshape(nb, 84)
    sc = 1 + blocks[:, 0:16] % 15
    blocks[:, 0:16] = sc | (sc << 4)
    blocks[:, 80:82], blocks[:, 82:84] = _d_dmin(sc, _Q2_K_Q_VAR, std, 1.5)
    return blocks


def _q4_k_blocks(nb: int, std: float, bg: np.random.SFC64) -> np.ndarray:
    """8 sub-blocks with 6-bit scale sc in 1..63 and min m = sc, dmin = 7.5·d: each
    sub-block is d·sc·(q − 7.5), mean 0; d sets the expected block RMS to ``std``."""
    blocks = _random_bytes(bg, nb * 144).reshape(nb, 144)
    sc = 1 + blocks[:, 4:12] % 63  # [nb, 8]; mins equal the scales
    lo, hi = sc[:, :4], sc[:, 4:]
    packed = np.empty((nb, 12), dtype=np.uint8)
    packed[:, 0:4] = lo | ((hi >> 4) << 6)
    packed[:, 4:8] = lo | ((hi >> 4) << 6)
    packed[:, 8:12] = (hi & 15) | ((hi & 15) << 4)
    blocks[:, 4:16] = packed
    blocks[:, 0:2], blocks[:, 2:4] = _d_dmin(sc, _Q4_K_Q_VAR, std, 7.5)
    return blocks


def _iq2_xxs_blocks(nb: int, std: float, bg: np.random.SFC64) -> np.ndarray:
    """Random grid indices, sign patterns and 4-bit sub-block scales s; d sets the expected
    block RMS to ``std`` (element = d·(0.5 + s)/4 · grid byte · ±1, signs balanced)."""
    blocks = _random_bytes(bg, nb * 66).reshape(nb, 66)
    s = blocks[:, 2:].reshape(nb, 8, 8)[:, :, 7] >> 4  # top nibble of each sub-block's a1
    mean_sq = 0.0625 * ((0.5 + s.astype(np.float32)) ** 2).mean(axis=1) * _IQ2XXS_GRID_MEAN_SQ
    blocks[:, 0:2] = _f16_bytes(std / np.sqrt(mean_sq))
    return blocks


def _mxfp4_blocks(nb: int, std: float, bg: np.random.SFC64) -> np.ndarray:
    """Random E2M1 codes (symmetric: mean 0) and one E8M0 exponent for all blocks, the power
    of two that brings the expected block RMS nearest ``std`` (within a factor sqrt(2))."""
    blocks = _random_bytes(bg, nb * 17).reshape(nb, 17)
    e = round(math.log2(std / math.sqrt(_MXFP4_MEAN_SQ))) + 127
    blocks[:, 0] = min(254, max(1, e))
    return blocks


_BLOCK_MAKERS: dict[int, Callable[[int, float, np.random.SFC64], np.ndarray]] = {
    Q8_0: _q8_0_blocks, Q2_K: _q2_k_blocks, Q4_K: _q4_k_blocks, IQ2_XXS: _iq2_xxs_blocks, MXFP4: _mxfp4_blocks,
}


def _quant_chunks(t: PlannedTensor, bg: np.random.SFC64) -> Iterator[np.ndarray]:
    fill = t.fill
    assert isinstance(fill, Noise) and fill.mean == 0.0
    gt = GGML_TYPES[t.ggml_type]
    make = _BLOCK_MAKERS[t.ggml_type]
    for nb in _spans(t.n_elements // gt.block_elems, gt.block_bytes):
        yield make(nb, fill.std, bg)


def tensor_chunks(t: PlannedTensor, seed: int) -> Iterator[np.ndarray]:
    """The tensor's data as consecutive byte-exact chunks (C order of the logical shape)."""
    bg = _bitgen(seed, t.name)
    if isinstance(t.fill, HCBase):
        return _hc_base(t, bg)
    if isinstance(t.fill, ExpertIds):
        return _expert_ids(t, bg)
    if t.ggml_type in (F16, F32):
        return _float_chunks(t, bg)
    if t.ggml_type in _BLOCK_MAKERS:
        return _quant_chunks(t, bg)
    raise SynthError(f"{t.name}: no generator for {GGML_TYPES[t.ggml_type].name} with {t.fill}")


def synthesize(preset: str, out: str | Path, seed: int = 0,
               progress: Callable[[int, int], None] | None = None, experts: str | None = None) -> Path:
    """Write the synthetic model ``preset`` (with ``experts``' routed-expert types, see
    :func:`resolve_preset`) to ``out`` (atomically) and return its path.

    Same preset, experts and seed give byte-identical files. ``progress`` receives
    ``(bytes written, total bytes)``. Memory stays bounded (a few chunks of
    :data:`CHUNK_BYTES`) whatever the file size.
    """
    p = resolve_preset(preset, experts)
    if not 0 <= seed < 2**63:
        raise SynthError(f"seed must be in 0..2**63-1, got {seed}")
    tensors = [(TensorInfo(t.name, t.dims, t.ggml_type), functools.partial(tensor_chunks, t, seed))
               for t in plan_tensors(p)]
    return write_gguf(out, metadata(p, seed), tensors, progress=progress)
