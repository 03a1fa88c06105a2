"""Model hyperparameters, read from a ds4 GGUF's ``deepseek4.*`` metadata.

Every dimension the model, the state layout and the KV format use comes from here, so a
tiny synthetic model and the real 43-layer one differ only in numbers. Which key fills
which field, and the sane range of each, is the table in :mod:`workbench.spec.keys`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from workbench.errors import WorkbenchError
from workbench.spec.keys import METADATA_KEYS, PREFIX


class ConfigError(WorkbenchError):
    """A required metadata key is missing, out of range or inconsistent."""


@dataclass(frozen=True)
class ModelArgs:
    """DeepSeek V4 Flash hyperparameters (names follow ds4; real values in comments)."""

    n_layer: int  # 43
    n_embd: int  # 4096
    n_vocab: int  # 129280
    n_head: int  # 64 query heads
    n_head_kv: int  # 1 (one shared K=V row)
    head_dim: int  # 512 (key_length == value_length)
    n_rot: int  # 64, the last dims of each head
    q_lora_rank: int  # 1024
    o_lora_rank: int  # 1024
    o_groups: int  # 8
    n_expert: int  # 256
    n_expert_used: int  # 6
    n_ff_exp: int  # 2048
    n_expert_shared: int  # 1
    n_hash_layer: int  # 3
    n_swa: int  # 128 raw sliding window
    idx_heads: int  # 64
    idx_dim: int  # 128
    idx_topk: int  # 512
    n_hc: int  # 4 hyper-connection streams
    sinkhorn_iters: int  # 20
    compress_ratios: tuple[int, ...]  # per layer: 0, 4 or 128
    swiglu_clamp: tuple[float, ...]  # per layer, 10.0
    rope_freq_base: float = 10000.0
    compress_rope_freq_base: float = 160000.0
    rope_scaling_factor: float = 16.0
    rope_orig_ctx: int = 65536
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    expert_weights_scale: float = 1.5
    rms_eps: float = 1e-6
    hc_eps: float = 1e-6
    expert_weights_norm: bool = True
    context_length: int = 1048576
    name: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    # ---- derived -------------------------------------------------------------
    def ratio(self, layer: int) -> int:
        """Compression ratio of a layer: 0 (raw only), 4 (with indexer) or 128."""
        return self.compress_ratios[layer]

    @property
    def hc_dim(self) -> int:
        return self.n_hc * self.n_embd

    @property
    def hc_mix(self) -> int:
        """Width of the HC projection output: pre (n_hc) + post (n_hc) + combine (n_hc²)."""
        return 2 * self.n_hc + self.n_hc * self.n_hc

    @property
    def n_nope(self) -> int:
        return self.head_dim - self.n_rot

    @classmethod
    def ds4(cls) -> "ModelArgs":
        """The real DeepSeek V4 Flash as ds4 compiles it in (its §0 constants)."""
        return cls(n_layer=43, n_embd=4096, n_vocab=129280, n_head=64, n_head_kv=1, head_dim=512, n_rot=64,
                   q_lora_rank=1024, o_lora_rank=1024, o_groups=8, n_expert=256, n_expert_used=6, n_ff_exp=2048,
                   n_expert_shared=1, n_hash_layer=3, n_swa=128, idx_heads=64, idx_dim=128, idx_topk=512, n_hc=4,
                   sinkhorn_iters=20, compress_ratios=ds4_ratio_schedule(43), swiglu_clamp=(10.0,) * 43,
                   name="DeepSeek-V4-Flash")

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], check: bool = True) -> "ModelArgs":
        """Build from GGUF metadata by iterating :data:`~workbench.spec.keys.METADATA_KEYS`;
        raise ConfigError naming every missing required key and, when ``check``, every
        range or consistency problem (:meth:`problems`)."""
        missing = [k.key for k in METADATA_KEYS if k.field and k.required and k.key not in meta]
        if missing:
            raise ConfigError("missing metadata: " + ", ".join(missing))
        block_count = meta[PREFIX + "block_count"]
        try:
            n_layer = int(block_count)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{PREFIX}block_count = {_short(block_count)} is not an integer") from None
        values: dict[str, Any] = {"name": str(meta.get("general.name", ""))}
        bad: list[str] = []
        for k in METADATA_KEYS:
            if k.field and k.key in meta:
                convert = _CONVERT[_FIELD_TYPES[k.field]]
                try:
                    values[k.field] = convert(meta[k.key], n_layer)
                except (TypeError, ValueError, OverflowError):
                    bad.append(f"{k.key} = {_short(meta[k.key])} is not {_KIND[_FIELD_TYPES[k.field]]}")
        if bad:
            raise ConfigError("; ".join(bad))
        built = cls(**values)
        problems = built.problems() if check else []
        if problems:
            raise ConfigError("; ".join(problems))
        return built

    def problems(self) -> list[str]:
        """Out-of-range values (the ranges of the key table) and internal-consistency
        problems (not the real model's constants: see ``gguf.layout.ds4_compat_problems``)."""
        p = [msg for k in METADATA_KEYS if k.field
             for msg in [k.range_problem(getattr(self, k.field))] if msg]
        if len(self.compress_ratios) < self.n_layer:
            p.append(f"{PREFIX}attention.compress_ratios has {len(self.compress_ratios)} entries, need {self.n_layer}")
        if len(self.swiglu_clamp) < self.n_layer:
            p.append(f"{PREFIX}swiglu_clamp_exp has {len(self.swiglu_clamp)} entries, need {self.n_layer}")
        for i, r in enumerate(self.compress_ratios):
            if r not in VALID_RATIOS:
                p.append(f"{PREFIX}attention.compress_ratios[{i}] = {r}, expected 0, 4 or 128")
        if self.n_hash_layer > self.n_layer:
            p.append(f"{PREFIX}hash_layer_count {self.n_hash_layer} > block_count {self.n_layer}")
        if self.n_expert_used > self.n_expert:
            p.append(f"{PREFIX}expert_used_count {self.n_expert_used} > expert_count {self.n_expert}")
        if self.n_rot > self.head_dim or self.n_rot % 2:
            p.append(f"{PREFIX}rope.dimension_count {self.n_rot} must be even and <= key_length {self.head_dim}")
        if self.n_nope % 64:
            p.append(f"key_length - rope dims = {self.n_nope} must be a multiple of 64 (FP8 blocks)")
        if self.idx_dim and self.idx_dim != 128 and 4 in self.compress_ratios:
            p.append(f"{PREFIX}attention.indexer.key_length {self.idx_dim} must be 128 (Hadamard-128)")
        if self.o_groups and self.n_head % self.o_groups:
            p.append(f"{PREFIX}attention.head_count {self.n_head} not divisible by output_group_count {self.o_groups}")
        return p


def _short(value: Any) -> str:
    """A metadata value for a one-line message (long values cut)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


VALID_RATIOS = (0, 4, 128)  # per-layer compression ratios ds4 knows


def ds4_ratio_schedule(n_layer: int) -> tuple[int, ...]:
    """ds4's layer schedule: layers 0-1 dense, then ratio 4 on even and 128 on odd layers."""
    return tuple(0 if L < 2 else (4 if L % 2 == 0 else 128) for L in range(n_layer))


# metadata value -> field value, by the field's declared type (per-layer lists cut to n_layer)
_CONVERT: dict[str, Callable[[Any, int], Any]] = {
    "int": lambda v, n: int(v),
    "float": lambda v, n: float(v),
    "bool": lambda v, n: bool(v),
    "tuple[int, ...]": lambda v, n: tuple(int(x) for x in list(v)[:n]),
    "tuple[float, ...]": lambda v, n: tuple(float(x) for x in list(v)[:n]),
}
_KIND = {"int": "an integer", "float": "a number", "bool": "a boolean", "tuple[int, ...]": "a list of integers",
         "tuple[float, ...]": "a list of numbers"}
_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(ModelArgs)}
