"""Small ds4-layout GGUFs written directly with ``gguf.GGUFWriter`` (not workbench.synth or
workbench.gguf.writer), for the independent float64 reference (tests/npref.py) and for the
foreign-model acceptance tests.

``ds4_tensors`` draws every tensor from one RNG in ds4's converter order; ``write_ds4_gguf``
writes them with the metadata of a config dict, optionally with a tokenizer and in another
tensor order.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFWriter
from gguf.quants import quantize

Tensors = dict[str, tuple[np.ndarray, "QT | None"]]

# f16 scale byte offsets and the value of d giving weights of roughly 1/16
_SCALES = {QT.Q2_K: ((80, 82), 5e-3), QT.Q4_K: ((0, 2), 2.4e-4), QT.IQ2_XXS: ((0,), 2.5e-3)}
_BLOCK = {QT.Q2_K: (256, 84), QT.Q4_K: (256, 144), QT.IQ2_XXS: (256, 66)}
Q8_EXPERTS = (QT.Q8_0,) * 3


def expert_blocks(qtype: QT, shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """Routed expert tensor ``[E, out, in]`` as raw ggml blocks: quantized from random weights
    where gguf-py can quantize (MXFP4, Q8_0), else random valid blocks with small scales."""
    if qtype in (QT.MXFP4, QT.Q8_0):
        w = (rng.normal(size=shape) / math.sqrt(shape[-1])).astype(np.float32)
        return quantize(w, qtype)
    elems, nbytes = _BLOCK[qtype]
    n_blocks = math.prod(shape) // elems
    blocks = rng.integers(0, 256, (n_blocks, nbytes), dtype=np.uint8)
    offs, d = _SCALES[qtype]
    for off in offs:
        blocks[:, off:off + 2] = (rng.uniform(0.5, 1.0, n_blocks) * d).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(*shape[:-1], -1)


def ds4_tensors(m: dict, rng: np.random.Generator,
                experts: list[tuple[QT, QT, QT]] | None = None) -> Tensors:
    """Every tensor of a ds4-layout model with config ``m``, random weights, in converter order.

    ``experts[L]`` gives layer L's (gate, up, down) routed expert types (Q8_0 everywhere when None);
    the other matrices are Q8_0, F16 or F32 as in ds4's files.
    """
    tensors: Tensors = {}
    experts = experts or [Q8_EXPERTS] * len(m["ratios"])

    def mat(*shape: int, fan_in: int | None = None) -> np.ndarray:
        return (rng.normal(size=shape) / math.sqrt(fan_in or shape[-1])).astype(np.float32)

    def put(name: str, arr: np.ndarray, kind: str) -> None:
        if kind == "q8":
            tensors[name] = (quantize(arr, QT.Q8_0), QT.Q8_0)
        else:
            tensors[name] = (arr.astype(np.float16 if kind == "f16" else np.float32), None)

    d, hd, hc = m["n_embd"], m["head_dim"], 4 * m["n_embd"]
    put("token_embd.weight", rng.normal(size=(m["n_vocab"], d)).astype(np.float32), "f16")
    put("output_hc_fn.weight", mat(4, hc), "f16")
    put("output_hc_scale.weight", np.array([0.5], np.float32), "f32")
    put("output_hc_base.weight", mat(4, fan_in=1) * 0.1, "f32")
    put("output_norm.weight", 1 + mat(d, fan_in=1) * 0.1, "f32")
    put("output.weight", mat(m["n_vocab"], d), "q8")
    for L, r in enumerate(m["ratios"]):
        b = f"blk.{L}."
        for sub in ("attn", "ffn"):
            put(b + f"hc_{sub}_fn.weight", mat(24, hc), "f16")
            put(b + f"hc_{sub}_scale.weight", np.array([0.5, 0.5, 0.5], np.float32), "f32")
            put(b + f"hc_{sub}_base.weight", mat(24, fan_in=1) * 0.1, "f32")
        put(b + "attn_norm.weight", 1 + mat(d, fan_in=1) * 0.1, "f32")
        put(b + "attn_q_a.weight", mat(m["q_lora"], d), "q8")
        put(b + "attn_q_a_norm.weight", 1 + mat(m["q_lora"], fan_in=1) * 0.1, "f32")
        put(b + "attn_q_b.weight", mat(m["n_head"] * hd, m["q_lora"]), "q8")
        put(b + "attn_kv.weight", mat(hd, d), "q8")
        put(b + "attn_kv_a_norm.weight", 1 + mat(hd, fan_in=1) * 0.1, "f32")
        put(b + "attn_sinks.weight", mat(m["n_head"], fan_in=1), "f32")
        put(b + "attn_output_a.weight", mat(m["o_groups"] * m["o_lora"], m["n_head"] // m["o_groups"] * hd), "q8")
        put(b + "attn_output_b.weight", mat(d, m["o_groups"] * m["o_lora"]) * 0.5, "q8")
        if r:
            coff = 2 if r == 4 else 1
            put(b + "attn_compressor_ape.weight", mat(r, coff * hd, fan_in=1), "f16")
            put(b + "attn_compressor_kv.weight", mat(coff * hd, d), "f16")
            put(b + "attn_compressor_gate.weight", mat(coff * hd, d), "f16")
            put(b + "attn_compressor_norm.weight", 1 + mat(hd, fan_in=1) * 0.1, "f32")
        if r == 4:
            idim = m["idx_dim"]
            put(b + "indexer.attn_q_b.weight", mat(m["idx_heads"] * idim, m["q_lora"]), "f16")
            put(b + "indexer.proj.weight", mat(m["idx_heads"], d), "f16")
            put(b + "indexer_compressor_ape.weight", mat(4, 2 * idim, fan_in=1), "f16")
            put(b + "indexer_compressor_kv.weight", mat(2 * idim, d), "f16")
            put(b + "indexer_compressor_gate.weight", mat(2 * idim, d), "f16")
            put(b + "indexer_compressor_norm.weight", 1 + mat(idim, fan_in=1) * 0.1, "f32")
        put(b + "ffn_norm.weight", 1 + mat(d, fan_in=1) * 0.1, "f32")
        put(b + "ffn_gate_inp.weight", mat(m["n_expert"], d), "f16")
        if L < m["n_hash"]:
            tid = np.stack([rng.permutation(m["n_expert"])[:m["n_used"]] for _ in range(m["n_vocab"])])
            tensors[b + "ffn_gate_tid2eid.weight"] = (tid.astype(np.int32), None)
        else:
            put(b + "exp_probs_b.bias", mat(m["n_expert"], fan_in=1) * 0.1, "f32")
        gate_t, up_t, down_t = experts[L]
        e, ff = m["n_expert"], m["n_ff"]
        for name, qtype, shape in (("gate", gate_t, (e, ff, d)), ("up", up_t, (e, ff, d)),
                                   ("down", down_t, (e, d, ff))):
            tensors[b + f"ffn_{name}_exps.weight"] = (expert_blocks(qtype, shape, rng), qtype)
        put(b + "ffn_gate_shexp.weight", mat(ff, d), "q8")
        put(b + "ffn_up_shexp.weight", mat(ff, d), "q8")
        put(b + "ffn_down_shexp.weight", mat(d, ff), "q8")
    return tensors


def write_ds4_gguf(path: Path, m: dict, tensors: Tensors, *, name: str | None = None,
                   tokens: list[str] | None = None, merges: list[str] | None = None,
                   order: np.ndarray | None = None) -> None:
    """Write ``tensors`` with the deepseek4 metadata of config ``m``; a tokenizer when ``tokens``
    is given, tensors in ``order`` (indices into ``tensors``) when given, else as drawn."""
    w = GGUFWriter(str(path), "deepseek4")
    if name:
        w.add_name(name)
    u32 = {"block_count": m["n_layer"], "embedding_length": m["n_embd"], "vocab_size": m["n_vocab"],
           "attention.head_count": m["n_head"], "attention.head_count_kv": 1,
           "attention.key_length": m["head_dim"], "attention.value_length": m["head_dim"],
           "rope.dimension_count": m["n_rot"], "attention.q_lora_rank": m["q_lora"],
           "attention.output_lora_rank": m["o_lora"], "attention.output_group_count": m["o_groups"],
           "expert_count": m["n_expert"], "expert_used_count": m["n_used"],
           "expert_feed_forward_length": m["n_ff"], "expert_shared_count": 1, "hash_layer_count": m["n_hash"],
           "attention.sliding_window": m["n_swa"], "attention.indexer.head_count": m["idx_heads"],
           "attention.indexer.key_length": m["idx_dim"], "attention.indexer.top_k": m["idx_topk"],
           "hyper_connection.count": 4, "hyper_connection.sinkhorn_iterations": 20,
           "rope.scaling.original_context_length": 65536}
    for k, v in u32.items():
        w.add_uint32("deepseek4." + k, v)
    for k, v in {"rope.freq_base": 10000.0, "rope.scaling.factor": 16.0, "rope.scaling.yarn_beta_fast": 32.0,
                 "rope.scaling.yarn_beta_slow": 1.0, "attention.compress_rope_freq_base": 160000.0,
                 "expert_weights_scale": 1.5, "attention.layer_norm_rms_epsilon": 1e-6,
                 "hyper_connection.epsilon": 1e-6}.items():
        w.add_float32("deepseek4." + k, v)
    w.add_bool("deepseek4.expert_weights_norm", True)
    w.add_array("deepseek4.attention.compress_ratios", m["ratios"])
    w.add_array("deepseek4.swiglu_clamp_exp", [10.0] * m["n_layer"])
    if tokens is not None:
        w.add_token_list(tokens)
        w.add_token_merges(merges or [])
    names = list(tensors)
    for i in (order if order is not None else range(len(names))):
        arr, qtype = tensors[names[i]]
        if qtype is None:
            w.add_tensor(names[i], arr)
        else:
            w.add_tensor(names[i], arr, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
