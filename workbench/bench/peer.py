"""The peer implementation for prefill: ``nano-deepseek-v4`` (PyTorch, CPU), the same
architecture at an equal config with random weights.

What differs from the workbench, so the ratio is read correctly (see :data:`DIFFERENCES`):
its weights are dense float32 (no quantized experts or Q8_0), it does no QAT simulation,
it keeps every raw row and masks to the window, its indexer scores every compressed row,
it has no YaRN scaling, and its logits would cover every position, so only the hidden
states are run per chunk and the head is applied to the last token, as the workbench does.
"""

from __future__ import annotations

import time
from typing import Any

from workbench.bench.core import BenchError
from workbench.spec.args import ModelArgs
from workbench.session import chunk_schedule

DIFFERENCES = (
    "weights dense float32 in memory (workbench: IQ2_XXS/Q2_K experts dequantized per chunk, Q8_0 as MLX affine)",
    "no QAT simulation (workbench: FP8 KV rows, Hadamard + FP4 indexer rows)",
    "raw KV cache keeps every past row, masked to the 128-row window (workbench: the window only)",
    "indexer scores every compressed row for every query (workbench: only once more than top-k are visible)",
    "RoPE without YaRN scaling on compressed layers",
    "MoE loops over every expert with boolean masks",
    "logits: only the hidden states run per chunk, the head is applied to the last token (as the workbench)",
)


class PeerUnavailable(BenchError):
    """nano-deepseek-v4 or PyTorch is missing, or its config cannot match the model's."""


def nano_config(args: ModelArgs) -> Any:
    """A ``DeepSeekV4Config`` equal to ``args`` (raises PeerUnavailable when it cannot be)."""
    try:
        from nano_deepseek_v4 import DeepSeekV4Config
    except ImportError as err:
        raise PeerUnavailable(f"nano-deepseek-v4 is not installed ({err.name} missing)") from None
    if len(set(args.swiglu_clamp)) != 1:
        raise PeerUnavailable("per-layer SwiGLU clamps differ; nano-deepseek-v4 takes one")
    try:
        return DeepSeekV4Config(
            vocab_size=args.n_vocab, hidden_size=args.n_embd, moe_intermediate_size=args.n_ff_exp,
            num_hidden_layers=args.n_layer, num_attention_heads=args.n_head, num_key_value_heads=args.n_head_kv,
            head_dim=args.head_dim, q_lora_rank=args.q_lora_rank, num_experts_per_tok=args.n_expert_used,
            n_routed_experts=args.n_expert, n_shared_experts=args.n_expert_shared,
            routed_scaling_factor=args.expert_weights_scale, max_position_embeddings=args.context_length,
            rope_theta=args.rope_freq_base, compress_rope_theta=args.compress_rope_freq_base,
            partial_rotary_factor=args.n_rot / args.head_dim, compress_ratios=list(args.compress_ratios),
            num_hash_layers=args.n_hash_layer, hc_mult=args.n_hc, hc_sinkhorn_iters=args.sinkhorn_iters,
            hc_eps=args.hc_eps, sliding_window=args.n_swa, o_groups=args.o_groups, o_lora_rank=args.o_lora_rank,
            index_n_heads=args.idx_heads, index_head_dim=args.idx_dim, index_topk=args.idx_topk,
            swiglu_limit=args.swiglu_clamp[0], num_nextn_predict_layers=0, rms_norm_eps=args.rms_eps,
            norm_topk_prob=args.expert_weights_norm)
    except ValueError as err:
        raise PeerUnavailable(f"nano-deepseek-v4 cannot take this config: {err}") from None


class NanoPeer:
    """A randomly initialised nano-deepseek-v4 model of the same config (seed 0)."""

    def __init__(self, args: ModelArgs) -> None:
        config = nano_config(args)
        import torch
        from nano_deepseek_v4 import DeepSeekV4ForCausalLM

        torch.manual_seed(0)
        self.torch = torch
        self.model = DeepSeekV4ForCausalLM(config).eval()

    @property
    def threads(self) -> int:
        return self.torch.get_num_threads()

    def prefill(self, tokens: list[int], chunk: int) -> float:
        """Seconds to prefill ``tokens`` from empty in chunks ending on multiples of
        ``chunk`` (the workbench's schedule), ending with the last token's logits."""
        torch = self.torch
        ids = torch.tensor([tokens], dtype=torch.long)
        with torch.inference_mode():
            t0 = time.perf_counter()
            cache = hidden = None
            for a, b in chunk_schedule(0, len(tokens), chunk):
                hidden, _, cache = self.model.model(input_ids=ids[:, a:b], past_key_values=cache, use_cache=True)
            self.model.lm_head(hidden[:, -1])
            return time.perf_counter() - t0
