"""The ds4 model description (workbench/spec/): the metadata key table and its ranges, the
tensor table's three views, per-layer expert types, and the state layout's one shape function."""

from __future__ import annotations

import ast
import dataclasses
import math
from pathlib import Path

import pytest

from workbench.kv.dsv4 import PAYLOAD_HEADER_BYTES, payload_size
from workbench.spec.args import ConfigError, ModelArgs, ds4_ratio_schedule
from workbench.spec.ggml import F16, GGML_TYPES, IQ2_XXS, Q2_K, Q4_K, Q8_0
from workbench.spec.keys import BY_FIELD, METADATA_KEYS, PREFIX
from workbench.spec.statelayout import F32, StateLayout
from workbench.spec.tensors import (ROUTED_TYPES, ExpertTypes, Role, Where, expected_tensors, layer_rules,
                                    plan_tensors, uniform_experts)
from workbench.state import SessionState

REAL = ModelArgs.ds4()
SPEC_DIR = Path(__file__).resolve().parent.parent / "workbench" / "spec"


def _real_metadata() -> dict:
    meta = {k.key: getattr(REAL, k.value_field) for k in METADATA_KEYS if k.value_field}
    meta["general.name"] = REAL.name
    return {k: list(v) if isinstance(v, tuple) else v for k, v in meta.items()}


# ---- the layer imports nothing above it -----------------------------------------------------
def test_spec_imports_no_other_workbench_package():
    for path in SPEC_DIR.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("workbench"):
                assert node.module.startswith("workbench.spec") or node.module == "workbench.errors", \
                    f"{path.name} imports {node.module}"


# ---- metadata keys ---------------------------------------------------------------------------
def test_key_table_round_trips_the_real_model():
    assert ModelArgs.from_metadata(_real_metadata()) == REAL
    for k in METADATA_KEYS:
        if k.ds4 is not None and k.lo is not None:
            values = k.ds4 if isinstance(k.ds4, list) else [k.ds4]
            assert all(k.lo <= v <= k.hi for v in values), k.key  # ds4's own values are in range


def test_every_range_bound_is_enforced_with_one_line_naming_the_key():
    """For every ranged field: the bound itself is accepted, one step beyond is refused."""
    for k in METADATA_KEYS:
        if k.field is None or k.lo is None or k.field in ("swiglu_clamp", "n_layer"):
            continue  # per-layer arrays and their length: test_per_layer_array_entries_are_ranged
        is_int = isinstance(getattr(REAL, k.field), int)
        for bad in ([k.lo - 1, k.hi + 1] if is_int else [k.hi * 2, -1.0, math.nan]):
            meta = _real_metadata()
            meta[k.key] = bad
            with pytest.raises(ConfigError) as err:
                ModelArgs.from_metadata(meta)
            msg = str(err.value)
            assert k.key in msg and "\n" not in msg, (k.key, msg)


@pytest.mark.parametrize("key,value", [
    ("hyper_connection.sinkhorn_iterations", 0),
    ("attention.indexer.top_k", 0),
    ("vocab_size", 1 << 30),  # would size a 4 GiB logits vector
    ("embedding_length", 0),
    ("expert_count", 10**9),
])
def test_absurd_values_are_refused(key, value):
    meta = _real_metadata()
    meta[PREFIX + key] = value
    with pytest.raises(ConfigError, match=f"{PREFIX}{key} = {value}, must be in"):
        ModelArgs.from_metadata(meta)


@pytest.mark.parametrize("key,value,message", [
    ("block_count", "six", "block_count = 'six' is not an integer"),
    ("expert_count", [1, 2], "expert_count = [1, 2] is not an integer"),
    ("rope.freq_base", "x" * 100, "rope.freq_base = 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx... is not a number"),
    ("attention.compress_ratios", ["a"] * 43, "is not a list of integers"),
])
def test_values_of_the_wrong_kind_are_one_line_errors(key, value, message):
    """from_metadata runs before validation in some tools (kv show --model): a crafted
    value gives a ConfigError naming the key, not a traceback."""
    meta = _real_metadata()
    meta[PREFIX + key] = value
    with pytest.raises(ConfigError) as err:
        ModelArgs.from_metadata(meta)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_per_layer_array_entries_are_ranged():
    meta = _real_metadata()
    meta[PREFIX + "swiglu_clamp_exp"] = [10.0] * 42 + [math.inf]
    with pytest.raises(ConfigError, match=r"swiglu_clamp_exp\[42\] = inf"):
        ModelArgs.from_metadata(meta)


def test_every_model_args_field_but_name_has_a_key():
    fields = {f.name for f in dataclasses.fields(ModelArgs)} - {"name", "extra"}
    assert fields == set(BY_FIELD)


# ---- the tensor table ------------------------------------------------------------------------
def test_synth_plan_satisfies_the_validator_view():
    for args in (REAL, dataclasses.replace(REAL, n_layer=6, compress_ratios=ds4_ratio_schedule(6))):
        specs = expected_tensors(args)
        plan = plan_tensors(args, uniform_experts(ExpertTypes(IQ2_XXS, IQ2_XXS, Q2_K), args.n_layer))
        planned = {t.name: t for t in plan}
        assert {n for n, s in specs.items() if s.required} <= set(planned) <= set(specs)
        for name, t in planned.items():
            assert t.shape == specs[name].shape and t.ggml_type in specs[name].types, name
        # the optional router bias is written exactly on the score-routed layers
        assert sorted(n for n in planned if n.endswith("exp_probs_b.bias")) == \
            sorted(f"blk.{L}.exp_probs_b.bias" for L in range(args.n_hash_layer, args.n_layer))


def test_each_layer_carries_its_own_expert_types():
    """A mixed file: layers 37-42 Q4_K, the others IQ2_XXS/Q2_K (ds4's q2/q4 splice)."""
    q2, q4 = ExpertTypes(IQ2_XXS, IQ2_XXS, Q2_K), ExpertTypes(Q4_K, Q4_K, Q4_K)
    experts = tuple(q4 if L >= 37 else q2 for L in range(REAL.n_layer))
    types = {t.name: t.ggml_type for t in plan_tensors(REAL, experts)}
    assert types["blk.36.ffn_down_exps.weight"] == Q2_K and types["blk.37.ffn_down_exps.weight"] == Q4_K
    assert types["blk.42.ffn_gate_exps.weight"] == Q4_K and types["blk.0.ffn_up_exps.weight"] == IQ2_XXS
    with pytest.raises(ConfigError, match="blk.3.ffn_gate_exps.weight: F16 is not a routed expert type"):
        plan_tensors(REAL, tuple(ExpertTypes(F16, F16, Q2_K) if L == 3 else q2 for L in range(REAL.n_layer)))
    with pytest.raises(ConfigError, match="expert types for 2 layers, need 43"):
        plan_tensors(REAL, (q2, q2))


def test_loader_view_roles():
    rules = {r.name: r for r in layer_rules(REAL, 2)}  # a ratio-4 layer: every kind
    assert rules["attn_q_a.weight"].role is Role.MATRIX and rules["ffn_down_exps.weight"].role is Role.EXPERTS
    assert rules["indexer.proj.weight"].role is Role.FLOAT and rules["ffn_gate_tid2eid.weight"].role is Role.IDS
    assert "ffn_gate_tid2eid.weight" not in {r.name for r in layer_rules(REAL, 3)}
    assert [r.name for r in layer_rules(REAL, None, Where.HEAD)] == ["token_embd.weight"]
    assert layer_rules(REAL, None, Where.TAIL)[-1].name == "output.weight"
    # every fixed-type rule names one type, so the synthetic writer never has to choose
    for r in layer_rules(REAL, 2) + layer_rules(REAL, None):
        assert r.expert is not None or len(r.types) == 1, r.name
        assert r.expert is None or r.types == ROUTED_TYPES, r.name
    assert Q8_0 in rules["attn_kv.weight"].types


def test_block_sizes_come_from_gguf():
    import gguf
    for t in (Q8_0, Q2_K, Q4_K, IQ2_XXS):
        want = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t)]
        assert (GGML_TYPES[t].block_elems, GGML_TYPES[t].block_bytes) == want
    assert GGML_TYPES[39].name == "MXFP4"  # known without a table here


# ---- the state layout ------------------------------------------------------------------------
@pytest.mark.parametrize("T", [0, 1, 127, 128, 300, 2048])
def test_every_size_derives_from_layer_shapes(T):
    lay = StateLayout(n_layer=6, head_dim=128, idx_dim=128, n_vocab=1000, n_swa=128, ratios=(0, 0, 4, 128, 4, 128))
    by_kind = sum(r["bytes"] for r in lay.layer_bytes_at(T))
    by_shape = sum(F32 * rows * cols for L in range(lay.n_layer) for _, (rows, cols) in lay.layer_shapes(L, T))
    assert by_kind == by_shape == lay.kv_bytes(T)
    assert payload_size(lay, T) == PAYLOAD_HEADER_BYTES + 4 * T + F32 * 1000 + 8 * 6 + by_shape
    empty = SessionState.empty(lay, ctx=4096)
    assert empty.problems() == []
    assert empty.layer_bytes() == lay.layer_bytes_at(0)


def test_real_width_payload_is_ds4s_exact_size():
    """43 layers at ds4's widths: exactly 23,995,788 + 13,764·T bytes (T a multiple of 128)."""
    lay = StateLayout.ds4()
    for T in (128, 2048, 65536):
        assert payload_size(lay, T) == 23_995_788 + 13_764 * T
