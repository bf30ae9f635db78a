"""The three moefx custom ops (docs/ARCHITECTURE.md): ``xmoe_select``, ``capacity_drop``,
``moe_ffn``, plus ``moe_ffn_backward`` which carries ``moe_ffn``'s gradient.

Each is a ``torch.library.custom_op`` so that it stays one opaque node through symbolic_trace,
``torch.export`` and decompositions (the passes and the exporters match on it), with:

- a kernel for every device (the sort-grouped PyTorch path of :mod:`moefx.kernels.cpu`); the
  Triton room overrides CUDA with ``torch.library.register_kernel(..., "cuda", ...)``;
- a fake kernel whose output shapes depend only on input shapes (``K`` is static), so export
  works with dynamic batch and sequence;
- autograd. The backward of ``moe_ffn`` is itself an op, so tracing a training graph sees one
  opaque node instead of data-dependent grouping code, and a device can register a faster one.

Routing weights may be float32 or the dtype of ``x`` (float64 for gradchecks); the expert math
runs in the dtype of ``x``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from moefx.config import ACTIVATIONS
from moefx.kernels import cpu

_EMPTY_SHAPE = (0,)


def _check_expert_ids(op: str, idx: Tensor, num_experts: int) -> None:
    """Real kernels only (it reads the data): every id is -1 (unused slot) or a valid expert."""
    if idx.dtype != torch.long:
        raise TypeError(f"{op}: idx must be int64, got {idx.dtype}")
    if idx.numel() and (int(idx.min()) < -1 or int(idx.max()) >= num_experts):
        raise ValueError(
            f"{op}: expert ids must lie in [-1, {num_experts - 1}] (-1 = unused slot), "
            f"got min {int(idx.min())} and max {int(idx.max())}"
        )


def _static_k(num_experts: int, top_k: int, max_experts: int) -> int:
    if top_k > 0:
        return top_k
    return max_experts if max_experts > 0 else num_experts


def _check_select(probs: Tensor, threshold: float, top_k: int, max_experts: int) -> None:
    torch._check(probs.dim() == 2, lambda: f"moefx::xmoe_select: probs must be [T, E], got shape {tuple(probs.shape)}")
    E = probs.shape[1]
    torch._check(top_k >= 0 and max_experts >= 0, lambda: "moefx::xmoe_select: top_k and max_experts must be >= 0 (0 = unused)")
    torch._check(
        _static_k(E, top_k, max_experts) <= E,
        lambda: f"moefx::xmoe_select: top_k={top_k}/max_experts={max_experts} exceed the {E} experts of probs",
    )


@torch.library.custom_op("moefx::xmoe_select", mutates_args=())
def xmoe_select(probs: Tensor, threshold: float, top_k: int, max_experts: int) -> tuple[Tensor, Tensor]:
    """Pick experts per row: fixed top-k (``top_k > 0``) or SPEC §1's threshold prefix.
    Returns ``(idx i64[T, K], weight [T, K])``, slots in descending probability, unused slots
    ``-1`` / ``0``; ``weight`` is the raw probability (dtype of ``probs``)."""
    _check_select(probs, threshold, top_k, max_experts)
    return cpu.xmoe_select(probs, threshold, top_k, max_experts)


@xmoe_select.register_fake
def _(probs, threshold, top_k, max_experts):
    _check_select(probs, threshold, top_k, max_experts)
    K = _static_k(probs.shape[1], top_k, max_experts)
    T = probs.shape[0]
    return probs.new_empty((T, K), dtype=torch.long), probs.new_empty((T, K))


def _select_setup(ctx, inputs, output):
    idx, _ = output
    ctx.save_for_backward(idx)
    ctx.num_experts = inputs[0].shape[1]


def _select_backward(ctx, grad_idx, grad_weight):
    (idx,) = ctx.saved_tensors
    valid = idx >= 0
    grad_probs = grad_weight.new_zeros((idx.shape[0], ctx.num_experts))
    grad_probs.scatter_add_(1, torch.where(valid, idx, 0), torch.where(valid, grad_weight, 0))
    return grad_probs, None, None, None


xmoe_select.register_autograd(_select_backward, setup_context=_select_setup)


def _check_capacity(idx: Tensor, weight: Tensor, num_experts: int, capacity: int) -> None:
    torch._check(idx.dim() == 2 and idx.shape == weight.shape,
                 lambda: f"moefx::capacity_drop: idx and weight must both be [T, K], got {tuple(idx.shape)} and {tuple(weight.shape)}")
    torch._check(num_experts >= 1, lambda: f"moefx::capacity_drop: num_experts must be >= 1, got {num_experts}")
    torch._check(capacity >= 0, lambda: f"moefx::capacity_drop: capacity must be >= 0, got {capacity}")


@torch.library.custom_op("moefx::capacity_drop", mutates_args=())
def capacity_drop(idx: Tensor, weight: Tensor, num_experts: int, capacity: int) -> tuple[Tensor, Tensor]:
    """SPEC §1 capacity rule: rank-major priority, higher probability first inside a rank;
    slots past an expert's ``capacity`` become ``-1`` / ``0``."""
    _check_capacity(idx, weight, num_experts, capacity)
    _check_expert_ids("moefx::capacity_drop", idx, num_experts)
    return cpu.capacity_drop(idx, weight, num_experts, capacity)


@capacity_drop.register_fake
def _(idx, weight, num_experts, capacity):
    _check_capacity(idx, weight, num_experts, capacity)
    return torch.empty_like(idx), torch.empty_like(weight)


def _capacity_setup(ctx, inputs, output):
    ctx.save_for_backward(output[0])


def _capacity_backward(ctx, grad_idx, grad_weight):
    (idx_out,) = ctx.saved_tensors
    return None, torch.where(idx_out >= 0, grad_weight, 0), None, None


capacity_drop.register_autograd(_capacity_backward, setup_context=_capacity_setup)


def _check_moe_ffn(x, idx, weight, w1, b1, w3, b3, w2, b2, activation) -> None:
    op = "moefx::moe_ffn"
    torch._check(x.dim() == 2, lambda: f"{op}: x must be [N, d], got shape {tuple(x.shape)}")
    torch._check(idx.dim() == 2 and idx.shape[0] == x.shape[0],
                 lambda: f"{op}: idx must be [N, K] with N = {x.shape[0]} rows of x, got {tuple(idx.shape)}")
    torch._check(weight.shape == idx.shape, lambda: f"{op}: weight must have idx's shape {tuple(idx.shape)}, got {tuple(weight.shape)}")
    torch._check(w1.dim() == 3 and w1.shape[2] == x.shape[1],
                 lambda: f"{op}: w1 must be [E, h, d] with d = {x.shape[1]}, got {tuple(w1.shape)}")
    E, h, d = w1.shape
    torch._check(w2.dim() == 3 and w2.shape[0] == E and w2.shape[1] == d and w2.shape[2] == h,
                 lambda: f"{op}: w2 must be [E, d, h] = {(E, d, h)}, got {tuple(w2.shape)}")
    if w3 is not None:
        torch._check(w3.shape == w1.shape, lambda: f"{op}: w3 must match w1 {tuple(w1.shape)}, got {tuple(w3.shape)}")
    for name, b, want in (("b1", b1, (E, h)), ("b3", b3, (E, h)), ("b2", b2, (E, d))):
        if b is not None:
            torch._check(tuple(b.shape) == want, lambda: f"{op}: {name} must be {want}, got {tuple(b.shape)}")
    torch._check(b3 is None or w3 is not None, lambda: f"{op}: b3 given without w3")
    torch._check(activation in ACTIVATIONS, lambda: f"{op}: activation={activation!r} is not one of {ACTIVATIONS}")


@torch.library.custom_op("moefx::moe_ffn", mutates_args=())
def moe_ffn(
    x: Tensor, idx: Tensor, weight: Tensor, w1: Tensor, b1: Optional[Tensor], w3: Optional[Tensor],
    b3: Optional[Tensor], w2: Tensor, b2: Optional[Tensor], activation: str, gate_input: bool,
) -> Tensor:
    """Dispatch rows to their experts, run each expert FFN, combine (docs/ARCHITECTURE.md):
    ``y[n] = Σ_j weight[n,j]·FFN_{idx[n,j]}(x[n])`` or, with ``gate_input``,
    ``Σ_j FFN_{idx[n,j]}(weight[n,j]·x[n])``; slots with ``idx < 0`` are skipped."""
    _check_moe_ffn(x, idx, weight, w1, b1, w3, b3, w2, b2, activation)
    _check_expert_ids("moefx::moe_ffn", idx, w1.shape[0])
    return cpu.moe_ffn(x, idx, weight, w1, b1, w3, b3, w2, b2, activation, gate_input)


@moe_ffn.register_fake
def _(x, idx, weight, w1, b1, w3, b3, w2, b2, activation, gate_input):
    _check_moe_ffn(x, idx, weight, w1, b1, w3, b3, w2, b2, activation)
    return torch.empty_like(x)


@torch.library.custom_op("moefx::moe_ffn_backward", mutates_args=())
def moe_ffn_backward(
    grad: Tensor, x: Tensor, idx: Tensor, weight: Tensor, w1: Tensor, b1: Optional[Tensor],
    w3: Optional[Tensor], b3: Optional[Tensor], w2: Tensor, b2: Optional[Tensor], activation: str,
    gate_input: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``moe_ffn`` for (x, weight, w1, b1, w3, b3, w2, b2); an absent optional
    input gets an empty ``[0]`` tensor."""
    grads = cpu.moe_ffn_backward(grad, x, idx, weight, w1, b1, w3, b3, w2, b2, activation, gate_input)
    return tuple(g if g is not None else x.new_empty(_EMPTY_SHAPE) for g in grads)


@moe_ffn_backward.register_fake
def _(grad, x, idx, weight, w1, b1, w3, b3, w2, b2, activation, gate_input):
    def like(t):
        return torch.empty_like(t) if t is not None else x.new_empty(_EMPTY_SHAPE)

    return (like(x), like(weight), like(w1), like(b1), like(w3), like(b3), like(w2), like(b2))


def _moe_ffn_setup(ctx, inputs, output):
    x, idx, weight, w1, b1, w3, b3, w2, b2, activation, gate_input = inputs
    ctx.save_for_backward(x, idx, weight, w1, b1, w3, b3, w2, b2)
    ctx.activation = activation
    ctx.gate_input = gate_input


def _moe_ffn_backward(ctx, grad):
    x, idx, weight, w1, b1, w3, b3, w2, b2 = ctx.saved_tensors
    gx, gweight, gw1, gb1, gw3, gb3, gw2, gb2 = torch.ops.moefx.moe_ffn_backward(
        grad.contiguous(), x, idx, weight, w1, b1, w3, b3, w2, b2, ctx.activation, ctx.gate_input
    )
    return (
        gx, None, gweight, gw1,
        gb1 if b1 is not None else None,
        gw3 if w3 is not None else None,
        gb3 if b3 is not None else None,
        gw2,
        gb2 if b2 is not None else None,
        None, None,
    )


moe_ffn.register_autograd(_moe_ffn_backward, setup_context=_moe_ffn_setup)
