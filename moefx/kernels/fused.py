"""The fused moefx ops that the fusion passes put in place of chains of primitive ops.

- ``moefx::route``: router linear (fp32) + softmax + top-k / threshold selection (+ renorm);
- ``moefx::gather_gemm1``: gather token rows + GEMM1 + activation (+ GLU multiply), reading each
  token row from where it lies instead of materialising the gathered copy;
- ``moefx::gemm2_scatter``: GEMM2 + routing weight + scatter-add back to the tokens;
- ``moefx::expert_mlp``: the whole expert MLP per row tile, the hidden activations never
  written to memory (for narrow experts, e.g. SliceMoE slices of 72 or 96).

Each is a ``torch.library.custom_op`` (one opaque node through tracing and export) with a
PyTorch kernel for every device, a shape-only fake kernel, and a Triton kernel for CUDA
registered by :mod:`moefx.kernels.cuda`. The PyTorch kernels walk the block layout expert by
expert over the routed rows only (padding skipped, buffers written in place), which is what
keeps the CPU path of an optimized graph as fast as the layers' own. Inference only, like the
primitives.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from moefx.kernels import primitives as P
from moefx.kernels.cpu import activation_


@torch.library.custom_op("moefx::route", mutates_args=())
def route(x: Tensor, weight: Tensor, bias: Optional[Tensor], threshold: float, top_k: int,
          max_experts: int, renormalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(idx, weight, probs)`` of ``select_experts(router_softmax(router_linear(x, W, b)))``."""
    probs = torch.softmax(P.router_linear(x, weight, bias), dim=-1)
    idx, w = torch.ops.moefx.select_experts(probs, threshold, top_k, max_experts, renormalize)
    return idx, w, probs


@route.register_fake
def _(x, weight, bias, threshold, top_k, max_experts, renormalize):
    T, E = x.shape[0], weight.shape[0]
    K = P._static_k(E, top_k, max_experts)
    rd = P.router_dtype(x.dtype)
    return (x.new_empty((T, K), dtype=torch.long), x.new_empty((T, K), dtype=rd),
            x.new_empty((T, E), dtype=rd))


def _check_widths(op: str, d_in, w1=None, w2=None, h=None) -> None:
    """Shape errors name the op and the expected layout (docs/ARCHITECTURE.md)."""
    if w1 is not None:
        torch._check(w1.dim() == 3 and w1.shape[2] == d_in,
                     lambda: f"moefx::{op}: w1 must be [E, h, d] with d = {d_in}, got {tuple(w1.shape)}")
    if w2 is not None:
        want_h = w1.shape[1] if w1 is not None else h
        torch._check(w2.dim() == 3 and w2.shape[2] == want_h,
                     lambda: f"moefx::{op}: w2 must be [E, d, h] with h = {want_h}, got {tuple(w2.shape)}")


def _linear(a: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    return torch.mm(a, w.t()) if b is None else torch.addmm(b, a, w.t())


def _routed(sorted_slot: Tensor, block_expert: Tensor):
    """``(expert, first_row, slots)`` per used expert, padding rows dropped (they trail each
    expert's segment). Reads the layout on the host: this is the PyTorch path."""
    if block_expert.numel() == 0:
        return []
    out = []
    for e, r0, r1 in P.expert_segments(block_expert, sorted_slot.shape[0] // block_expert.numel()):
        slots = sorted_slot[r0:r1]
        out.append((e, r0, slots[: int((slots >= 0).sum())]))
    return out


def _segment_rows(x: Tensor, slots: Tensor, weight: Tensor, scale_input: bool):
    K = weight.shape[1]
    tok = torch.div(slots, K, rounding_mode="floor")
    rows = x.index_select(0, tok)
    w = weight.reshape(-1).index_select(0, slots).to(x.dtype).unsqueeze(1)
    if scale_input:
        rows.mul_(w)
    return tok, rows, w


def _segment_hidden(rows: Tensor, e: int, w1, b1, w3, b3, activation: str) -> Tensor:
    h = activation_(activation, _linear(rows, w1[e], None if b1 is None else b1[e]))
    if w3 is not None:
        h = h.mul_(_linear(rows, w3[e], None if b3 is None else b3[e]))
    return h


def gather_gemm1_torch(x, sorted_slot, block_expert, weight, scale_input, w1, b1, w3, b3, activation):
    hidden = x.new_zeros((sorted_slot.shape[0], w1.shape[1]))
    for e, r0, slots in _routed(sorted_slot, block_expert):
        _, rows, _ = _segment_rows(x, slots, weight, scale_input)
        hidden[r0:r0 + slots.shape[0]] = _segment_hidden(rows, e, w1, b1, w3, b3, activation)
    return hidden


def gemm2_scatter_torch(hidden, sorted_slot, block_expert, weight, apply_weight, w2, b2):
    N, K = weight.shape
    y = hidden.new_zeros((N, w2.shape[1]))
    for e, r0, slots in _routed(sorted_slot, block_expert):
        out = _linear(hidden[r0:r0 + slots.shape[0]], w2[e], None if b2 is None else b2[e])
        if apply_weight:
            out.mul_(weight.reshape(-1).index_select(0, slots).to(out.dtype).unsqueeze(1))
        y.index_add_(0, torch.div(slots, K, rounding_mode="floor"), out)
    return y


def expert_mlp_torch(x, sorted_slot, block_expert, weight, scale_input, apply_weight,
                     w1, b1, w3, b3, w2, b2, activation):
    y = x.new_zeros((weight.shape[0], w2.shape[1]))
    for e, _, slots in _routed(sorted_slot, block_expert):
        tok, rows, w = _segment_rows(x, slots, weight, scale_input)
        out = _linear(_segment_hidden(rows, e, w1, b1, w3, b3, activation), w2[e],
                      None if b2 is None else b2[e])
        if apply_weight:
            out.mul_(w)
        y.index_add_(0, tok, out)
    return y


@torch.library.custom_op("moefx::gather_gemm1", mutates_args=())
def gather_gemm1(x: Tensor, sorted_slot: Tensor, block_expert: Tensor, weight: Tensor,
                 scale_input: bool, w1: Tensor, b1: Optional[Tensor], w3: Optional[Tensor],
                 b3: Optional[Tensor], activation: str) -> Tensor:
    """Hidden activations ``[B·BM, h]`` of every row of the block layout:
    ``act(w1[e] x̃ + b1[e]) (* (w3[e] x̃ + b3[e]))`` with ``x̃ = x[slot // K]`` (times the slot's
    routing weight when ``scale_input``); padding rows are zero here (unspecified in general:
    the Triton kernel leaves them unwritten)."""
    _check_widths("gather_gemm1", x.shape[1], w1)
    return gather_gemm1_torch(x, sorted_slot, block_expert, weight, scale_input, w1, b1, w3, b3,
                              activation)


@gather_gemm1.register_fake
def _(x, sorted_slot, block_expert, weight, scale_input, w1, b1, w3, b3, activation):
    _check_widths("gather_gemm1", x.shape[1], w1)
    return x.new_empty((sorted_slot.shape[0], w1.shape[1]))


@torch.library.custom_op("moefx::gemm2_scatter", mutates_args=())
def gemm2_scatter(hidden: Tensor, sorted_slot: Tensor, block_expert: Tensor, weight: Tensor,
                  apply_weight: bool, w2: Tensor, b2: Optional[Tensor]) -> Tensor:
    """``y[n] = Σ_{rows r of token n} (w2[e] hidden[r] + b2[e]) (· weight)`` as ``[N, d]``,
    ``N = weight.shape[0]``, in ``hidden``'s dtype."""
    _check_widths("gemm2_scatter", None, None, w2, h=hidden.shape[1])
    return gemm2_scatter_torch(hidden, sorted_slot, block_expert, weight, apply_weight, w2, b2)


@gemm2_scatter.register_fake
def _(hidden, sorted_slot, block_expert, weight, apply_weight, w2, b2):
    _check_widths("gemm2_scatter", None, None, w2, h=hidden.shape[1])
    return hidden.new_empty((weight.shape[0], w2.shape[1]))


@torch.library.custom_op("moefx::expert_mlp", mutates_args=())
def expert_mlp(x: Tensor, sorted_slot: Tensor, block_expert: Tensor, weight: Tensor,
               scale_input: bool, apply_weight: bool, w1: Tensor, b1: Optional[Tensor],
               w3: Optional[Tensor], b3: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
               activation: str) -> Tensor:
    """``gemm2_scatter(gather_gemm1(...))`` as one op: ``[N, d]`` in ``x``'s dtype. On CUDA the
    hidden activations stay on chip (Triton kernel); the PyTorch kernel runs expert by expert
    on the routed rows only, like ``moefx::moe_ffn``'s CPU kernel."""
    _check_widths("expert_mlp", x.shape[1], w1, w2)
    return expert_mlp_torch(x, sorted_slot, block_expert, weight, scale_input, apply_weight,
                            w1, b1, w3, b3, w2, b2, activation)


@expert_mlp.register_fake
def _(x, sorted_slot, block_expert, weight, scale_input, apply_weight, w1, b1, w3, b3, w2, b2,
      activation):
    _check_widths("expert_mlp", x.shape[1], w1, w2)
    return x.new_empty((weight.shape[0], w2.shape[1]))


FUSED = {
    "route": torch.ops.moefx.route,
    "gather_gemm1": torch.ops.moefx.gather_gemm1,
    "gemm2_scatter": torch.ops.moefx.gemm2_scatter,
    "expert_mlp": torch.ops.moefx.expert_mlp,
}

if torch.cuda.is_available():
    from moefx.kernels import cuda as _cuda  # noqa: E402

    if hasattr(_cuda, "register"):  # else cuda.py is mid-import and registers at its end
        _cuda.register()
