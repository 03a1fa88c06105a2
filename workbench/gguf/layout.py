"""The ds4 GGUF layout: metadata keys, tensor names, types and shapes (ds4-architecture §1.2-1.3).

This is the one place that lists them. Every shape is derived from :class:`ModelArgs`, so
a tiny synthetic model and the real 43-layer file are checked by the same code; the real
model's constants are compared separately by :func:`ds4_compat_problems` (informational:
ds4 itself refuses any file that differs from them).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from workbench.gguf.reader import (ARRAY, BOOL, FLOAT32, FLOAT64, INT32, STRING, UINT32, UINT64,
                                   GGUFFile, value_type_name)
from workbench.gguf.types import F16, F32, GGML_TYPES, I32, IQ2_XXS, Q2_K, Q4_K, Q8_0
from workbench.model.config import PREFIX, ConfigError, ModelArgs, ds4_ratio_schedule

ROUTED_TYPES = frozenset({IQ2_XXS, Q2_K, Q4_K})  # routed experts; gate and up share one
VALID_RATIOS = (0, 4, 128)
HC_SCALES = 3  # hc_*_scale: pre, post and combine scales

TOKENS_KEY = "tokenizer.ggml.tokens"
MERGES_KEY = "tokenizer.ggml.merges"
# looked up by string in the token table; ds4 exits when one is absent (§1.2)
SPECIAL_TOKENS = ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
                  "<think>", "</think>", "｜DSML｜")

_INT = frozenset({UINT32})
_CTX = frozenset({UINT32, UINT64})
_REAL = frozenset({FLOAT32, FLOAT64, UINT32, INT32})


@dataclass(frozen=True)
class MetaKey:
    """One required ``deepseek4.*`` key: accepted GGUF value types, the ModelArgs field it
    fills (None: not kept there), ds4's compiled-in value, and whether tensor shapes
    depend on it."""

    key: str
    types: frozenset
    field: str | None
    ds4: Any
    shapes: bool = False


def _k(suffix: str, types: frozenset, field: str | None, ds4: Any, shapes: bool = False) -> MetaKey:
    return MetaKey(PREFIX + suffix, types, field, ds4, shapes)


METADATA_KEYS: tuple[MetaKey, ...] = (
    _k("block_count", _INT, "n_layer", 43, shapes=True),
    _k("embedding_length", _INT, "n_embd", 4096, shapes=True),
    _k("vocab_size", _INT, "n_vocab", 129280, shapes=True),
    _k("attention.head_count", _INT, "n_head", 64, shapes=True),
    _k("attention.head_count_kv", _INT, "n_head_kv", 1),
    _k("attention.key_length", _INT, "head_dim", 512, shapes=True),
    _k("attention.value_length", _INT, None, 512),
    _k("rope.dimension_count", _INT, "n_rot", 64),
    _k("attention.q_lora_rank", _INT, "q_lora_rank", 1024, shapes=True),
    _k("attention.output_lora_rank", _INT, "o_lora_rank", 1024, shapes=True),
    _k("attention.output_group_count", _INT, "o_groups", 8, shapes=True),
    _k("expert_count", _INT, "n_expert", 256, shapes=True),
    _k("expert_used_count", _INT, "n_expert_used", 6, shapes=True),
    _k("expert_feed_forward_length", _INT, "n_ff_exp", 2048, shapes=True),
    _k("expert_shared_count", _INT, "n_expert_shared", 1, shapes=True),
    _k("hash_layer_count", _INT, "n_hash_layer", 3, shapes=True),
    _k("attention.sliding_window", _INT, "n_swa", 128),
    _k("attention.indexer.head_count", _INT, "idx_heads", 64, shapes=True),
    _k("attention.indexer.key_length", _INT, "idx_dim", 128, shapes=True),
    _k("attention.indexer.top_k", _INT, "idx_topk", 512),
    _k("hyper_connection.count", _INT, "n_hc", 4, shapes=True),
    _k("hyper_connection.sinkhorn_iterations", _INT, "sinkhorn_iters", 20),
    _k("attention.compress_ratios", frozenset({(ARRAY, UINT32), (ARRAY, INT32)}), "compress_ratios", None,
       shapes=True),
    _k("swiglu_clamp_exp", frozenset({(ARRAY, FLOAT32), (ARRAY, FLOAT64)}), "swiglu_clamp", 10.0),
    _k("rope.scaling.original_context_length", _CTX, "rope_orig_ctx", 65536),
    _k("rope.freq_base", _REAL, "rope_freq_base", 10000.0),
    _k("rope.scaling.factor", _REAL, "rope_scaling_factor", 16.0),
    _k("rope.scaling.yarn_beta_fast", _REAL, "yarn_beta_fast", 32.0),
    _k("rope.scaling.yarn_beta_slow", _REAL, "yarn_beta_slow", 1.0),
    _k("attention.compress_rope_freq_base", _REAL, "compress_rope_freq_base", 160000.0),
    _k("expert_weights_scale", _REAL, "expert_weights_scale", 1.5),
    _k("attention.layer_norm_rms_epsilon", _REAL, "rms_eps", 1e-6),
    _k("hyper_connection.epsilon", _REAL, "hc_eps", 1e-6),
    _k("expert_weights_norm", frozenset({BOOL}), "expert_weights_norm", True),
)
# optional keys that must be 0 when present (no group-limited routing)
ZERO_KEYS = (PREFIX + "expert_group_count", PREFIX + "expert_group_used_count")
# keys whose value must be > 0 for the shapes to mean anything
_POSITIVE = frozenset(k.key for k in METADATA_KEYS if k.shapes and k.field not in ("n_hash_layer", "compress_ratios"))
_STRUCTURE = frozenset(PREFIX + k for k in ("block_count", "attention.compress_ratios", "hash_layer_count"))


@dataclass(frozen=True)
class TensorSpec:
    """What one tensor must be: allowed ggml types, logical row-major shape, required."""

    types: frozenset
    shape: tuple[int, ...]
    required: bool = True

    @property
    def dims(self) -> tuple[int, ...]:
        """GGUF dim order (``dims[0]`` fastest)."""
        return tuple(reversed(self.shape))


def _type_names(types: frozenset) -> str:
    return "/".join(sorted(GGML_TYPES[t].name for t in types))


def expected_tensors(args: ModelArgs, gate_type: int | None = None) -> dict[str, TensorSpec]:
    """Every tensor of a ds4 file for ``args``: name -> spec, globals first, then per layer.

    Routed experts may be IQ2_XXS, Q2_K or Q4_K; ``gate_type`` (one of those) pins the
    gate and up experts of every layer to that type. Shapes (logical, ``[out, in]``):
    hc_dim = n_hc*n_embd, mix = 2*n_hc + n_hc², q_dim = n_head*head_dim, the grouped
    output projection o_groups*o_lora_rank x q_dim/o_groups, compressors coff*width
    (coff = 2 for ratio 4, else 1), indexer tensors on ratio-4 layers only, tid2eid on
    the first hash_layer_count layers only, ``exp_probs_b.bias`` optional everywhere.
    """
    if gate_type is not None and gate_type not in ROUTED_TYPES:
        raise ConfigError(f"routed expert type {GGML_TYPES.get(gate_type, gate_type)} is not one of "
                          f"{_type_names(ROUTED_TYPES)}")
    gate_up = frozenset({gate_type}) if gate_type is not None else ROUTED_TYPES
    f16, f32, q8, i32 = (frozenset({t}) for t in (F16, F32, Q8_0, I32))
    d, hd, mix = args.n_embd, args.head_dim, args.hc_mix
    q_dim = args.n_head * hd
    o_rank = args.o_groups * args.o_lora_rank
    o_in = q_dim // args.o_groups if args.o_groups else 0
    shared_ff = args.n_ff_exp * args.n_expert_shared
    idx_w = args.idx_heads * args.idx_dim

    specs: dict[str, TensorSpec] = {
        "token_embd.weight": TensorSpec(f16, (args.n_vocab, d)),
        "output_hc_fn.weight": TensorSpec(f16, (args.n_hc, args.hc_dim)),
        "output_hc_scale.weight": TensorSpec(f32, (1,)),
        "output_hc_base.weight": TensorSpec(f32, (args.n_hc,)),
        "output_norm.weight": TensorSpec(f32, (d,)),
        "output.weight": TensorSpec(q8, (args.n_vocab, d)),
    }
    for L in range(args.n_layer):
        r = args.compress_ratios[L]
        coff = 2 if r == 4 else 1
        layer = {
            "hc_attn_fn.weight": TensorSpec(f16, (mix, args.hc_dim)),
            "hc_attn_scale.weight": TensorSpec(f32, (HC_SCALES,)),
            "hc_attn_base.weight": TensorSpec(f32, (mix,)),
            "attn_norm.weight": TensorSpec(f32, (d,)),
            "attn_q_a.weight": TensorSpec(q8, (args.q_lora_rank, d)),
            "attn_q_a_norm.weight": TensorSpec(f32, (args.q_lora_rank,)),
            "attn_q_b.weight": TensorSpec(q8, (q_dim, args.q_lora_rank)),
            "attn_kv.weight": TensorSpec(q8, (hd, d)),
            "attn_kv_a_norm.weight": TensorSpec(f32, (hd,)),
            "attn_sinks.weight": TensorSpec(f32, (args.n_head,)),
            "attn_output_a.weight": TensorSpec(q8, (o_rank, o_in)),
            "attn_output_b.weight": TensorSpec(q8, (d, o_rank)),
        }
        if r:
            layer.update({
                "attn_compressor_ape.weight": TensorSpec(f16, (r, coff * hd)),
                "attn_compressor_kv.weight": TensorSpec(f16, (coff * hd, d)),
                "attn_compressor_gate.weight": TensorSpec(f16, (coff * hd, d)),
                "attn_compressor_norm.weight": TensorSpec(f32, (hd,)),
            })
        if r == 4:
            layer.update({
                "indexer.attn_q_b.weight": TensorSpec(f16, (idx_w, args.q_lora_rank)),
                "indexer.proj.weight": TensorSpec(f16, (args.idx_heads, d)),
                "indexer_compressor_ape.weight": TensorSpec(f16, (r, coff * args.idx_dim)),
                "indexer_compressor_kv.weight": TensorSpec(f16, (coff * args.idx_dim, d)),
                "indexer_compressor_gate.weight": TensorSpec(f16, (coff * args.idx_dim, d)),
                "indexer_compressor_norm.weight": TensorSpec(f32, (args.idx_dim,)),
            })
        layer.update({
            "hc_ffn_fn.weight": TensorSpec(f16, (mix, args.hc_dim)),
            "hc_ffn_scale.weight": TensorSpec(f32, (HC_SCALES,)),
            "hc_ffn_base.weight": TensorSpec(f32, (mix,)),
            "ffn_norm.weight": TensorSpec(f32, (d,)),
            "ffn_gate_inp.weight": TensorSpec(f16, (args.n_expert, d)),
            "exp_probs_b.bias": TensorSpec(f32, (args.n_expert,), required=False),
        })
        if L < args.n_hash_layer:
            layer["ffn_gate_tid2eid.weight"] = TensorSpec(i32, (args.n_vocab, args.n_expert_used))
        layer.update({
            "ffn_gate_exps.weight": TensorSpec(gate_up, (args.n_expert, args.n_ff_exp, d)),
            "ffn_up_exps.weight": TensorSpec(gate_up, (args.n_expert, args.n_ff_exp, d)),
            "ffn_down_exps.weight": TensorSpec(ROUTED_TYPES, (args.n_expert, d, args.n_ff_exp)),
            "ffn_gate_shexp.weight": TensorSpec(q8, (shared_ff, d)),
            "ffn_up_shexp.weight": TensorSpec(q8, (shared_ff, d)),
            "ffn_down_shexp.weight": TensorSpec(q8, (d, shared_ff)),
        })
        specs.update({f"blk.{L}.{name}": spec for name, spec in layer.items()})
    return specs


def _metadata_problems(f: GGUFFile) -> tuple[list[str], set[str]]:
    """Missing or mistyped ``deepseek4.*`` keys; returns (problems, untrusted keys)."""
    problems: list[str] = []
    bad: set[str] = set()
    for k in METADATA_KEYS:
        if k.key not in f.metadata:
            problems.append(f"missing metadata key {k.key}")
            bad.add(k.key)
        elif f.metadata_types[k.key] not in k.types:
            problems.append(f"{k.key} has GGUF type {value_type_name(f.metadata_types[k.key])}, expected "
                            + " or ".join(sorted(value_type_name(t) for t in k.types)))
            bad.add(k.key)
    for key in ZERO_KEYS:
        if key in f.metadata and f.metadata[key] != 0:
            problems.append(f"{key} = {f.metadata[key]!r}: expert groups are not supported (must be 0)")
    return problems, bad


def _lenient_args(meta: dict[str, Any], bad: set[str]) -> ModelArgs:
    """ModelArgs from ``meta`` with untrusted keys replaced by ds4's values (no checks)."""
    filled = dict(meta)
    n_layer = meta.get(PREFIX + "block_count", 0)
    if PREFIX + "block_count" in bad:  # as many layers as the trusted per-layer arrays describe
        n_layer = min([len(meta[k.key]) for k in METADATA_KEYS
                       if k.field in ("compress_ratios", "swiglu_clamp") and k.key not in bad], default=43)
    for k in METADATA_KEYS:
        if k.key in bad:
            if k.field == "n_layer":
                filled[k.key] = n_layer
            elif k.field == "compress_ratios":
                filled[k.key] = list(ds4_ratio_schedule(n_layer))
            elif k.field == "swiglu_clamp":
                filled[k.key] = [k.ds4] * n_layer
            else:
                filled[k.key] = k.ds4
    return ModelArgs.from_metadata(filled, check=False)


def _tokenizer_problems(f: GGUFFile, n_vocab: int | None) -> list[str]:
    problems: list[str] = []
    for key in (TOKENS_KEY, MERGES_KEY):
        if key not in f.metadata:
            problems.append(f"missing metadata key {key}")
        elif f.metadata_types[key] != (ARRAY, STRING):
            problems.append(f"{key} has GGUF type {value_type_name(f.metadata_types[key])}, expected array[string]")
    if f.metadata_types.get(TOKENS_KEY) == (ARRAY, STRING):
        tokens = f.metadata[TOKENS_KEY]
        present = set(tokens)
        problems += [f"{TOKENS_KEY} lacks the special token {s!r}" for s in SPECIAL_TOKENS if s not in present]
        if n_vocab is not None and len(tokens) > n_vocab:
            problems.append(f"{TOKENS_KEY} has {len(tokens)} entries, more than {PREFIX}vocab_size = {n_vocab}")
    return problems


def _row_problems(specs: dict[str, TensorSpec]) -> list[str]:
    """Quantized tensors whose metadata-derived rows are not whole blocks (once per name)."""
    problems: list[str] = []
    seen: set[str] = set()
    for name, spec in specs.items():
        block = min(GGML_TYPES[t].block_elems for t in spec.types)
        generic = re.sub(r"^blk\.\d+\.", "blk.*.", name)
        if block > 1 and spec.shape[-1] % block and generic not in seen:
            seen.add(generic)
            problems.append(f"{generic} rows are {spec.shape[-1]} elements by the metadata, not a multiple of "
                            f"{block} ({_type_names(spec.types)} blocks)")
    return problems


def _tensor_problems(f: GGUFFile, specs: dict[str, TensorSpec], check_shapes: bool) -> list[str]:
    problems: list[str] = []
    for name, spec in specs.items():
        t = f.tensors.get(name)
        if t is None:
            if spec.required:
                problems.append(f"missing tensor {name}")
            continue
        if t.ggml_type not in spec.types:
            problems.append(f"{name}: type {t.type_name}, expected {_type_names(spec.types)}")
        if check_shapes and t.shape != spec.shape:
            problems.append(f"{name}: shape {list(t.shape)}, expected {list(spec.shape)}")
        if name.endswith(".ffn_up_exps.weight"):
            gate = f.tensors.get(name.replace(".ffn_up_exps.", ".ffn_gate_exps."))
            if gate is not None and gate.ggml_type in spec.types and t.ggml_type in spec.types \
                    and gate.ggml_type != t.ggml_type:
                problems.append(f"{name}: type {t.type_name}, but ffn_gate_exps is {gate.type_name}: "
                                "gate and up experts must share a type")
    return problems


def validate_ds4(f: GGUFFile) -> list[str]:
    """Every reason ``f`` is not a loadable ds4-layout file (empty list: valid).

    Checks the ``deepseek4.*`` keys (present, GGUF types as ds4 accepts them), their
    internal consistency (ModelArgs.problems plus value_length == key_length, positive
    widths, whole quant blocks per row), the tokenizer arrays and the 7 special tokens,
    and every tensor of :func:`expected_tensors` (present, allowed type, exact shape).
    Per-layer tensors are skipped when the layer structure keys are unusable, shapes
    when a key they depend on is; those keys are reported instead.
    """
    problems, bad = _metadata_problems(f)
    try:
        args = _lenient_args(f.metadata, bad)
    except ConfigError as err:
        return problems + [str(err)]
    consistency = ModelArgs.problems(args)
    problems += [p for p in consistency if not any(key in p for key in bad)]
    meta = f.metadata
    k_len, v_len = PREFIX + "attention.key_length", PREFIX + "attention.value_length"
    if not {k_len, v_len} & bad and meta[k_len] != meta[v_len]:
        problems.append(f"{v_len} = {meta[v_len]} differs from {k_len} = {meta[k_len]} (K and V share one row)")
    problems += [f"{key} = {meta[key]}, must be > 0" for key in sorted(_POSITIVE - bad) if meta[key] <= 0]
    vocab_key = PREFIX + "vocab_size"
    problems += _tokenizer_problems(f, None if vocab_key in bad else meta[vocab_key])

    structure_ok = (not _STRUCTURE & bad and len(args.compress_ratios) >= args.n_layer
                    and all(r in VALID_RATIOS for r in args.compress_ratios) and args.n_hash_layer <= args.n_layer)
    shapes_ok = not any(k.shapes and k.key in bad for k in METADATA_KEYS) and all(meta[k] > 0 for k in _POSITIVE)
    specs = expected_tensors(args if structure_ok else dataclasses.replace(args, n_layer=0))
    if shapes_ok:
        problems += _row_problems(specs)
    problems += _tensor_problems(f, specs, shapes_ok)
    return problems


def ds4_compat_problems(args: ModelArgs) -> list[str]:
    """Where ``args`` differs from ds4's compiled-in constants (§1.2). Informational: the
    workbench runs such files, ds4 itself would refuse them."""
    problems: list[str] = []
    for k in METADATA_KEYS:
        if k.field is None or k.ds4 is None:
            continue
        value = getattr(args, k.field)
        if k.field == "swiglu_clamp":
            off = [i for i, v in enumerate(value) if not math.isclose(v, k.ds4, rel_tol=1e-6)]
            if off:
                problems.append(f"{k.key} differs from {k.ds4} at layers {off}")
        elif isinstance(k.ds4, float):
            if not math.isclose(value, k.ds4, rel_tol=1e-6):
                problems.append(f"{k.key} = {value}, ds4 expects {k.ds4}")
        elif value != k.ds4:
            problems.append(f"{k.key} = {value}, ds4 expects {k.ds4}")
    schedule = ds4_ratio_schedule(args.n_layer)
    off = [i for i, (r, s) in enumerate(zip(args.compress_ratios, schedule)) if r != s]
    if off:
        problems.append(f"{PREFIX}attention.compress_ratios differ from ds4's schedule "
                        f"(0 for L<2, then 4 on even, 128 on odd layers) at layers {off}")
    return problems


def routed_quant_bits(f: GGUFFile) -> int:
    """ds4's KVC header byte 4: 4 when layer 0's gate experts are Q4_K, else 2."""
    info = f.tensors.get("blk.0.ffn_gate_exps.weight")
    return 4 if info is not None and info.ggml_type == Q4_K else 2
