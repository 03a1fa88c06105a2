"""The one table of ds4's tensors (ds4-architecture.md §1.3), in file order.

Each :class:`TensorRule` gives a tensor's name, which layers hold it, its logical shape
from :class:`~workbench.spec.args.ModelArgs` and the layer's compression ratio, the ggml
types allowed, how the weight loader keeps it (:class:`Role`) and how the synthetic
writer fills it (a :data:`Fill` from the args). Three views read the table:

* :func:`expected_tensors` — the validator's: name -> allowed types, shape, required.
* :func:`plan_tensors` — the synthetic writer's: every tensor with one type and a fill.
* :func:`layer_rules` — the loader's: the rules of one layer (or the globals).

Routed experts carry their types per layer: the validator allows any of
:data:`ROUTED_TYPES` (gate and up agreeing within a layer), and a synthetic model names
one :class:`ExpertTypes` per layer, so mixed files (e.g. some layers Q4_K, the rest
IQ2_XXS/Q2_K) are described without special cases; a new expert format is one more entry
in :data:`ROUTED_TYPES` (and a decoder and a block filler where those live).

Shapes (logical, ``[out, in]``; GGUF dims reversed): hc_dim = n_hc*n_embd,
mix = 2*n_hc + n_hc², q_dim = n_head*head_dim, the grouped output projection
o_groups*o_lora_rank x q_dim/o_groups, compressors coff*width (coff = 2 for ratio 4,
else 1), indexer tensors on ratio-4 layers only, tid2eid on the first hash_layer_count
layers only, ``exp_probs_b.bias`` optional everywhere (written on the other layers).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence, Union

from workbench.spec.args import ConfigError, ModelArgs
from workbench.spec.ggml import F16, F32, GGML_TYPES, I32, IQ2_XXS, MXFP4, Q2_K, Q4_K, Q8_0, row_bytes, type_names

# routed experts, per layer (ds4's files: IQ2_XXS gate/up + Q2_K down, Q4_K, MXFP4; ds4 also
# accepts Q8_0); gate and up share one type within a layer
ROUTED_TYPES = frozenset({IQ2_XXS, Q2_K, Q4_K, MXFP4, Q8_0})
HC_SCALES = 3  # hc_*_scale: pre, post and combine scales


class ExpertTypes(NamedTuple):
    """ggml types of one layer's routed experts (``ffn_gate_exps``, ``ffn_up_exps``,
    ``ffn_down_exps``)."""

    gate: int
    up: int
    down: int


# ---- fill rules: what a synthetic file holds ------------------------------------------------
@dataclass(frozen=True)
class Noise:
    """Independent values with mean ``mean`` and standard deviation ``std`` (uniform for
    float tensors; block-structured with expected mean 0 for quantized ones)."""

    std: float
    mean: float = 0.0


@dataclass(frozen=True)
class HCBase:
    """An HC bias vector. ``combine=True``: a sublayer's [2·n_hc + n_hc²] base (pre, post,
    combine); ``False``: the output head's [n_hc] base (pre only). Pre biases give
    sigmoid ≈ 1/n_hc, post biases 2·sigmoid ≈ 1, the combine bias is 2 on the diagonal."""

    n_hc: int
    combine: bool
    jitter: float = 0.1


@dataclass(frozen=True)
class ExpertIds:
    """``tid2eid`` rows: for each token id, distinct random expert ids in [0, n_expert)."""

    n_expert: int


Fill = Union[Noise, HCBase, ExpertIds]


def _linear(fan_in: int) -> Noise:
    """A projection that roughly preserves the RMS of a unit-RMS input."""
    return Noise(1.0 / math.sqrt(fan_in))


def _gate(fan_in: int) -> Noise:
    """Gates and routers: small enough that their softmax is not degenerate."""
    return Noise(0.5 / math.sqrt(fan_in))


NORM = Noise(0.05, 1.0)
HC_SCALE = Noise(0.1, 1.0)


# ---- the table --------------------------------------------------------------------------------
class Where(enum.Enum):
    """Which part of the file holds a tensor."""

    HEAD = "head"  # global, before the layers
    TAIL = "tail"  # global, after the layers
    EVERY = "every layer"
    COMPRESSED = "ratio > 0 layers"
    INDEXED = "ratio-4 layers"
    HASHED = "the first hash_layer_count layers"
    SCORED = "the other layers"

    def holds(self, args: ModelArgs, layer: int) -> bool:
        """Whether layer ``layer`` holds tensors of this kind (globals: never)."""
        r = args.compress_ratios[layer]
        return {Where.EVERY: True, Where.COMPRESSED: r > 0, Where.INDEXED: r == 4,
                Where.HASHED: layer < args.n_hash_layer, Where.SCORED: layer >= args.n_hash_layer
                }.get(self, False)


class Role(enum.Enum):
    """How the weight loader keeps a tensor."""

    EMBEDDING = "embedding"  # a zero-copy view of the file, read row by row
    MATRIX = "matrix"  # a 2-D projection: Q8_0 converted to affine 8-bit, else float32
    FLOAT = "float"  # widened to float32 (norms, HC, compressors, indexer, router, biases)
    IDS = "ids"  # an int32 table
    EXPERTS = "experts"  # 3-D routed experts, left quantized in the mapped file


Shape = Callable[[ModelArgs, int], tuple[int, ...]]  # (args, compression ratio) -> logical shape


@dataclass(frozen=True)
class TensorRule:
    """One kind of tensor. ``name`` is the full name of a global and the suffix after
    ``blk.L.`` of a per-layer tensor. ``types``: allowed ggml types (routed experts:
    :data:`ROUTED_TYPES`, ``expert`` their index in :class:`ExpertTypes`); the synthetic
    writer uses the only one of a fixed set. ``written``: where the synthetic writer puts
    an optional tensor (default: wherever it may be)."""

    name: str
    where: Where
    types: frozenset[int]
    shape: Shape
    role: Role
    fill: Callable[[ModelArgs], Fill]
    required: bool = True
    expert: int | None = None
    written: Where | None = None

    def full_name(self, layer: int | None) -> str:
        """``blk.{layer}.{name}`` for a per-layer rule, ``name`` for a global one."""
        return self.name if layer is None else f"blk.{layer}.{self.name}"


def _coff(r: int) -> int:
    return 2 if r == 4 else 1


def _q_dim(a: ModelArgs) -> int:
    return a.n_head * a.head_dim


def _o_in(a: ModelArgs) -> int:
    return _q_dim(a) // a.o_groups if a.o_groups else 0


def _shared_ff(a: ModelArgs) -> int:
    return a.n_ff_exp * a.n_expert_shared


def _hc_fn(a: ModelArgs) -> Noise:
    return Noise(0.5 / math.sqrt(a.hc_dim))  # HC mix values of std ~0.5


_F16, _F32, _Q8, _I32 = (frozenset({t}) for t in (F16, F32, Q8_0, I32))
R = TensorRule
H, T, E, C, X = Where.HEAD, Where.TAIL, Where.EVERY, Where.COMPRESSED, Where.INDEXED
FL, MAT = Role.FLOAT, Role.MATRIX


def _hc_rules(prefix: str) -> list[TensorRule]:
    return [
        R(f"{prefix}_fn.weight", E, _F16, lambda a, r: (a.hc_mix, a.hc_dim), FL, _hc_fn),
        R(f"{prefix}_scale.weight", E, _F32, lambda a, r: (HC_SCALES,), FL, lambda a: HC_SCALE),
        R(f"{prefix}_base.weight", E, _F32, lambda a, r: (a.hc_mix,), FL, lambda a: HCBase(a.n_hc, combine=True)),
    ]


def _compressor_rules(prefix: str, where: Where, width: Callable[[ModelArgs], int]) -> list[TensorRule]:
    return [
        R(f"{prefix}_ape.weight", where, _F16, lambda a, r: (r, _coff(r) * width(a)), FL, lambda a: Noise(0.2)),
        R(f"{prefix}_kv.weight", where, _F16, lambda a, r: (_coff(r) * width(a), a.n_embd), FL,
          lambda a: _linear(a.n_embd)),
        R(f"{prefix}_gate.weight", where, _F16, lambda a, r: (_coff(r) * width(a), a.n_embd), FL,
          lambda a: _gate(a.n_embd)),
        R(f"{prefix}_norm.weight", where, _F32, lambda a, r: (width(a),), FL, lambda a: NORM),
    ]


TENSORS: tuple[TensorRule, ...] = (
    R("token_embd.weight", H, _F16, lambda a, r: (a.n_vocab, a.n_embd), Role.EMBEDDING, lambda a: Noise(1.0)),
    *_hc_rules("hc_attn"),
    R("attn_norm.weight", E, _F32, lambda a, r: (a.n_embd,), FL, lambda a: NORM),
    R("attn_q_a.weight", E, _Q8, lambda a, r: (a.q_lora_rank, a.n_embd), MAT, lambda a: _linear(a.n_embd)),
    R("attn_q_a_norm.weight", E, _F32, lambda a, r: (a.q_lora_rank,), FL, lambda a: NORM),
    R("attn_q_b.weight", E, _Q8, lambda a, r: (_q_dim(a), a.q_lora_rank), MAT, lambda a: _linear(a.q_lora_rank)),
    R("attn_kv.weight", E, _Q8, lambda a, r: (a.head_dim, a.n_embd), MAT, lambda a: _linear(a.n_embd)),
    R("attn_kv_a_norm.weight", E, _F32, lambda a, r: (a.head_dim,), FL, lambda a: NORM),
    R("attn_sinks.weight", E, _F32, lambda a, r: (a.n_head,), FL, lambda a: Noise(0.1)),
    R("attn_output_a.weight", E, _Q8, lambda a, r: (a.o_groups * a.o_lora_rank, _o_in(a)), MAT,
      lambda a: _linear(_o_in(a))),
    R("attn_output_b.weight", E, _Q8, lambda a, r: (a.n_embd, a.o_groups * a.o_lora_rank), MAT,
      lambda a: _linear(a.o_groups * a.o_lora_rank)),
    *_compressor_rules("attn_compressor", C, lambda a: a.head_dim),
    R("indexer.attn_q_b.weight", X, _F16, lambda a, r: (a.idx_heads * a.idx_dim, a.q_lora_rank), FL,
      lambda a: _linear(a.q_lora_rank)),
    R("indexer.proj.weight", X, _F16, lambda a, r: (a.idx_heads, a.n_embd), FL, lambda a: _linear(a.n_embd)),
    *_compressor_rules("indexer_compressor", X, lambda a: a.idx_dim),
    *_hc_rules("hc_ffn"),
    R("ffn_norm.weight", E, _F32, lambda a, r: (a.n_embd,), FL, lambda a: NORM),
    R("ffn_gate_inp.weight", E, _F16, lambda a, r: (a.n_expert, a.n_embd), FL, lambda a: _gate(a.n_embd)),
    R("exp_probs_b.bias", E, _F32, lambda a, r: (a.n_expert,), FL, lambda a: Noise(0.01), required=False,
      written=Where.SCORED),
    R("ffn_gate_tid2eid.weight", Where.HASHED, _I32, lambda a, r: (a.n_vocab, a.n_expert_used), Role.IDS,
      lambda a: ExpertIds(a.n_expert)),
    R("ffn_gate_exps.weight", E, ROUTED_TYPES, lambda a, r: (a.n_expert, a.n_ff_exp, a.n_embd), Role.EXPERTS,
      lambda a: _linear(a.n_embd), expert=0),
    R("ffn_up_exps.weight", E, ROUTED_TYPES, lambda a, r: (a.n_expert, a.n_ff_exp, a.n_embd), Role.EXPERTS,
      lambda a: _linear(a.n_embd), expert=1),
    R("ffn_down_exps.weight", E, ROUTED_TYPES, lambda a, r: (a.n_expert, a.n_embd, a.n_ff_exp), Role.EXPERTS,
      lambda a: _linear(a.n_ff_exp), expert=2),
    R("ffn_gate_shexp.weight", E, _Q8, lambda a, r: (_shared_ff(a), a.n_embd), MAT, lambda a: _linear(a.n_embd)),
    R("ffn_up_shexp.weight", E, _Q8, lambda a, r: (_shared_ff(a), a.n_embd), MAT, lambda a: _linear(a.n_embd)),
    R("ffn_down_shexp.weight", E, _Q8, lambda a, r: (a.n_embd, _shared_ff(a)), MAT,
      lambda a: _linear(_shared_ff(a))),
    R("output_hc_fn.weight", T, _F16, lambda a, r: (a.n_hc, a.hc_dim), FL, _hc_fn),
    R("output_hc_scale.weight", T, _F32, lambda a, r: (1,), FL, lambda a: HC_SCALE),
    R("output_hc_base.weight", T, _F32, lambda a, r: (a.n_hc,), FL, lambda a: HCBase(a.n_hc, combine=False)),
    R("output_norm.weight", T, _F32, lambda a, r: (a.n_embd,), FL, lambda a: NORM),
    R("output.weight", T, _Q8, lambda a, r: (a.n_vocab, a.n_embd), MAT, lambda a: _linear(a.n_embd)),
)
BY_NAME: dict[str, TensorRule] = {rule.name: rule for rule in TENSORS}


def layer_rules(args: ModelArgs, layer: int | None, where: Where | None = None) -> list[TensorRule]:
    """The rules of layer ``layer`` in file order, or with ``layer`` None the globals of
    ``where`` (:attr:`Where.HEAD` or :attr:`Where.TAIL`; None: both)."""
    if layer is None:
        return [t for t in TENSORS if t.where in ((where,) if where else (Where.HEAD, Where.TAIL))]
    return [t for t in TENSORS if t.where.holds(args, layer)]


def _file_order(args: ModelArgs) -> list[tuple[TensorRule, int | None]]:
    return ([(t, None) for t in layer_rules(args, None, Where.HEAD)]
            + [(t, L) for L in range(args.n_layer) for t in layer_rules(args, L)]
            + [(t, None) for t in layer_rules(args, None, Where.TAIL)])


def tensor_shape(rule: TensorRule, args: ModelArgs, layer: int | None) -> tuple[int, ...]:
    """The logical row-major shape of ``rule``'s tensor in ``layer`` (None: a global)."""
    r = 0 if layer is None else args.compress_ratios[layer]
    return tuple(int(s) for s in rule.shape(args, r))


# ---- the validator's view ---------------------------------------------------------------------
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


def expected_tensors(args: ModelArgs, gate_type: int | None = None) -> dict[str, TensorSpec]:
    """Every tensor of a ds4 file for ``args``: name -> spec, globals first, then per layer.

    Routed experts may be any of :data:`ROUTED_TYPES`; ``gate_type`` (one of those) pins
    the gate and up experts of every layer to that type.
    """
    if gate_type is not None and gate_type not in ROUTED_TYPES:
        raise ConfigError(f"routed expert type {GGML_TYPES[gate_type].name if gate_type in GGML_TYPES else gate_type}"
                          f" is not one of {type_names(ROUTED_TYPES)}")
    specs: dict[str, TensorSpec] = {}
    order = [(t, None) for t in layer_rules(args, None)] + [(t, L) for L in range(args.n_layer)
                                                            for t in layer_rules(args, L)]
    for rule, L in order:
        types = rule.types
        if gate_type is not None and rule.expert in (0, 1):
            types = frozenset({gate_type})
        specs[rule.full_name(L)] = TensorSpec(types, tensor_shape(rule, args, L), rule.required)
    return specs


# ---- the synthetic writer's view --------------------------------------------------------------
@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of a synthetic file: ``shape`` is the logical row-major shape (GGUF dims
    reversed), ``fill`` how its values are drawn."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    fill: Fill

    @property
    def dims(self) -> tuple[int, ...]:
        """GGUF dim order (``dims[0]`` fastest)."""
        return tuple(reversed(self.shape))

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Data size in bytes (rows must hold whole quant blocks)."""
        return row_bytes(self.ggml_type, self.shape[-1]) * math.prod(self.shape[:-1])


def uniform_experts(types: ExpertTypes, n_layer: int) -> tuple[ExpertTypes, ...]:
    """The same routed-expert types on every layer."""
    return (types,) * n_layer


def plan_tensors(args: ModelArgs, experts: Sequence[ExpertTypes]) -> list[PlannedTensor]:
    """Every tensor a synthetic file for ``args`` holds, in file order; ``experts[L]`` gives
    layer L's routed-expert types (each must be one of :data:`ROUTED_TYPES`)."""
    if len(experts) < args.n_layer:
        raise ConfigError(f"expert types for {len(experts)} layers, need {args.n_layer}")
    plan = []
    for rule, L in _file_order(args):
        if L is not None and rule.written is not None and not rule.written.holds(args, L):
            continue
        if rule.expert is not None:
            assert L is not None
            ggml_type = experts[L][rule.expert]
            if ggml_type not in rule.types:
                raise ConfigError(f"{rule.full_name(L)}: {GGML_TYPES[ggml_type].name} is not a routed expert "
                                  f"type ({type_names(ROUTED_TYPES)})")
        else:
            (ggml_type,) = rule.types
        plan.append(PlannedTensor(rule.full_name(L), tensor_shape(rule, args, L), ggml_type, rule.fill(args)))
    return plan
