"""The ds4 layout: expected tensors from ModelArgs, validate_ds4 listing every problem, ds4
compatibility, and ``workbench inspect``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

import gguf_helpers as H
from workbench.cli import main
from workbench.gguf.layout import ds4_compat_problems, expert_types, routed_quant_bits, validate_ds4
from workbench.gguf.reader import GGUFFile
from workbench.spec import ggml as T
from workbench.spec.keys import METADATA_KEYS
from workbench.spec.tensors import ROUTED_TYPES, expected_tensors
from workbench.spec.args import ConfigError, ModelArgs, ds4_ratio_schedule

P = "deepseek4."


def _real_metadata() -> dict:
    """ds4's compiled-in values (§1.2), as a metadata dict."""
    meta = {k.key: k.ds4 for k in METADATA_KEYS if k.required}
    meta[P + "attention.compress_ratios"] = list(ds4_ratio_schedule(43))
    meta[P + "swiglu_clamp_exp"] = [10.0] * 43
    return meta


REAL = ModelArgs.from_metadata(_real_metadata())


def _problems(path: Path) -> list[str]:
    with GGUFFile(path) as f:
        return validate_ds4(f)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return H.write_tiny(tmp_path_factory.mktemp("layout") / "tiny.gguf")


# ---- expected_tensors -----------------------------------------------------------------------
def test_real_model_tensor_count_and_shapes():
    specs = expected_tensors(REAL)
    required = [n for n, s in specs.items() if s.required]
    assert len(required) == 1288  # §1.3: 6 + 43*23 + 41*4 + 21*6 + 3
    assert sum(not s.required for s in specs.values()) == 43
    assert all(n.endswith("exp_probs_b.bias") for n, s in specs.items() if not s.required)
    # spot checks against the §1.3 table (GGUF dims)
    dims = {n: s.dims for n, s in specs.items()}
    assert dims["token_embd.weight"] == (4096, 129280)
    assert dims["output_hc_fn.weight"] == (16384, 4)
    assert dims["blk.0.hc_attn_fn.weight"] == (16384, 24)
    assert dims["blk.0.hc_attn_scale.weight"] == (3,)
    assert dims["blk.0.attn_q_b.weight"] == (1024, 32768)
    assert dims["blk.0.attn_output_a.weight"] == (4096, 8192)
    assert dims["blk.0.attn_output_b.weight"] == (8192, 4096)
    assert dims["blk.2.attn_compressor_ape.weight"] == (1024, 4)
    assert dims["blk.3.attn_compressor_ape.weight"] == (512, 128)
    assert dims["blk.2.attn_compressor_kv.weight"] == (4096, 1024)
    assert dims["blk.3.attn_compressor_gate.weight"] == (4096, 512)
    assert dims["blk.2.indexer.attn_q_b.weight"] == (1024, 8192)
    assert dims["blk.2.indexer.proj.weight"] == (4096, 64)
    assert dims["blk.2.indexer_compressor_ape.weight"] == (256, 4)
    assert dims["blk.2.indexer_compressor_kv.weight"] == (4096, 256)
    assert dims["blk.2.indexer_compressor_norm.weight"] == (128,)
    assert dims["blk.2.ffn_gate_tid2eid.weight"] == (6, 129280)
    assert dims["blk.5.ffn_gate_exps.weight"] == (4096, 2048, 256)
    assert dims["blk.5.ffn_down_exps.weight"] == (2048, 4096, 256)
    assert dims["blk.5.ffn_down_shexp.weight"] == (2048, 4096)
    assert "blk.3.ffn_gate_tid2eid.weight" not in specs
    assert "blk.1.attn_compressor_kv.weight" not in specs
    assert "blk.3.indexer.proj.weight" not in specs and "blk.42.indexer.proj.weight" in specs
    assert specs["blk.5.ffn_gate_exps.weight"].types == ROUTED_TYPES
    assert specs["blk.5.attn_kv.weight"].types == {T.Q8_0}
    assert specs["blk.0.ffn_gate_tid2eid.weight"].types == {T.I32}


def test_tiny_expected_matches_independent_list(tiny):
    with GGUFFile(tiny) as f:
        args = ModelArgs.from_metadata(f.metadata)
    specs = expected_tensors(args)
    listed = H.tiny_tensors()
    optional = {n for n, s in specs.items() if not s.required}
    assert set(specs) - optional == set(listed) - optional
    for name, (qtype, shape) in listed.items():
        assert specs[name].shape == shape, name
        assert qtype.value in specs[name].types, name


def test_gate_type_pins_gate_and_up():
    specs = expected_tensors(REAL, gate_type=T.Q4_K)
    assert specs["blk.7.ffn_gate_exps.weight"].types == {T.Q4_K}
    assert specs["blk.7.ffn_up_exps.weight"].types == {T.Q4_K}
    assert specs["blk.7.ffn_down_exps.weight"].types == ROUTED_TYPES
    with pytest.raises(ConfigError, match="F16"):
        expected_tensors(REAL, gate_type=T.F16)
    assert expected_tensors(REAL, gate_type=T.MXFP4)["blk.7.ffn_up_exps.weight"].types == {T.MXFP4}


@pytest.mark.parametrize("key", [k for k in METADATA_KEYS if k.field and k.field not in ("compress_ratios", "swiglu_clamp")],
                         ids=lambda k: k.key)
def test_shape_flags_are_true(key):
    """A key is marked ``shapes`` exactly when changing it changes some expected tensor."""
    value = getattr(REAL, key.field)
    change = {key.field: value + 1 if isinstance(value, int) else value * 2}
    if key.field == "n_layer":
        change["compress_ratios"] = ds4_ratio_schedule(44)
    changed = dataclasses.replace(REAL, **change)
    differs = {n: s.shape for n, s in expected_tensors(REAL).items()} != \
              {n: s.shape for n, s in expected_tensors(changed).items()}
    assert differs == key.shapes


def test_metadata_keys_cover_model_args():
    """Every key ModelArgs.from_metadata requires is in METADATA_KEYS, and vice versa."""
    meta = _real_metadata()
    for k in METADATA_KEYS:
        if k.field is None or not k.required:
            continue
        partial = {key: v for key, v in meta.items() if key != k.key}
        with pytest.raises(ConfigError, match=k.key):
            ModelArgs.from_metadata(partial)


# ---- validate_ds4 ---------------------------------------------------------------------------
def test_tiny_file_is_valid(tiny):
    assert _problems(tiny) == []


def test_problems_reported_together(tmp_path):
    p = H.write_tiny(tmp_path / "bad.gguf",
                     drop_keys=(P + "attention.indexer.top_k",),
                     drop_tensors=("blk.2.indexer.proj.weight",),
                     tensors={"blk.1.attn_kv.weight": (Q.F16, (H.HD, H.D)),
                              "blk.3.attn_compressor_ape.weight": (Q.F16, (4, H.HD))})
    assert _problems(p) == [
        f"missing metadata key {P}attention.indexer.top_k",
        "blk.1.attn_kv.weight: type F16, expected Q8_0",
        "missing tensor blk.2.indexer.proj.weight",
        "blk.3.attn_compressor_ape.weight: shape [4, 128], expected [128, 128]",
    ]


def test_missing_shape_key_still_checks_names_and_types(tmp_path):
    p = H.write_tiny(tmp_path / "bad.gguf", drop_keys=(P + "embedding_length",),
                     drop_tensors=("blk.0.attn_q_b.weight",),
                     tensors={"output.weight": (Q.F16, (H.VOCAB, H.D))})
    assert _problems(p) == [
        f"missing metadata key {P}embedding_length",
        "output.weight: type F16, expected Q8_0",
        "missing tensor blk.0.attn_q_b.weight",
    ]


def test_missing_structure_key_checks_globals_only(tmp_path):
    p = H.write_tiny(tmp_path / "bad.gguf", drop_keys=(P + "block_count",), drop_tensors=("output_norm.weight",))
    assert _problems(p) == [f"missing metadata key {P}block_count", "missing tensor output_norm.weight"]


def test_wrong_metadata_types(tmp_path):
    p = H.write_tiny(tmp_path / "bad.gguf", set_keys={
        P + "block_count": (4, V.UINT64, None),
        P + "attention.compress_ratios": ([0.0, 0.0, 4.0, 128.0], V.ARRAY, V.FLOAT32),
        P + "expert_weights_norm": (1, V.UINT32, None),
        P + "expert_weights_scale": (1.5, V.FLOAT64, None),  # allowed
    })
    assert _problems(p) == [
        f"{P}block_count has GGUF type u64, expected u32",
        f"{P}attention.compress_ratios has GGUF type array[f32], expected array[i32] or array[u32]",
        f"{P}expert_weights_norm has GGUF type u32, expected bool",
    ]


def test_consistency_problems(tmp_path):
    p = H.write_tiny(tmp_path / "bad.gguf", set_keys={
        P + "attention.compress_ratios": ([0, 0, 4, 5], V.ARRAY, V.UINT32),
        P + "swiglu_clamp_exp": ([10.0] * 3, V.ARRAY, V.FLOAT32),
        P + "hash_layer_count": (5, V.UINT32, None),
        P + "expert_used_count": (9, V.UINT32, None),
        P + "attention.value_length": (64, V.UINT32, None),
    })
    problems = _problems(p)
    for phrase in (f"{P}swiglu_clamp_exp has 3 entries, need 4",
                   f"{P}attention.compress_ratios[3] = 5, expected 0, 4 or 128",
                   f"{P}hash_layer_count 5 > block_count 4",
                   f"{P}expert_used_count 9 > expert_count 4",
                   f"{P}attention.value_length = 64 differs from {P}attention.key_length = 128"):
        assert any(phrase in x for x in problems), (phrase, problems)
    # the tid2eid shape follows expert_used_count; no per-layer checks with a broken schedule
    assert "ffn_gate_tid2eid.weight: shape" not in " ".join(problems)


def test_short_ratio_list(tmp_path):
    p = H.write_tiny(tmp_path / "bad.gguf",
                     set_keys={P + "attention.compress_ratios": ([0, 0, 4], V.ARRAY, V.INT32)})
    assert _problems(p) == [f"{P}attention.compress_ratios has 3 entries, need 4"]


def test_rows_not_whole_blocks(tmp_path):
    """q_lora_rank 48 makes attn_q_b (Q8_0) rows 48 wide: reported once, by tensor."""
    p = H.write_tiny(tmp_path / "bad.gguf", set_keys={P + "attention.q_lora_rank": (48, V.UINT32, None)})
    problems = _problems(p)
    assert "blk.*.attn_q_b.weight rows are 48 elements by the metadata, not a multiple of 32 (Q8_0 blocks)" \
        in problems
    assert sum("rows are" in x for x in problems) == 1  # F16 indexer.attn_q_b has no block constraint
    # routed experts may be MXFP4 or Q8_0 (32-element blocks): 128 is fine by the metadata, 48 is not
    p = H.write_tiny(tmp_path / "bad2.gguf", set_keys={P + "expert_feed_forward_length": (48, V.UINT32, None)})
    assert ("blk.*.ffn_down_exps.weight rows are 48 elements by the metadata, not a multiple of 32 "
            "(IQ2_XXS/MXFP4/Q2_K/Q4_K/Q8_0 blocks)") in _problems(p)


def test_tokenizer_problems(tmp_path):
    p = H.write_tiny(tmp_path / "bad.gguf", drop_keys=("tokenizer.ggml.merges",), set_keys={
        "tokenizer.ggml.tokens": (["<think>", "</think>"] + [f"t{i}" for i in range(70)], V.ARRAY, V.STRING)})
    problems = _problems(p)
    assert "missing metadata key tokenizer.ggml.merges" in problems
    missing = [s for s in H.SPECIALS if s not in ("<think>", "</think>")]
    for s in missing:
        assert f"tokenizer.ggml.tokens lacks the special token {s!r}" in problems
    assert f"tokenizer.ggml.tokens has 72 entries, more than {P}vocab_size = 64" in problems
    assert len(problems) == 1 + len(missing) + 1


def test_experts_types(tmp_path):
    # per-layer mixes are fine (ds4's "mixed" splice), gate and up must agree within a layer
    ok = H.write_tiny(tmp_path / "mixed.gguf", expert_types={3: (Q.Q4_K, Q.Q4_K), 2: (Q.Q2_K, Q.Q4_K)})
    assert _problems(ok) == []
    # today's formats: MXFP4 (ds4f-mxfp4) and Q8_0 experts, any mix per layer
    today = H.write_tiny(tmp_path / "today.gguf", expert_types={0: (Q.MXFP4, Q.MXFP4), 1: (Q.Q8_0, Q.MXFP4)})
    assert _problems(today) == []
    with GGUFFile(today) as f:
        assert expert_types(f)[:3] == [(0, "MXFP4", "MXFP4", "MXFP4"), (1, "Q8_0", "Q8_0", "MXFP4"),
                                       (2, "IQ2_XXS", "IQ2_XXS", "Q2_K")]
        assert routed_quant_bits(f) == 2  # ds4: only a Q4_K gate in the first expert layer gives 4
    with GGUFFile(ok) as f:
        assert routed_quant_bits(f) == 2
    q4_first = H.write_tiny(tmp_path / "q4.gguf", expert_types={0: (Q.Q4_K, Q.IQ2_XXS)})
    with GGUFFile(q4_first) as f:
        assert routed_quant_bits(f) == 4
    bad = H.write_tiny(tmp_path / "bad.gguf", tensors={
        "blk.1.ffn_up_exps.weight": (Q.Q4_K, (H.NE, H.FF, H.D)),
        "blk.2.ffn_down_exps.weight": (Q.F16, (H.NE, H.D, H.FF))})
    assert _problems(bad) == [
        "blk.1.ffn_up_exps.weight: type Q4_K, but ffn_gate_exps is IQ2_XXS: gate and up experts must share a type",
        "blk.2.ffn_down_exps.weight: type F16, expected IQ2_XXS/MXFP4/Q2_K/Q4_K/Q8_0",
    ]


def test_optional_bias(tmp_path):
    absent = H.write_tiny(tmp_path / "nobias.gguf", drop_tensors=("blk.1.exp_probs_b.bias", "blk.3.exp_probs_b.bias"))
    assert _problems(absent) == []
    wrong = H.write_tiny(tmp_path / "bias.gguf", tensors={"blk.3.exp_probs_b.bias": (Q.F32, (8,))})
    assert _problems(wrong) == ["blk.3.exp_probs_b.bias: shape [8], expected [4]"]


def test_expert_groups_must_be_zero(tmp_path):
    p = H.write_tiny(tmp_path / "g.gguf", set_keys={P + "expert_group_count": (0, V.UINT32, None),
                                                     P + "expert_group_used_count": (2, V.UINT32, None)})
    assert _problems(p) == [f"{P}expert_group_used_count = 2: expert groups are not supported (must be 0)"]


def test_extra_tensors_are_ignored(tmp_path):
    p = H.write_tiny(tmp_path / "x.gguf", tensors={"blk.0.something_new.weight": (Q.F32, (4,))})
    assert _problems(p) == []


# ---- ds4 compatibility ----------------------------------------------------------------------
def test_real_constants_are_ds4_compatible():
    assert ds4_compat_problems(REAL) == []


def test_compat_names_each_difference(tiny):
    with GGUFFile(tiny) as f:
        args = ModelArgs.from_metadata(f.metadata)
    problems = ds4_compat_problems(args)
    assert f"{P}block_count = 4, ds4 expects 43" in problems
    assert f"{P}embedding_length = 256, ds4 expects 4096" in problems
    assert not any("compress_ratios" in p for p in problems)  # [0,0,4,128] is ds4's schedule for 4 layers
    assert not any("rope" in p or "epsilon" in p for p in problems)  # f32-rounded 1e-6 etc. are within 1e-6
    odd = dataclasses.replace(REAL, compress_ratios=(0, 4) + REAL.compress_ratios[2:], swiglu_clamp=(7.0,) * 43,
                              rms_eps=1e-5, expert_weights_norm=False)
    assert ds4_compat_problems(odd) == [
        f"{P}swiglu_clamp_exp differs from 10.0 at layers {list(range(43))}",
        f"{P}attention.layer_norm_rms_epsilon = 1e-05, ds4 expects 1e-06",
        f"{P}expert_weights_norm = False, ds4 expects True",
        f"{P}attention.compress_ratios differ from ds4's schedule (0 for L<2, then 4 on even, 128 on odd layers) "
        "at layers [1]",
    ]


# ---- workbench inspect ----------------------------------------------------------------------
def test_inspect_json(tiny, capsys):
    assert main(["inspect", str(tiny), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert set(r) == {"path", "version", "metadata", "tensors", "bytes_per_type", "expert_types", "kv_quant_bits",
                      "n_tensors", "file_bytes", "valid",
                      "problems", "ds4_compat"}
    assert r["path"] == str(tiny) and r["version"] == 3 and r["valid"] is True and r["problems"] == []
    assert r["file_bytes"] == tiny.stat().st_size
    assert r["n_tensors"] == len(r["tensors"]) == len(H.tiny_tensors())
    with GGUFFile(tiny) as f:
        assert [t["name"] for t in r["tensors"]] == list(f.tensors)
        assert r["bytes_per_type"] == {name: sum(t.nbytes for t in f.tensors.values() if t.type_name == name)
                                       for name in {t.type_name for t in f.tensors.values()}}
    emb = next(t for t in r["tensors"] if t["name"] == "token_embd.weight")
    assert emb["type"] == "F16" and emb["shape"] == [64, 256] and emb["nbytes"] == 64 * 256 * 2
    tokens = r["metadata"]["tokenizer.ggml.tokens"]
    assert tokens == {"type": "array[string]", "length": 64, "head": H.TOKENS[:8]}
    assert r["metadata"][P + "attention.compress_ratios"] == [0, 0, 4, 128]
    assert r["metadata"][P + "block_count"] == 4
    assert f"{P}block_count = 4, ds4 expects 43" in r["ds4_compat"]


def test_inspect_text(tiny, capsys):
    assert main(["inspect", str(tiny)]) == 0
    out = capsys.readouterr().out
    assert "ds4 layout: valid" in out
    assert "blk.3.ffn_down_exps.weight" in out and "Q2_K" in out
    assert "[64 x string]" in out and "<think>" in out
    assert "tok56" not in out  # the long token array is abbreviated


def test_inspect_invalid_exits_1_with_problems(tmp_path, capsys):
    p = H.write_tiny(tmp_path / "bad.gguf", drop_tensors=("output.weight",))
    assert main(["inspect", str(p), "--json"]) == 1
    r = json.loads(capsys.readouterr().out)
    assert r["valid"] is False and r["problems"] == ["missing tensor output.weight"] and r["ds4_compat"] is None
    assert main(["inspect", str(p)]) == 1
    out = capsys.readouterr().out
    assert "ds4 layout: 1 problem(s)" in out and "missing tensor output.weight" in out


def test_inspect_corrupt_file_is_one_line(tmp_path, capsys):
    p = tmp_path / "junk.gguf"
    p.write_bytes(b"GGUF" + b"\x02\0\0\0" + b"\0" * 16)
    assert main(["inspect", str(p), "--json"]) == 1
    cap = capsys.readouterr()
    assert cap.out == ""
    assert cap.err == f"workbench inspect: error: {p}: GGUF version 2 is not supported; only version 3 is\n"
