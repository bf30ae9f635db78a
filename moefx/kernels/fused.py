"""The fused moefx ops that the fusion passes put in place of chains of primitive ops.

- ``moefx::route``: router linear (fp32) + softmax + top-k / threshold selection (+ renorm);
- ``moefx::gather_gemm1``: gather token rows + GEMM1 + activation (+ GLU multiply), reading each
  token row from where it lies instead of materialising the gathered copy;
- ``moefx::gemm2_scatter``: GEMM2 + routing weight + scatter-add back to the tokens;
- ``moefx::expert_mlp``: the whole expert MLP per row tile, the hidden activations never
  written to memory (for narrow experts, e.g. SliceMoE slices of 72 or 96).

Each is a ``torch.library.custom_op`` (one opaque node through tracing and export) with a
PyTorch kernel for every device, a shape-only fake kernel, and a Triton kernel for CUDA
registered by :mod:`moefx.kernels.cuda`. The PyTorch kernels compose the primitive kernels of
:mod:`moefx.kernels.primitives`, so a fused graph computes what the unfused one did. Inference
only, like the primitives.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from moefx.kernels import primitives as P
from moefx.layers.activations import activation_fn


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


def _hidden(rows: Tensor, block_expert: Tensor, w1, b1, w3, b3, activation: str) -> Tensor:
    h = activation_fn(activation)(P.grouped_gemm_torch(rows, block_expert, w1, b1))
    if w3 is not None:
        h = h * P.grouped_gemm_torch(rows, block_expert, w3, b3)
    return h


@torch.library.custom_op("moefx::gather_gemm1", mutates_args=())
def gather_gemm1(x: Tensor, sorted_slot: Tensor, block_expert: Tensor, weight: Tensor,
                 scale_input: bool, w1: Tensor, b1: Optional[Tensor], w3: Optional[Tensor],
                 b3: Optional[Tensor], activation: str) -> Tensor:
    """Hidden activations ``[B·BM, h]`` of every row of the block layout:
    ``act(w1[e] x̃ + b1[e]) (* (w3[e] x̃ + b3[e]))`` with ``x̃ = x[slot // K]`` (times the slot's
    routing weight when ``scale_input``); padding rows are unspecified."""
    rows = P.gather_rows_torch(x, sorted_slot, weight, scale_input)
    return _hidden(rows, block_expert, w1, b1, w3, b3, activation)


@gather_gemm1.register_fake
def _(x, sorted_slot, block_expert, weight, scale_input, w1, b1, w3, b3, activation):
    return x.new_empty((sorted_slot.shape[0], w1.shape[1]))


@torch.library.custom_op("moefx::gemm2_scatter", mutates_args=())
def gemm2_scatter(hidden: Tensor, sorted_slot: Tensor, block_expert: Tensor, weight: Tensor,
                  apply_weight: bool, w2: Tensor, b2: Optional[Tensor]) -> Tensor:
    """``y[n] = Σ_{rows r of token n} (w2[e] hidden[r] + b2[e]) (· weight)`` as ``[N, d]``,
    ``N = weight.shape[0]``, in ``hidden``'s dtype."""
    out = P.grouped_gemm_torch(hidden, block_expert, w2, b2)
    return P.combine_torch(out, sorted_slot, weight, apply_weight)


@gemm2_scatter.register_fake
def _(hidden, sorted_slot, block_expert, weight, apply_weight, w2, b2):
    return hidden.new_empty((weight.shape[0], w2.shape[1]))


@torch.library.custom_op("moefx::expert_mlp", mutates_args=())
def expert_mlp(x: Tensor, sorted_slot: Tensor, block_expert: Tensor, weight: Tensor,
               scale_input: bool, apply_weight: bool, w1: Tensor, b1: Optional[Tensor],
               w3: Optional[Tensor], b3: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
               activation: str) -> Tensor:
    """``gemm2_scatter(gather_gemm1(...))`` as one op: ``[N, d]`` in ``x``'s dtype. On CUDA the
    hidden activations stay on chip (Triton kernel); the PyTorch kernel runs per expert."""
    rows = P.gather_rows_torch(x, sorted_slot, weight, scale_input)
    h = _hidden(rows, block_expert, w1, b1, w3, b3, activation)
    return P.combine_torch(P.grouped_gemm_torch(h, block_expert, w2, b2), sorted_slot, weight,
                           apply_weight)


@expert_mlp.register_fake
def _(x, sorted_slot, block_expert, weight, scale_input, apply_weight, w1, b1, w3, b3, w2, b2,
      activation):
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
