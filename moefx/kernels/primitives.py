"""The primitive moefx ops that the ``lower`` pass emits, one step of an MoE layer each.

A lowered layer reads as the textbook MoE pipeline, so that the fusion passes can pattern-match
short chains of it::

    logits = router_linear(x, W_r)            probs = router_softmax(logits)
    idx, w = select_experts(probs, ...)       [apply_capacity, unit_weights]
    sorted_slot, block_expert = dispatch(idx, E, block_m)
    xs = gather_rows(x, sorted_slot, w, scale)
    h  = activation(grouped_gemm(xs, block_expert, w1, b1))  [glu_mul(h, grouped_gemm(xs, .., w3, b3))]
    y  = combine(grouped_gemm(h, block_expert, w2, b2), sorted_slot, w, apply_weight)

Grouping uses the *block layout* of :mod:`moefx.kernels.triton_moe`: every expert's routing
slots padded to whole ``block_m``-row blocks, sized by a static bound. Every output shape thus
depends on input shapes only (fake kernels, ``torch.export`` and CUDA graphs need that), and the
same graph runs the PyTorch kernels here (CPU, and any device) or the Triton ones registered for
CUDA in :mod:`moefx.kernels.cuda`. :func:`dispatch_torch` needs no host synchronisation either.

These ops serve inference graphs: they have no autograd formulas (the layers keep training).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import moefx.kernels  # noqa: F401  (registers moefx::xmoe_select / capacity_drop)
from moefx.config import ACTIVATIONS
from moefx.kernels.reference import router_dtype, xmoe_capacity
from moefx.kernels.triton_moe import max_blocks
from moefx.layers.activations import activation_fn

LIB = "moefx"


def _check(cond: bool, msg) -> None:
    torch._check(cond, msg)


# ------------------------------------------------------------------ routing


@torch.library.custom_op("moefx::router_linear", mutates_args=())
def router_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``x @ weight.T + bias`` in the router dtype (float32, float64 for float64 inputs):
    routers run in float32 whatever the model dtype (SPEC §1)."""
    rd = router_dtype(x.dtype)
    return F.linear(x.to(rd), weight.to(rd), None if bias is None else bias.to(rd))


@router_linear.register_fake
def _(x, weight, bias):
    _check(x.shape[-1] == weight.shape[1],
           lambda: f"moefx::router_linear: x is [..., {x.shape[-1]}] but weight is {tuple(weight.shape)}")
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=router_dtype(x.dtype))


@torch.library.custom_op("moefx::router_softmax", mutates_args=())
def router_softmax(logits: Tensor) -> Tensor:
    """Softmax over the experts (last dimension)."""
    return torch.softmax(logits, dim=-1)


@router_softmax.register_fake
def _(logits):
    return torch.empty_like(logits)


def _static_k(E: int, top_k: int, max_experts: int) -> int:
    if top_k > 0:
        return top_k
    return max_experts if max_experts > 0 else E


@torch.library.custom_op("moefx::select_experts", mutates_args=())
def select_experts(probs: Tensor, threshold: float, top_k: int, max_experts: int,
                   renormalize: bool) -> tuple[Tensor, Tensor]:
    """``moefx::xmoe_select`` (top-k or SPEC §1 threshold prefix), then, with ``renormalize``,
    the kept weights rescaled to sum to one (SliceMoE, SPEC §2)."""
    idx, weight = torch.ops.moefx.xmoe_select(probs, threshold, top_k, max_experts)
    if renormalize:
        weight = weight / weight.sum(dim=-1, keepdim=True)
    return idx, weight


@select_experts.register_fake
def _(probs, threshold, top_k, max_experts, renormalize):
    K = _static_k(probs.shape[1], top_k, max_experts)
    return probs.new_empty((probs.shape[0], K), dtype=torch.long), probs.new_empty((probs.shape[0], K))


@torch.library.custom_op("moefx::apply_capacity", mutates_args=())
def apply_capacity(idx: Tensor, weight: Tensor, num_experts: int,
                   capacity_factor: float) -> tuple[Tensor, Tensor]:
    """SPEC §1 capacity with ``C = max(ceil(T / E · γ), 4)`` computed from this batch's ``T``
    (so one graph serves every batch size), applied by ``moefx::capacity_drop``."""
    capacity = xmoe_capacity(idx.shape[0], num_experts, capacity_factor)
    return torch.ops.moefx.capacity_drop(idx, weight, num_experts, capacity)


@apply_capacity.register_fake
def _(idx, weight, num_experts, capacity_factor):
    return torch.empty_like(idx), torch.empty_like(weight)


@torch.library.custom_op("moefx::unit_weights", mutates_args=())
def unit_weights(idx: Tensor, weight: Tensor) -> Tensor:
    """XMoE ``combine="unit"``: weight 1 for every kept slot, 0 for the rest (dtype of weight)."""
    return (idx >= 0).to(weight.dtype)


@unit_weights.register_fake
def _(idx, weight):
    return torch.empty_like(weight)


# ------------------------------------------------------------------ grouping


def dispatch_torch(idx: Tensor, num_experts: int, block_m: int) -> tuple[Tensor, Tensor]:
    """The block layout in tensor ops, with no host synchronisation on any device: a stable
    counting sort (scatter-add counts, cumulative sums, a stable argsort of the expert keys)."""
    R = idx.numel()
    E = int(num_experts)
    B = max_blocks(R, E, block_m)
    dev = idx.device
    sorted_slot = torch.full((B * block_m + 1,), -1, dtype=torch.long, device=dev)
    block_expert = torch.full((B,), -1, dtype=torch.long, device=dev)
    if R == 0:
        return sorted_slot[:-1], block_expert
    flat = idx.reshape(-1)
    valid = (flat >= 0) & (flat < E)
    key = torch.where(valid, flat, E)
    counts = torch.zeros(E + 1, dtype=torch.long, device=dev).scatter_add_(0, key, torch.ones_like(key))[:E]
    n_blocks = (counts + block_m - 1) // block_m
    block_end = torch.cumsum(n_blocks, 0)
    row_start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    e_safe = sorted_key.clamp(max=E - 1)
    rank = torch.arange(R, device=dev) - row_start[e_safe]
    dest = (block_end - n_blocks)[e_safe] * block_m + rank
    dest = torch.where(sorted_key < E, dest, B * block_m)
    sorted_slot.scatter_(0, dest, order)
    sorted_slot[-1] = -1
    if B:
        expert = torch.searchsorted(block_end, torch.arange(B, device=dev), right=True)
        block_expert = torch.where(expert < E, expert, -1)
    return sorted_slot[:-1], block_expert


@torch.library.custom_op("moefx::dispatch", mutates_args=())
def dispatch(idx: Tensor, num_experts: int, block_m: int) -> tuple[Tensor, Tensor]:
    """Group the routing slots of ``idx [N, K]`` by expert: ``(sorted_slot i64[B·block_m],
    block_expert i64[B])`` with ``B = max_blocks(N·K, E, block_m)`` (see module doc)."""
    _check(block_m >= 1, lambda: f"moefx::dispatch: block_m must be >= 1, got {block_m}")
    return dispatch_torch(idx, num_experts, block_m)


@dispatch.register_fake
def _(idx, num_experts, block_m):
    B = max_blocks(idx.numel(), num_experts, block_m)
    return idx.new_empty((B * block_m,), dtype=torch.long), idx.new_empty((B,), dtype=torch.long)


def _slot_tokens(sorted_slot: Tensor, K: int):
    valid = sorted_slot >= 0
    slot = sorted_slot.clamp(min=0)
    return valid, slot, torch.div(slot, K, rounding_mode="floor")


def gather_rows_torch(x: Tensor, sorted_slot: Tensor, weight: Tensor, scale: bool) -> Tensor:
    valid, slot, tok = _slot_tokens(sorted_slot, weight.shape[1])
    rows = x.index_select(0, tok)
    if scale:
        rows = rows * weight.reshape(-1).index_select(0, slot).to(x.dtype).unsqueeze(1)
    return torch.where(valid.unsqueeze(1), rows, 0)


@torch.library.custom_op("moefx::gather_rows", mutates_args=())
def gather_rows(x: Tensor, sorted_slot: Tensor, weight: Tensor, scale: bool) -> Tensor:
    """Row ``r`` of the result is ``x[sorted_slot[r] // K]`` (times its routing weight with
    ``scale``: input gating), zero for padding rows. ``K = weight.shape[1]``."""
    return gather_rows_torch(x, sorted_slot, weight, scale)


@gather_rows.register_fake
def _(x, sorted_slot, weight, scale):
    return x.new_empty((sorted_slot.shape[0], x.shape[1]))


def expert_segments(block_expert: Tensor, block_m: int):
    """``(expert, first_row, end_row)`` per used expert (a host read: the PyTorch path)."""
    if block_expert.numel() == 0:
        return []
    experts, counts = torch.unique_consecutive(block_expert, return_counts=True)
    out, start = [], 0
    for e, c in zip(experts.tolist(), counts.tolist()):
        if e >= 0:
            out.append((e, start * block_m, (start + c) * block_m))
        start += c
    return out


def grouped_gemm_torch(a: Tensor, block_expert: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    B = block_expert.numel()
    out = a.new_zeros((a.shape[0], w.shape[1]))
    if B == 0:
        return out
    for e, r0, r1 in expert_segments(block_expert, a.shape[0] // B):
        if b is None:
            torch.mm(a[r0:r1], w[e].t(), out=out[r0:r1])
        else:
            torch.addmm(b[e], a[r0:r1], w[e].t(), out=out[r0:r1])
    return out


@torch.library.custom_op("moefx::grouped_gemm", mutates_args=())
def grouped_gemm(a: Tensor, block_expert: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    """``out[r] = w[e] a[r] + b[e]`` where ``e`` is the expert of row ``r``'s block; rows of
    unused blocks are unspecified (zero here, left unwritten by the Triton kernel) and never
    read as results. ``a [B·BM, k]``, ``w [E, n, k]``, ``b [E, n]``."""
    _check(a.shape[1] == w.shape[2],
           lambda: f"moefx::grouped_gemm: rows are {a.shape[1]} wide but w is {tuple(w.shape)} ([E, n, k])")
    return grouped_gemm_torch(a, block_expert, w, b)


@grouped_gemm.register_fake
def _(a, block_expert, w, b):
    _check(a.shape[1] == w.shape[2],
           lambda: f"moefx::grouped_gemm: rows are {a.shape[1]} wide but w is {tuple(w.shape)} ([E, n, k])")
    return a.new_empty((a.shape[0], w.shape[1]))


@torch.library.custom_op("moefx::activation", mutates_args=())
def activation(x: Tensor, name: str) -> Tensor:
    """The activation called ``name`` (the table of :mod:`moefx.layers.activations`)."""
    return activation_fn(name)(x)


@activation.register_fake
def _(x, name):
    _check(name in ACTIVATIONS, lambda: f"moefx::activation: {name!r} is not one of {ACTIVATIONS}")
    return torch.empty_like(x)


@torch.library.custom_op("moefx::glu_mul", mutates_args=())
def glu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """The GLU product ``act(gate) * up`` (the activation already applied to ``gate``)."""
    return gate * up


@glu_mul.register_fake
def _(gate, up):
    return torch.empty_like(gate)


def combine_torch(out: Tensor, sorted_slot: Tensor, weight: Tensor, apply_weight: bool) -> Tensor:
    N, K = weight.shape
    valid, slot, tok = _slot_tokens(sorted_slot, K)
    rows = out
    if apply_weight:
        rows = rows * weight.reshape(-1).index_select(0, slot).to(out.dtype).unsqueeze(1)
    rows = torch.where(valid.unsqueeze(1), rows, 0)
    return out.new_zeros((N, out.shape[1])).index_add_(0, tok, rows)


@torch.library.custom_op("moefx::combine", mutates_args=())
def combine(out: Tensor, sorted_slot: Tensor, weight: Tensor, apply_weight: bool) -> Tensor:
    """Scatter-add the expert outputs back to their tokens: ``y[n] = Σ_rows of n (w ·) out[r]``.
    ``N = weight.shape[0]``; the result has ``out``'s dtype."""
    return combine_torch(out, sorted_slot, weight, apply_weight)


@combine.register_fake
def _(out, sorted_slot, weight, apply_weight):
    return out.new_empty((weight.shape[0], out.shape[1]))


PRIMITIVES = {
    "router_linear": torch.ops.moefx.router_linear,
    "router_softmax": torch.ops.moefx.router_softmax,
    "select_experts": torch.ops.moefx.select_experts,
    "apply_capacity": torch.ops.moefx.apply_capacity,
    "unit_weights": torch.ops.moefx.unit_weights,
    "dispatch": torch.ops.moefx.dispatch,
    "gather_rows": torch.ops.moefx.gather_rows,
    "grouped_gemm": torch.ops.moefx.grouped_gemm,
    "activation": torch.ops.moefx.activation,
    "glu_mul": torch.ops.moefx.glu_mul,
    "combine": torch.ops.moefx.combine,
}

if torch.cuda.is_available():
    from moefx.kernels import cuda as _cuda  # noqa: E402

    if hasattr(_cuda, "register"):  # else cuda.py is mid-import and registers at its end
        _cuda.register()
