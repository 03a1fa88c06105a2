"""Test helpers: a tiny ds4-layout GGUF and a tokenizer-only GGUF written with
``gguf.GGUFWriter``, and a byte-level GGUF builder for corrupt files.

The tiny model's tensor list is written out here from ds4-architecture §1.3 on purpose,
independently of ``workbench.gguf.layout``, so the layout tests check one against the other.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
            "<think>", "</think>", "｜DSML｜"]
TOKENS = SPECIALS + [f"tok{i}" for i in range(57)]  # 64 tokens
MERGES = ["t o", "to k", "tok 1"]

# tiny hyperparameters: four layers with ratios 0, 0, 4, 128; layer 0 hash-routed
L, D, VOCAB, HEADS, HD, ROT, QR, OR, OG = 4, 256, len(TOKENS), 4, 128, 64, 64, 32, 2
NE, NU, FF, NHASH, IH, ID, HC = 4, 2, 256, 1, 2, 128, 2
RATIOS = [0, 0, 4, 128]
MIX = 2 * HC + HC * HC

P = "deepseek4."
# key -> (value, GGUF value type, array item type or None)
TINY_METADATA: dict[str, tuple[Any, V, V | None]] = {
    P + "block_count": (L, V.UINT32, None),
    P + "embedding_length": (D, V.UINT32, None),
    P + "vocab_size": (VOCAB, V.UINT32, None),
    P + "attention.head_count": (HEADS, V.UINT32, None),
    P + "attention.head_count_kv": (1, V.UINT32, None),
    P + "attention.key_length": (HD, V.UINT32, None),
    P + "attention.value_length": (HD, V.UINT32, None),
    P + "rope.dimension_count": (ROT, V.UINT32, None),
    P + "attention.q_lora_rank": (QR, V.UINT32, None),
    P + "attention.output_lora_rank": (OR, V.UINT32, None),
    P + "attention.output_group_count": (OG, V.UINT32, None),
    P + "expert_count": (NE, V.UINT32, None),
    P + "expert_used_count": (NU, V.UINT32, None),
    P + "expert_feed_forward_length": (FF, V.UINT32, None),
    P + "expert_shared_count": (1, V.UINT32, None),
    P + "hash_layer_count": (NHASH, V.UINT32, None),
    P + "attention.sliding_window": (8, V.UINT32, None),
    P + "attention.indexer.head_count": (IH, V.UINT32, None),
    P + "attention.indexer.key_length": (ID, V.UINT32, None),
    P + "attention.indexer.top_k": (4, V.UINT32, None),
    P + "hyper_connection.count": (HC, V.UINT32, None),
    P + "hyper_connection.sinkhorn_iterations": (3, V.UINT32, None),
    P + "attention.compress_ratios": (RATIOS, V.ARRAY, V.UINT32),
    P + "swiglu_clamp_exp": ([10.0] * L, V.ARRAY, V.FLOAT32),
    P + "rope.scaling.original_context_length": (65536, V.UINT32, None),
    P + "rope.freq_base": (10000.0, V.FLOAT32, None),
    P + "rope.scaling.factor": (16.0, V.FLOAT32, None),
    P + "rope.scaling.yarn_beta_fast": (32.0, V.FLOAT32, None),
    P + "rope.scaling.yarn_beta_slow": (1.0, V.FLOAT32, None),
    P + "attention.compress_rope_freq_base": (160000.0, V.FLOAT32, None),
    P + "expert_weights_scale": (1.5, V.FLOAT32, None),
    P + "attention.layer_norm_rms_epsilon": (1e-6, V.FLOAT32, None),
    P + "hyper_connection.epsilon": (1e-6, V.FLOAT32, None),
    P + "expert_weights_norm": (True, V.BOOL, None),
    "general.name": ("tiny-ds4-test", V.STRING, None),
    "tokenizer.ggml.tokens": (TOKENS, V.ARRAY, V.STRING),
    "tokenizer.ggml.merges": (MERGES, V.ARRAY, V.STRING),
}


def tiny_tensors(expert_types: dict[int, tuple[Q, Q]] | None = None) -> dict[str, tuple[Q, tuple[int, ...]]]:
    """name -> (ggml type, logical shape) of the tiny model, straight from §1.3.
    ``expert_types``: layer -> (gate/up type, down type); default IQ2_XXS / Q2_K."""
    t: dict[str, tuple[Q, tuple[int, ...]]] = {
        "token_embd.weight": (Q.F16, (VOCAB, D)),
        "output_hc_fn.weight": (Q.F16, (HC, HC * D)),
        "output_hc_scale.weight": (Q.F32, (1,)),
        "output_hc_base.weight": (Q.F32, (HC,)),
        "output_norm.weight": (Q.F32, (D,)),
        "output.weight": (Q.Q8_0, (VOCAB, D)),
    }
    for i, r in enumerate(RATIOS):
        b = f"blk.{i}."
        gu, down = (expert_types or {}).get(i, (Q.IQ2_XXS, Q.Q2_K))
        t.update({
            b + "hc_attn_fn.weight": (Q.F16, (MIX, HC * D)),
            b + "hc_attn_scale.weight": (Q.F32, (3,)),
            b + "hc_attn_base.weight": (Q.F32, (MIX,)),
            b + "attn_norm.weight": (Q.F32, (D,)),
            b + "attn_q_a.weight": (Q.Q8_0, (QR, D)),
            b + "attn_q_a_norm.weight": (Q.F32, (QR,)),
            b + "attn_q_b.weight": (Q.Q8_0, (HEADS * HD, QR)),
            b + "attn_kv.weight": (Q.Q8_0, (HD, D)),
            b + "attn_kv_a_norm.weight": (Q.F32, (HD,)),
            b + "attn_sinks.weight": (Q.F32, (HEADS,)),
            b + "attn_output_a.weight": (Q.Q8_0, (OG * OR, HEADS * HD // OG)),
            b + "attn_output_b.weight": (Q.Q8_0, (D, OG * OR)),
        })
        if r:
            w = (2 if r == 4 else 1) * HD
            t.update({
                b + "attn_compressor_ape.weight": (Q.F16, (r, w)),
                b + "attn_compressor_kv.weight": (Q.F16, (w, D)),
                b + "attn_compressor_gate.weight": (Q.F16, (w, D)),
                b + "attn_compressor_norm.weight": (Q.F32, (HD,)),
            })
        if r == 4:
            t.update({
                b + "indexer.attn_q_b.weight": (Q.F16, (IH * ID, QR)),
                b + "indexer.proj.weight": (Q.F16, (IH, D)),
                b + "indexer_compressor_ape.weight": (Q.F16, (4, 2 * ID)),
                b + "indexer_compressor_kv.weight": (Q.F16, (2 * ID, D)),
                b + "indexer_compressor_gate.weight": (Q.F16, (2 * ID, D)),
                b + "indexer_compressor_norm.weight": (Q.F32, (ID,)),
            })
        t.update({
            b + "hc_ffn_fn.weight": (Q.F16, (MIX, HC * D)),
            b + "hc_ffn_scale.weight": (Q.F32, (3,)),
            b + "hc_ffn_base.weight": (Q.F32, (MIX,)),
            b + "ffn_norm.weight": (Q.F32, (D,)),
            b + "ffn_gate_inp.weight": (Q.F16, (NE, D)),
        })
        if i >= NHASH:
            t[b + "exp_probs_b.bias"] = (Q.F32, (NE,))
        else:
            t[b + "ffn_gate_tid2eid.weight"] = (Q.I32, (VOCAB, NU))
        t.update({
            b + "ffn_gate_exps.weight": (gu, (NE, FF, D)),
            b + "ffn_up_exps.weight": (gu, (NE, FF, D)),
            b + "ffn_down_exps.weight": (down, (NE, D, FF)),
            b + "ffn_gate_shexp.weight": (Q.Q8_0, (FF, D)),
            b + "ffn_up_shexp.weight": (Q.Q8_0, (FF, D)),
            b + "ffn_down_shexp.weight": (Q.Q8_0, (D, FF)),
        })
    return t


def _tensor_data(qtype: Q, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Deterministic bytes/values of a tensor: floats for F16/F32, ints for I32, random
    bytes shaped [..., row_bytes] for quantized types."""
    rng = np.random.default_rng(seed)
    if qtype == Q.F32:
        return rng.standard_normal(shape).astype(np.float32)
    if qtype == Q.F16:
        return rng.standard_normal(shape).astype(np.float16)
    if qtype == Q.I32:
        return rng.integers(0, NE, shape).astype(np.int32)
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    return rng.integers(0, 256, (*shape[:-1], shape[-1] // block * nbytes), dtype=np.uint8)


def write_tiny(path: Path, *, drop_keys: tuple[str, ...] = (), set_keys: dict[str, tuple[Any, V, V | None]] | None = None,
               drop_tensors: tuple[str, ...] = (), tensors: dict[str, tuple[Q, tuple[int, ...]]] | None = None,
               expert_types: dict[int, tuple[Q, Q]] | None = None) -> Path:
    """Write the tiny ds4 file, optionally with keys dropped/replaced and tensors dropped,
    retyped or reshaped (``tensors`` overrides entries of :func:`tiny_tensors`)."""
    w = gguf.GGUFWriter(str(path), arch="deepseek4")
    meta = {k: v for k, v in TINY_METADATA.items() if k not in drop_keys}
    meta.update(set_keys or {})
    for key, (value, vtype, sub) in meta.items():
        w.add_key_value(key, value, vtype, sub_type=sub)
    spec = tiny_tensors(expert_types)
    spec.update(tensors or {})
    for i, (name, (qtype, shape)) in enumerate(spec.items()):
        if name in drop_tensors:
            continue
        data = _tensor_data(qtype, shape, seed=i)
        w.add_tensor(name, data, raw_dtype=qtype if qtype not in (Q.F32, Q.F16, Q.I32) else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_tokenizer_gguf(path: Path, tokens: list[str], merges: list[str]) -> Path:
    """A GGUF holding only the tokenizer arrays (no tensors), written with ``gguf.GGUFWriter``."""
    w = gguf.GGUFWriter(str(path), arch="deepseek4")
    w.add_token_list(list(tokens))
    w.add_token_merges(list(merges))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---- a byte-level builder for corrupt files ----------------------------------------------
_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d"}


def enc_str(s: str | bytes, length: int | None = None) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b) if length is None else length) + b


def enc_value(vtype: int, value: Any) -> bytes:
    """Encode a value (no type tag); arrays are ``(item_type, items)``."""
    if vtype == 8:
        return enc_str(value)
    if vtype == 9:
        item, items = value
        return struct.pack("<IQ", item, len(items)) + b"".join(enc_value(item, x) for x in items)
    return struct.pack(_FMT[vtype], value)


def enc_kv(key: str | bytes, vtype: int, value: Any) -> bytes:
    return enc_str(key) + struct.pack("<I", vtype) + enc_value(vtype, value)


def enc_tensor(name: str, dims: tuple[int, ...], ggml_type: int, offset: int, ndim: int | None = None) -> bytes:
    return (enc_str(name) + struct.pack("<I", len(dims) if ndim is None else ndim)
            + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", ggml_type, offset))


def build(kvs: list[bytes], tensors: list[bytes], data: bytes, *, alignment: int = 32, version: int = 3,
          n_kv: int | None = None, n_tensors: int | None = None, magic: bytes = b"GGUF") -> bytes:
    """A GGUF file from encoded kv entries and tensor infos, padded to ``alignment``
    before ``data`` (the tensor data region)."""
    head = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(tensors)
    return body + b"\0" * (-len(body) % alignment) + data


def small_file() -> bytes:
    """A well-formed file with every value kind and two tensors (F32 [8] and Q8_0 [2, 32])
    whose data ends exactly at the end of the file."""
    kvs = [
        enc_kv("general.name", 8, "small"),
        enc_kv("a.u8", 0, 7), enc_kv("a.i16", 3, -5), enc_kv("a.u64", 10, 1 << 40), enc_kv("a.f64", 12, 0.25),
        enc_kv("a.bool", 7, 1), enc_kv("a.f32s", 9, (6, [1.5, -2.0])), enc_kv("a.strs", 9, (8, ["x", "yz", ""])),
        enc_kv("a.nested", 9, (9, [(4, [1, 2]), (4, [3])])),
    ]
    tensors = [enc_tensor("f", (8,), 0, 0), enc_tensor("q", (32, 2), 8, 32)]
    data = np.arange(8, dtype=np.float32).tobytes() + bytes(range(68))
    return build(kvs, tensors, data)
