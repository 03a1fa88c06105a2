"""Next-token sampling from logits: greedy, or temperature with top-k, top-p and min-p.

ds4's defaults: temperature 1.0, top_p 1.0, min_p 0.05 (relative to the top token's
probability); temperature <= 0 means greedy. Filters apply in the order top-k, min-p,
top-p, on float64 probabilities; draws come from a seeded NumPy generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from workbench.errors import WorkbenchError


class SamplingError(WorkbenchError):
    """Invalid sampling parameters."""


def _np(logits: mx.array | np.ndarray) -> np.ndarray:
    return np.asarray(logits, dtype=np.float64).reshape(-1)


def greedy(logits: mx.array | np.ndarray) -> int:
    """The argmax token (lowest id on ties)."""
    return int(np.argmax(_np(logits)))


def log_softmax(logits: mx.array | np.ndarray) -> np.ndarray:
    """float64 log-probabilities ``[n_vocab]``."""
    x = _np(logits)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


def top_tokens(logits: mx.array | np.ndarray, k: int = 5) -> list[tuple[int, float]]:
    """The k most likely tokens as ``(id, probability)``, most likely first (ties: lower id)."""
    lp = log_softmax(logits)
    ids = np.lexsort((np.arange(lp.size), -lp))[:k]
    return [(int(i), float(np.exp(lp[i]))) for i in ids]


@dataclass
class Sampler:
    """A seeded sampler; call it on next-token logits ``[n_vocab]`` to get a token id.

    ``top_k`` 0 disables it; ``top_p`` 1.0 and ``min_p`` 0.0 disable theirs.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    min_p: float = 0.05
    top_k: int = 0
    seed: int | None = None
    _rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature):
            raise SamplingError(f"temperature must be a finite number, got {self.temperature}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise SamplingError(f"seed must be in 0..2^64-1, got {self.seed}")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise SamplingError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.top_k < 0:
            raise SamplingError(f"top_k must be >= 0, got {self.top_k}")
        self._rng = np.random.default_rng(self.seed)

    @property
    def is_greedy(self) -> bool:
        return self.temperature <= 0.0

    def probabilities(self, logits: mx.array | np.ndarray) -> np.ndarray:
        """The filtered, renormalised distribution ``[n_vocab]`` float64 it samples from."""
        x = _np(logits)
        if self.is_greedy:
            p = np.zeros_like(x)
            p[int(np.argmax(x))] = 1.0
            return p
        z = (x - x.max()) / self.temperature  # <= 0: a tiny temperature gives 0s, not inf - inf
        p = np.exp(z)
        p /= p.sum()
        keep = np.ones(p.size, dtype=bool)
        if self.top_k and self.top_k < p.size:
            order = np.lexsort((np.arange(p.size), -p))
            keep[order[self.top_k :]] = False
        if self.min_p > 0.0:
            keep &= p >= self.min_p * p.max()
        if self.top_p < 1.0:
            q = np.where(keep, p, 0.0)
            order = np.lexsort((np.arange(q.size), -q))
            csum = np.cumsum(q[order]) / q.sum()
            n_keep = int(np.searchsorted(csum, self.top_p) + 1)
            cut = np.zeros(q.size, dtype=bool)
            cut[order[:n_keep]] = True
            keep &= cut
        p = np.where(keep, p, 0.0)
        return p / p.sum()

    def __call__(self, logits: mx.array | np.ndarray) -> int:
        if self.is_greedy:
            return greedy(logits)
        p = self.probabilities(logits)
        return int(self._rng.choice(p.size, p=p))
