"""Plain-PyTorch references of the moefx ops and of both whole layers (SPEC.md §3).

Written for clarity, not speed: Python loops over tokens, slots and experts, in whatever dtype
the inputs carry (float64 included). Every fast path (the CPU op, Triton kernels, fused ops,
ONNX graphs) is tested against these. They share nothing with the fast paths except the
activation table, so a bug in the grouping or sorting logic cannot hide in both.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from moefx.layers.activations import activation_fn


def router_dtype(dtype: torch.dtype) -> torch.dtype:
    """Routers run in float32 whatever the model dtype (SPEC §1), except float64 stays float64
    so that float64 gradchecks and references see exactly the same routing."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def xmoe_select_reference(probs: torch.Tensor, threshold: float, top_k: int, max_experts: int):
    """SPEC §1 selection, one row at a time: returns ``(idx [T, K], weight [T, K])``."""
    T, E = probs.shape
    K = top_k if top_k > 0 else (max_experts if max_experts > 0 else E)
    idx = torch.full((T, K), -1, dtype=torch.long)
    weight = torch.zeros((T, K), dtype=probs.dtype)
    for t in range(T):
        row = [float(v) for v in probs[t].detach()]
        ranked = sorted(range(E), key=lambda e: -row[e])
        mass = 0.0
        for j in range(K):
            e = ranked[j]
            if top_k == 0 and j > 0 and not mass < threshold:
                break
            idx[t, j] = e
            weight[t, j] = probs[t, e]
            mass += row[e]
    return idx, weight


def capacity_drop_reference(idx: torch.Tensor, weight: torch.Tensor, num_experts: int, capacity: int):
    """SPEC §1 capacity rule: rank 0 of every token first, then rank 1, ...; inside one rank the
    higher probability first (equal probabilities: lower token index first)."""
    T, K = idx.shape
    idx = idx.clone()
    weight = weight.detach().clone()
    used = [0] * num_experts
    for j in range(K):
        tokens = sorted(range(T), key=lambda t: (-float(weight[t, j]), t))
        for t in tokens:
            e = int(idx[t, j])
            if e < 0:
                continue
            if used[e] < capacity:
                used[e] += 1
            else:
                idx[t, j] = -1
                weight[t, j] = 0
    return idx, weight


def expert_ffn_reference(v, e, w1, b1, w3, b3, w2, b2, activation):
    """One expert on one vector: ``w2[e] @ (act(w1[e] v + b1[e]) * (w3[e] v + b3[e])) + b2[e]``."""
    hidden = w1[e] @ v
    if b1 is not None:
        hidden = hidden + b1[e]
    hidden = activation_fn(activation)(hidden)
    if w3 is not None:
        up = w3[e] @ v
        if b3 is not None:
            up = up + b3[e]
        hidden = hidden * up
    out = w2[e] @ hidden
    if b2 is not None:
        out = out + b2[e]
    return out


def moe_ffn_reference(x, idx, weight, w1, b1, w3, b3, w2, b2, activation: str, gate_input: bool):
    """``moefx::moe_ffn`` row by row and slot by slot (docs/ARCHITECTURE.md)."""
    N, K = idx.shape
    y = torch.zeros_like(x)
    for n in range(N):
        acc = torch.zeros_like(x[n])
        for j in range(K):
            e = int(idx[n, j])
            if e < 0:
                continue
            w = weight[n, j].to(x.dtype)
            if gate_input:
                acc = acc + expert_ffn_reference(w * x[n], e, w1, b1, w3, b3, w2, b2, activation)
            else:
                acc = acc + w * expert_ffn_reference(x[n], e, w1, b1, w3, b3, w2, b2, activation)
        y[n] = acc
    return y


def xmoe_capacity(num_tokens: int, num_experts: int, capacity_factor: Optional[float]) -> Optional[int]:
    """``C = max(ceil(T / E * γ), 4)`` slots per expert (SPEC §1); None when dropless."""
    if capacity_factor is None:
        return None
    return max(math.ceil(num_tokens / num_experts * capacity_factor), 4)


@torch.no_grad()
def xmoe_reference(layer, x: torch.Tensor) -> torch.Tensor:
    """A whole :class:`moefx.layers.XMoE` forward from its parameters, with loops (eval mode)."""
    cfg = layer.config
    shape = x.shape
    x2d = x.reshape(-1, shape[-1])
    rd = router_dtype(x.dtype)
    probs = torch.softmax(x2d.to(rd) @ layer.router.weight.to(rd).t(), dim=-1)
    threshold = cfg.threshold if cfg.threshold is not None else 0.0
    idx, weight = xmoe_select_reference(probs, threshold, cfg.top_k or 0, cfg.max_experts or 0)
    cap = xmoe_capacity(x2d.shape[0], cfg.num_experts, cfg.capacity_factor)
    if cap is not None:
        idx, weight = capacity_drop_reference(idx, weight, cfg.num_experts, cap)
    if layer.combine == "unit":
        weight = (idx >= 0).to(weight.dtype)
    y = moe_ffn_reference(
        x2d, idx, weight, layer.w1, layer.b1, layer.w3, layer.b3, layer.w2, None,
        layer.activation, False,
    )
    if cfg.num_shared:
        act = activation_fn(layer.activation)
        for n in range(x2d.shape[0]):
            hidden = layer.shared_w1 @ x2d[n]
            if layer.shared_b1 is not None:
                hidden = hidden + layer.shared_b1
            hidden = act(hidden)
            if layer.shared_w3 is not None:
                up = layer.shared_w3 @ x2d[n]
                if layer.shared_b3 is not None:
                    up = up + layer.shared_b3
                hidden = hidden * up
            y[n] = y[n] + layer.shared_w2 @ hidden
    if layer.bias is not None:
        y = y + layer.bias
    return y.reshape(shape)


@torch.no_grad()
def slicemoe_reference(layer, x: torch.Tensor) -> torch.Tensor:
    """A whole :class:`moefx.layers.SliceMoE` forward from its parameters, with loops (eval
    mode: no cross-slice dropout)."""
    cfg = layer.config
    shape = x.shape
    d = shape[-1]
    S = cfg.num_slices
    ds = d // S
    x2d = x.reshape(-1, d)
    y = torch.zeros_like(x2d)
    rd = router_dtype(x.dtype)
    lin1, lin2 = layer.router[0], layer.router[2]
    for t in range(x2d.shape[0]):
        for s in range(S):
            xs = x2d[t, s * ds:(s + 1) * ds]
            hidden = F.relu(lin1.weight.to(rd) @ xs.to(rd) + lin1.bias.to(rd))
            probs = torch.softmax(lin2.weight.to(rd) @ hidden + lin2.bias.to(rd), dim=-1)
            ranked = sorted(range(cfg.num_experts), key=lambda e: -float(probs[e]))[: cfg.top_k]
            total = sum(float(probs[e]) for e in ranked)
            out = torch.zeros_like(xs)
            for e in ranked:
                p = (probs[e] / total).to(x.dtype)
                if cfg.gate == "input":
                    out = out + expert_ffn_reference(
                        p * xs, e, layer.w1, layer.b1, layer.w3, layer.b3, layer.w2, layer.b2,
                        layer.activation,
                    )
                else:
                    out = out + p * expert_ffn_reference(
                        xs, e, layer.w1, layer.b1, layer.w3, layer.b3, layer.w2, layer.b2,
                        layer.activation,
                    )
            y[t, s * ds:(s + 1) * ds] = out
    return y.reshape(shape)
