"""GGUF tensors → model parameters.

Which tensors a layer has, and how each is kept, come from the tensor table
(:mod:`workbench.spec.tensors`, its :class:`~workbench.spec.tensors.Role`); this module
loads them and hands them to the model's modules. How each role is kept (chosen for CPU
prefill speed within memory):

* Routed experts (IQ2_XXS / Q2_K / Q4_K): left in the memory-mapped file as
  ``QTensor`` s; a chunk dequantizes only the experts it uses (see :mod:`moe`).
* Q8_0 matrices (attention projections, shared expert, output head): on the CPU with the
  native kernels built, left in the mapped file as ``QTensor`` s (nothing is copied at
  load; 1-4-row decode products read the blocks in place, a prefill chunk dequantizes
  them in tiles for a float32 BLAS matmul); otherwise converted once to MLX affine 8-bit
  (:class:`~workbench.model.ops.AffineQ8`, ~1.25 bytes per weight) for
  ``mx.quantized_matmul``.
* F16 / F32 tensors (hyper-connections, compressors, indexer, router, norms): widened to
  float32 (they are small next to the experts).
* The F16 token embedding: a zero-copy view of the file, read row by row.

After a tensor is converted (a float, or an AffineQ8), its pages of the file mapping are
handed back to the OS (``madvise(MADV_DONTNEED)``; the data stays in the page cache,
nothing is written), so the converted copy does not sit in the process's memory twice.
Peak RSS while loading and prefilling is then about the file size (pages touched as they
are used) plus the small float copies (plus the AffineQ8 copies, ~0.15 of the file on
real widths, without the native kernels).
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import sys
from typing import Any, Callable

import mlx.core as mx
import numpy as np

from workbench.gguf.quants import QTensor, dequantize, native_available, q8_0_to_affine
from workbench.gguf.reader import GGUFFile
from workbench.model.attention import Attention, AttentionWeights
from workbench.model.compressor import Compressor, CompressorWeights
from workbench.model.indexer import Indexer, IndexerWeights
from workbench.model.model import Block, HCWeights, Model
from workbench.model.moe import MoE, MoEWeights
from workbench.model.ops import AffineQ8, Weight
from workbench.model.rope import RopeSpec
from workbench.spec.args import ModelArgs
from workbench.spec.ggml import F16, Q8_0
from workbench.spec.tensors import Role, Where, layer_rules


MADV_DONTNEED = 4


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def release_pages(view: np.ndarray) -> None:
    """Drop the whole pages inside a read-only file-mapped view from this process
    (Linux; elsewhere a no-op). The view stays valid: a later read faults the pages back."""
    if not sys.platform.startswith("linux") or view.nbytes < mmap.PAGESIZE:
        return
    start = view.ctypes.data
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    last = (start + view.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        libc = _libc()
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), ctypes.c_int(MADV_DONTNEED))


class Tensors:
    """Typed access to one GGUF file's tensors."""

    def __init__(self, f: GGUFFile) -> None:
        self.f = f

    def has(self, name: str) -> bool:
        return name in self.f.tensors

    def float(self, name: str) -> mx.array:
        """A float32 (or int32 for I32) copy in the logical shape. The bytes are copied out of
        the mapping now (``dequantize`` makes an MLX array of them), so the mapping's pages are
        released at once; the widening itself is left to MLX's first evaluation (one graph
        with the first forward, instead of one evaluation per tensor at load)."""
        info, raw = self.f.tensor(name), self.f.raw(name)
        out = dequantize(raw, info.ggml_type).reshape(info.shape)
        release_pages(raw)
        return out

    def matrix(self, name: str) -> Weight:
        """A 2-D weight: Q8_0 → a QTensor over the mapping (CPU, native kernels built) or an
        :class:`AffineQ8`; anything else → float32."""
        info = self.f.tensor(name)
        if info.ggml_type != Q8_0:
            return self.float(name)
        raw = self.f.raw(name)
        if native_available() and mx.default_device() == mx.cpu:
            return QTensor(raw, info.ggml_type, info.shape)
        wq, scales, biases = q8_0_to_affine(QTensor(raw, info.ggml_type, info.shape))
        mx.eval(wq, scales, biases)
        release_pages(raw)
        return AffineQ8(wq, scales, biases)

    def experts(self, name: str) -> QTensor:
        """A 3-D routed-expert tensor, left quantized in the mapped file."""
        info = self.f.tensor(name)
        return QTensor(self.f.raw(name), info.ggml_type, info.shape)

    def embedding(self, name: str) -> np.ndarray | mx.array:
        """``[n_vocab, n_embd]``: a float16 view of the file when F16, else float32."""
        info = self.f.tensor(name)
        if info.ggml_type == F16:
            return self.f.raw(name).view(np.float16).reshape(info.shape)
        return self.float(name)


    def ids(self, name: str) -> mx.array:
        """An int32 table (``tid2eid``)."""
        return self.float(name).astype(mx.int32)

    def keep(self, role: Role, name: str) -> Any:
        """The tensor ``name`` kept as ``role`` says."""
        return {Role.EMBEDDING: self.embedding, Role.MATRIX: self.matrix, Role.FLOAT: self.float,
                Role.IDS: self.ids, Role.EXPERTS: self.experts}[role](name)


def load_tensors(t: Tensors, args: ModelArgs, layer: int | None, where: Where | None = None) -> dict[str, Any]:
    """Layer ``layer``'s tensors (None: the globals of ``where``) by their table name
    (``"attn_q_a.weight"``), each kept as its role says; absent optional ones are left out."""
    out = {}
    for rule in layer_rules(args, layer, where):
        name = rule.full_name(layer)
        if rule.required or t.has(name):
            out[rule.name] = t.keep(rule.role, name)
    return out


def _hc(w: dict[str, Any], prefix: str) -> HCWeights:
    return HCWeights(w[prefix + "_fn.weight"], w[prefix + "_scale.weight"], w[prefix + "_base.weight"])


def _compressor(w: dict[str, Any], prefix: str) -> CompressorWeights:
    return CompressorWeights(w[prefix + "_kv.weight"], w[prefix + "_gate.weight"], w[prefix + "_ape.weight"],
                             w[prefix + "_norm.weight"])


def build_block(args: ModelArgs, t: Tensors, L: int) -> Block:
    """Layer L's modules from tensors ``blk.L.*``."""
    w = load_tensors(t, args, L)
    r = args.ratio(L)
    rope = RopeSpec.for_layer(args, L)
    eps = args.rms_eps
    aw = AttentionWeights(
        wq_a=w["attn_q_a.weight"], q_a_norm=w["attn_q_a_norm.weight"], wq_b=w["attn_q_b.weight"],
        wkv=w["attn_kv.weight"], kv_norm=w["attn_kv_a_norm.weight"], sinks=w["attn_sinks.weight"],
        wo_a=w["attn_output_a.weight"], wo_b=w["attn_output_b.weight"])
    compressor = indexer = None
    if r:
        compressor = Compressor(r, args.head_dim, _compressor(w, "attn_compressor"), rope, eps, "attn", args.n_nope)
    if r == 4:
        idx_comp = Compressor(4, args.idx_dim, _compressor(w, "indexer_compressor"), rope, eps, "index")
        iw = IndexerWeights(w["indexer.attn_q_b.weight"], w["indexer.proj.weight"])
        indexer = Indexer(args.idx_heads, args.idx_dim, args.idx_topk, 4, iw, idx_comp, rope)
    attention = Attention(args.n_head, args.head_dim, args.n_rot, args.n_swa, args.o_groups, eps, aw, rope,
                          r, compressor, indexer)
    hashed = L < args.n_hash_layer
    mw = MoEWeights(
        router=w["ffn_gate_inp.weight"], bias=w.get("exp_probs_b.bias"), tid2eid=w.get("ffn_gate_tid2eid.weight"),
        gate_exps=w["ffn_gate_exps.weight"], up_exps=w["ffn_up_exps.weight"], down_exps=w["ffn_down_exps.weight"],
        gate_sh=w["ffn_gate_shexp.weight"], up_sh=w["ffn_up_shexp.weight"], down_sh=w["ffn_down_shexp.weight"])
    moe = MoE(args.n_expert_used, hashed, args.expert_weights_scale, args.swiglu_clamp[L], mw, args.expert_weights_norm)
    return Block(args, _hc(w, "hc_attn"), w["attn_norm.weight"], attention, _hc(w, "hc_ffn"), w["ffn_norm.weight"], moe)


def load_model(f: GGUFFile, args: ModelArgs, on_layer: Callable[[int], None] | None = None,
               layers: tuple[int, int] | None = None) -> Model:
    """Build the model from an open (already validated) ds4 GGUF file.

    ``layers`` (half-open, default all) limits it to blocks ``start..stop-1`` (a pipeline
    rank's range): the token embedding is built only when ``start == 0`` and the output head
    only when ``stop == n_layer`` (None otherwise); other layers' tensors are never touched.
    ``on_layer(L)`` is called after each layer is built. The model keeps views into the
    file's mapping (experts, embedding), so the mapping must stay open while it is used.
    """
    start, stop = (0, args.n_layer) if layers is None else layers
    t = Tensors(f)
    blocks = []
    for L in range(start, stop):
        blocks.append(build_block(args, t, L))
        if on_layer is not None:
            on_layer(L)
    embedding = load_tensors(t, args, None, Where.HEAD)["token_embd.weight"] if start == 0 else None
    if stop != args.n_layer:
        return Model(args, embedding, blocks, None, None, None)
    tail = load_tensors(t, args, None, Where.TAIL)
    return Model(args, embedding, blocks, _hc(tail, "output_hc"), tail["output_norm.weight"], tail["output.weight"])
