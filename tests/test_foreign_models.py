"""Models the workbench did not build: ds4-layout GGUFs written here with ``gguf.GGUFWriter``
(not workbench.synth or workbench.gguf.writer), tensors in a shuffled order, routed experts
of today's formats: MXFP4 experts (the ``ds4f-mxfp4`` file), mixed q2/q4 layers (the
``ds4f-q2-q4`` file: IQ2_XXS gate/up + Q2_K down, the last layer Q4_K), Q8_0 experts.

Acceptance (issue 11): next-token logits within 1e-3 of the independent float64 reference
(tests/npref.py, gguf-py's dequantizers) with the same argmax, after a prefill and after a
decode step (one row per expert: the native MLX quantized-matmul path for MXFP4 and Q8_0).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from workbench import session
from workbench.commands.inspect import report
from workbench.gguf.layout import routed_quant_bits
from workbench.gguf.reader import GGUFFile

sys.path.insert(0, str(Path(__file__).parent))
import npref  # noqa: E402
from ds4gguf import ds4_tensors, write_ds4_gguf  # noqa: E402

CFG = dict(n_layer=4, n_embd=256, n_vocab=300, n_head=2, head_dim=128, n_rot=64, q_lora=64, o_lora=32,
           o_groups=2, n_expert=4, n_used=2, n_ff=256, n_hash=2, n_swa=16, idx_heads=2, idx_dim=128,
           idx_topk=4, ratios=[0, 0, 4, 128])
SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>",
            "</think>", "｜DSML｜"]
Q2, Q4, MX, Q8 = (QT.IQ2_XXS, QT.IQ2_XXS, QT.Q2_K), (QT.Q4_K,) * 3, (QT.MXFP4,) * 3, (QT.Q8_0,) * 3


def write_foreign_gguf(path: Path, experts: list[tuple[QT, QT, QT]], seed: int = 0) -> None:
    """A 4-layer ds4-layout GGUF with expert types per layer, tensors in a shuffled order."""
    rng = np.random.default_rng(seed)
    tensors = ds4_tensors(CFG, rng, experts)
    byte_tokens = [chr(c) for c in range(ord("!"), ord("!") + CFG["n_vocab"] - len(SPECIALS))]
    order = rng.permutation(len(tensors))  # not the file order ds4's converter (or synth) uses
    write_ds4_gguf(path, CFG, tensors, name="foreign test model", tokens=byte_tokens + SPECIALS,
                   merges=["! \"", "# $"], order=order)


MODELS = {
    "mxfp4": [MX] * 4,
    "q2-q4": [Q2, Q2, Q2, Q4],
    "q8_0": [Q8] * 4,
    "mixed": [MX, Q4, Q2, Q8],
}
TOKENS = [3, 141, 59, 26, 53, 58, 97, 93, 23, 84]


@pytest.fixture(scope="module", params=list(MODELS))
def foreign(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    path = tmp_path_factory.mktemp("foreign") / f"foreign-{request.param}.gguf"
    write_foreign_gguf(path, MODELS[request.param])
    return request.param, path


def test_layout_types_per_layer_and_quant_bits(foreign: tuple[str, Path]) -> None:
    name, path = foreign
    with GGUFFile(path) as f:
        r = report(f)
        bits = routed_quant_bits(f)
    assert r["valid"], r["problems"]
    want = [(t[0].name, t[1].name, t[2].name) for t in MODELS[name]]
    assert [(e["gate"], e["up"], e["down"]) for e in r["expert_types"]] == want
    # ds4: 4 when the first layer with routed experts has a Q4_K gate, else 2
    assert bits == (4 if MODELS[name][0][0] == QT.Q4_K else 2) == r["kv_quant_bits"]


def test_logits_match_the_independent_reference(foreign: tuple[str, Path], on_cpu: None) -> None:
    _, path = foreign
    ref = npref.RefModel(path)
    want = ref.feed(TOKENS)
    sess = session.load(path, ctx=64)
    try:
        sess.prefill(TOKENS)
        got = np.array(sess.logits, dtype=np.float64)
        assert np.abs(got - want).max() <= 1e-3 and got.argmax() == want.argmax(), np.abs(got - want).max()
        nxt = int(want.argmax())
        want2 = ref.feed([nxt])
        got2 = np.array(sess.step(nxt), dtype=np.float64)
        assert np.abs(got2 - want2).max() <= 1e-3 and got2.argmax() == want2.argmax(), np.abs(got2 - want2).max()
    finally:
        sess.close()
