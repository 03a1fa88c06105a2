"""Where a session's layers run: the layer stage of a :class:`~workbench.session.Session`.

A session owns a model, a state and one stage. The stage runs one chunk of tokens through
the layers this process holds and says which layers those are:

* :class:`LocalStage`: every layer here (embedding, all blocks, output head), the state is
  a whole :class:`~workbench.state.SessionState`;
* ``workbench.distributed.PipelineStage``: one rank of a pipeline over ``mx.distributed``,
  receive the hyper-connection streams → run this rank's layer range → send them on; the
  state holds only that range's KV.

The session's loops (prefill schedule, decode, checks, snapshot/restore validation) are
written once, against this protocol.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol

import mlx.core as mx

from workbench.spec.statelayout import StateLayout
from workbench.state import LayerState, SessionState

if TYPE_CHECKING:
    from workbench.spec.args import ModelArgs
    from workbench.model.model import Model

OnLayer = Callable[[int], None]  # called with the stage-local index of each block run


class LayerStage(Protocol):
    """What a session needs from the place its layers run.

    ``start``/``stop`` (half-open) are the layers this process holds (its state is a
    :class:`~workbench.state.SessionState` of that layer range); ``ranks`` is how many
    processes share the model (1 for a local stage); ``drives`` is True on the process whose
    program calls the session (a pipeline's rank 0; always for a local stage).
    """

    start: int
    stop: int
    ranks: int
    drives: bool

    def empty(self, layout: StateLayout, ctx: int, prefill_chunk: int) -> SessionState:
        """An empty state of this stage's layers."""

    def advance(self, model: Model, tokens: list[int], p0: int, layers: list[LayerState], on_layer: OnLayer | None,
                logits: bool) -> tuple[mx.array | None, list[LayerState]]:
        """Run ``tokens`` at positions ``p0..`` through this stage's layers (states ``layers``,
        not modified). Returns the next-token logits ``[n_vocab]`` float32 after the last token
        (None unless ``logits``, and None on processes that don't drive) and the new states."""

    def gather(self, state: SessionState) -> SessionState:
        """The whole state (every layer) from this stage's ``state`` (a copy, safe to keep)."""

    def scatter(self, state: SessionState) -> SessionState:
        """This stage's part of a whole, validated ``state`` (the other stages take theirs)."""

    def reset(self) -> None:
        """The other stages forget their tokens (this one's state is replaced by the caller)."""

    def close(self, error: str = "") -> None:
        """End the stage (``error``: why the driving program stops, for the other stages)."""


class LocalStage:
    """Every layer of the model in this process."""

    ranks = 1
    drives = True

    def __init__(self, n_layer: int) -> None:
        self.start, self.stop = 0, n_layer

    def empty(self, layout: StateLayout, ctx: int, prefill_chunk: int) -> SessionState:
        return SessionState.empty(layout, ctx, prefill_chunk)

    def advance(self, model: Model, tokens: list[int], p0: int, layers: list[LayerState], on_layer: OnLayer | None,
                logits: bool) -> tuple[mx.array | None, list[LayerState]]:
        return model(tokens, p0, layers, on_layer, logits)

    def gather(self, state: SessionState) -> SessionState:
        return state.copy()

    def scatter(self, state: SessionState) -> SessionState:
        return state

    def reset(self) -> None:
        pass

    def close(self, error: str = "") -> None:
        pass


StageFactory = Callable[["ModelArgs", int, int], LayerStage]  # (model args, ctx, prefill chunk) -> stage

__all__ = ["LayerStage", "LocalStage", "OnLayer", "StageFactory"]
