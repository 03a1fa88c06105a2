"""The one table of ds4's ``deepseek4.*`` metadata keys (ds4-architecture.md §1.2).

Reading (:meth:`ModelArgs.from_metadata <workbench.spec.args.ModelArgs.from_metadata>`),
validating (:mod:`workbench.gguf.layout`) and synthesizing (:mod:`workbench.synth`) all
iterate :data:`METADATA_KEYS`. Each row gives the GGUF value types ds4 accepts (the first
one is what the synthetic writer writes), the :class:`ModelArgs` field the key fills,
ds4's compiled-in value and a sane range: a value outside it is refused with one line
naming the key (an absurd count would otherwise size allocations of many GB).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gguf.constants import GGUFValueType as V

PREFIX = "deepseek4."

_U32 = (V.UINT32,)
_CTX = (V.UINT32, V.UINT64)
_REAL = (V.FLOAT32, V.FLOAT64, V.UINT32, V.INT32)

BIG = 1 << 20  # upper bound of widths and counts no real model comes near (ds4: 129,280 at most)


@dataclass(frozen=True)
class MetaKey:
    """One ``deepseek4.*`` key.

    ``types``: accepted GGUF value types, the first one written by the synthetic writer.
    ``field``: the :class:`ModelArgs` field it fills (None: checked, not kept).
    ``source``: the field whose value the synthetic writer writes (defaults to ``field``;
    None with no field: ``ds4`` is written). ``ds4``: ds4's compiled-in value (per entry
    for per-layer arrays; None: no single value). ``lo``/``hi``: inclusive sane range of
    the value (of every entry for arrays; None: no range, e.g. the ratio list, checked by
    value). ``shapes``: tensor shapes depend on it. ``required``: a ds4 file must have it.
    ``why``: the reason shown when the value is out of range, if not the range itself.
    """

    key: str
    types: tuple[Any, ...]
    field: str | None
    ds4: Any
    lo: float | None
    hi: float | None
    shapes: bool = False
    required: bool = True
    source: str | None = None
    why: str = ""

    @property
    def write_type(self) -> Any:
        """The GGUF value type the synthetic writer uses (``(ARRAY, item)`` for arrays)."""
        return self.types[0]

    @property
    def value_field(self) -> str | None:
        """The ModelArgs field whose value this key holds (``field`` or ``source``)."""
        return self.field or self.source

    @property
    def range_text(self) -> str:
        """``"1..1024"``: the sane range as shown in messages ("" when unranged)."""
        return "" if self.lo is None or self.hi is None else f"{_num(self.lo)}..{_num(self.hi)}"

    def range_problem(self, value: Any) -> str | None:
        """One line naming the key when ``value`` (or an array entry) is out of range."""
        if self.lo is None or self.hi is None:
            return None
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        for i, v in enumerate(items):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (self.lo <= v <= self.hi):
                where = f"{self.key}[{i}]" if isinstance(value, (list, tuple)) else self.key
                if self.why:
                    return f"{where} = {v!r}: {self.why}"
                return f"{where} = {v!r}, must be in {self.range_text}"
        return None


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def _k(suffix: str, types: tuple[Any, ...], field: str | None, ds4: Any, lo: float | None, hi: float | None,
       **kw: Any) -> MetaKey:
    return MetaKey(PREFIX + suffix, types, field, ds4, lo, hi, **kw)


_TINY = 1e-12  # lower bound of quantities that must be > 0 (epsilons, frequencies)

METADATA_KEYS: tuple[MetaKey, ...] = (
    _k("block_count", _U32, "n_layer", 43, 1, 1024, shapes=True),
    _k("context_length", _CTX, "context_length", None, 1, 1 << 24, required=False),
    _k("embedding_length", _U32, "n_embd", 4096, 1, 65536, shapes=True),
    _k("vocab_size", _U32, "n_vocab", 129280, 1, 1 << 24, shapes=True),
    _k("attention.head_count", _U32, "n_head", 64, 1, 4096, shapes=True),
    _k("attention.head_count_kv", _U32, "n_head_kv", 1, 1, 4096),
    _k("attention.key_length", _U32, "head_dim", 512, 1, 65536, shapes=True),
    _k("attention.value_length", _U32, None, 512, 1, 65536, source="head_dim"),
    _k("rope.dimension_count", _U32, "n_rot", 64, 0, 65536),
    _k("attention.q_lora_rank", _U32, "q_lora_rank", 1024, 1, 65536, shapes=True),
    _k("attention.output_lora_rank", _U32, "o_lora_rank", 1024, 1, 65536, shapes=True),
    _k("attention.output_group_count", _U32, "o_groups", 8, 1, 4096, shapes=True),
    _k("expert_count", _U32, "n_expert", 256, 1, 65536, shapes=True),
    _k("expert_used_count", _U32, "n_expert_used", 6, 1, 65536, shapes=True),
    _k("expert_feed_forward_length", _U32, "n_ff_exp", 2048, 1, BIG, shapes=True),
    _k("expert_shared_count", _U32, "n_expert_shared", 1, 1, 64, shapes=True),
    _k("hash_layer_count", _U32, "n_hash_layer", 3, 0, 1024, shapes=True),
    _k("expert_group_count", _U32, None, 0, 0, 0, required=False,
       why="expert groups are not supported (must be 0)"),
    _k("expert_group_used_count", _U32, None, 0, 0, 0, required=False,
       why="expert groups are not supported (must be 0)"),
    _k("attention.sliding_window", _U32, "n_swa", 128, 1, BIG),
    _k("attention.indexer.head_count", _U32, "idx_heads", 64, 1, 4096, shapes=True),
    _k("attention.indexer.key_length", _U32, "idx_dim", 128, 1, 65536, shapes=True),
    _k("attention.indexer.top_k", _U32, "idx_topk", 512, 1, BIG),
    _k("hyper_connection.count", _U32, "n_hc", 4, 1, 64, shapes=True),
    _k("hyper_connection.sinkhorn_iterations", _U32, "sinkhorn_iters", 20, 1, 1000),
    _k("attention.compress_ratios", ((V.ARRAY, V.UINT32), (V.ARRAY, V.INT32)), "compress_ratios", None,
       None, None, shapes=True),
    _k("swiglu_clamp_exp", ((V.ARRAY, V.FLOAT32), (V.ARRAY, V.FLOAT64)), "swiglu_clamp", 10.0, _TINY, 1e6),
    _k("rope.scaling.original_context_length", _CTX, "rope_orig_ctx", 65536, 1, 1 << 24),
    _k("rope.freq_base", _REAL, "rope_freq_base", 10000.0, _TINY, 1e12),
    _k("rope.scaling.factor", _REAL, "rope_scaling_factor", 16.0, _TINY, 1e6),
    _k("rope.scaling.yarn_beta_fast", _REAL, "yarn_beta_fast", 32.0, 0, 1e6),
    _k("rope.scaling.yarn_beta_slow", _REAL, "yarn_beta_slow", 1.0, 0, 1e6),
    _k("attention.compress_rope_freq_base", _REAL, "compress_rope_freq_base", 160000.0, _TINY, 1e12),
    _k("expert_weights_scale", _REAL, "expert_weights_scale", 1.5, 0, 1e6),
    _k("attention.layer_norm_rms_epsilon", _REAL, "rms_eps", 1e-6, _TINY, 1.0),
    _k("hyper_connection.epsilon", _REAL, "hc_eps", 1e-6, _TINY, 1.0),
    _k("expert_weights_norm", (V.BOOL,), "expert_weights_norm", True, None, None),
)
BY_KEY: dict[str, MetaKey] = {k.key: k for k in METADATA_KEYS}
BY_FIELD: dict[str, MetaKey] = {k.field: k for k in METADATA_KEYS if k.field}

