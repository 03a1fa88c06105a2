"""Validating a GGUF file against the ds4 layout (ds4-architecture §1.2-1.3).

What the layout is lives in :mod:`workbench.spec`: the metadata key table
(:data:`~workbench.spec.keys.METADATA_KEYS`) and the tensor table
(:func:`~workbench.spec.tensors.expected_tensors`), every shape derived from
:class:`~workbench.spec.args.ModelArgs`, so a tiny synthetic model and the real 43-layer
file are checked by the same code. This module reports every way a file departs from
them; the real model's constants are compared separately by :func:`ds4_compat_problems`
(informational: ds4 itself refuses any file that differs from them).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from workbench.gguf.reader import ARRAY, STRING, GGUFFile, value_type_name
from workbench.spec.args import VALID_RATIOS, ConfigError, ModelArgs, ds4_ratio_schedule
from workbench.spec.ggml import GGML_TYPES, Q4_K, type_names
from workbench.spec.keys import METADATA_KEYS, PREFIX
from workbench.spec.tensors import TensorSpec, expected_tensors

TOKENS_KEY = "tokenizer.ggml.tokens"
MERGES_KEY = "tokenizer.ggml.merges"
# looked up by string in the token table; ds4 exits when one is absent (§1.2)
SPECIAL_TOKENS = ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
                  "<think>", "</think>", "｜DSML｜")
_STRUCTURE = frozenset(PREFIX + k for k in ("block_count", "attention.compress_ratios", "hash_layer_count"))


def _metadata_problems(f: GGUFFile) -> tuple[list[str], set[str]]:
    """Missing or mistyped ``deepseek4.*`` keys, and out-of-range values of keys that fill
    no ModelArgs field (those are checked by ModelArgs.problems); returns (problems,
    untrusted keys)."""
    problems: list[str] = []
    bad: set[str] = set()
    for k in METADATA_KEYS:
        if k.key not in f.metadata:
            if k.required:
                problems.append(f"missing metadata key {k.key}")
                bad.add(k.key)
        elif f.metadata_types[k.key] not in k.types:
            problems.append(f"{k.key} has GGUF type {value_type_name(f.metadata_types[k.key])}, expected "
                            + " or ".join(sorted(value_type_name(t) for t in k.types)))
            bad.add(k.key)
        elif k.field is None and (msg := k.range_problem(f.metadata[k.key])):
            problems.append(msg)
    return problems, bad


def _lenient_args(meta: dict[str, Any], bad: set[str]) -> ModelArgs:
    """ModelArgs from ``meta`` with untrusted keys replaced by ds4's values (no checks)."""
    filled = {k.key: meta[k.key] for k in METADATA_KEYS if k.key in meta}  # the tokenizer stays undecoded
    if "general.name" in meta:
        filled["general.name"] = meta["general.name"]
    n_layer = meta.get(PREFIX + "block_count", 0)
    if PREFIX + "block_count" in bad:  # as many layers as the trusted per-layer arrays describe
        n_layer = min([len(meta[k.key]) for k in METADATA_KEYS
                       if k.field in ("compress_ratios", "swiglu_clamp") and k.key not in bad], default=43)
    for k in METADATA_KEYS:
        if k.key in bad and not k.required:
            filled.pop(k.key)
        elif k.key in bad:
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
        count, present = f.metadata.string_items(TOKENS_KEY, SPECIAL_TOKENS)
        problems += [f"{TOKENS_KEY} lacks the special token {s!r}" for s in SPECIAL_TOKENS if s not in present]
        if n_vocab is not None and count > n_vocab:
            problems.append(f"{TOKENS_KEY} has {count} entries, more than {PREFIX}vocab_size = {n_vocab}")
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
                            f"{block} ({type_names(spec.types)} blocks)")
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
            problems.append(f"{name}: type {t.type_name}, expected {type_names(spec.types)}")
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
    ranges and internal consistency (ModelArgs.problems plus value_length == key_length
    and whole quant blocks per row), the tokenizer arrays and the 7 special tokens,
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
    vocab_key = PREFIX + "vocab_size"
    problems += _tokenizer_problems(f, None if vocab_key in bad else meta[vocab_key])

    structure_ok = (not _STRUCTURE & bad and len(args.compress_ratios) >= args.n_layer
                    and all(r in VALID_RATIOS for r in args.compress_ratios) and args.n_hash_layer <= args.n_layer)
    shapes_ok = not any(k.shapes and (k.key in bad or k.range_problem(meta[k.key])) for k in METADATA_KEYS)
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


def expert_types(f: GGUFFile) -> list[tuple[int, str, str, str]]:
    """(layer, gate, up, down type names) of every layer with routed experts, in layer order
    ("-" for a missing tensor)."""
    n_layer = f.metadata.get(PREFIX + "block_count", 0)
    out = []
    for L in range(n_layer if isinstance(n_layer, int) else 0):
        infos = [f.tensors.get(f"blk.{L}.ffn_{p}_exps.weight") for p in ("gate", "up", "down")]
        if any(i is not None for i in infos):
            out.append((L, *(i.type_name if i is not None else "-" for i in infos)))
    return out


def routed_quant_bits(f: GGUFFile) -> int:
    """ds4's KVC header byte 4: 4 when the first layer with routed experts has Q4_K gate
    experts, else 2 (IQ2_XXS, MXFP4, Q8_0 ... all give 2)."""
    first = expert_types(f)[:1]
    return 4 if first and first[0][1] == GGML_TYPES[Q4_K].name else 2
