"""Building an XMoE layer from a dense FFN and a neuron partition (SPEC.md §1, converted).

Routed expert ``e`` takes the rows of W1/b1 (and W3/b3 for a GLU) and the columns of W2 that
belong to partition row ``num_shared + e``; the shared rows become the always-on
``shared_*`` weights; padding slots stay zero (a zero neuron contributes exactly zero, for
every activation of SPEC.md since act(0) * 0 = 0 for GLUs and W2's zero column kills the rest).
The dense output bias b2 becomes the layer's ``bias``, added once. With ``combine="unit"`` and
every expert kept, the layer therefore computes the dense FFN up to summation order.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from ..config import XMoEConfig
from .dense import DenseFFN


def gather_rows(w: Optional[torch.Tensor], idx: torch.Tensor) -> Optional[torch.Tensor]:
    """``w[idx]`` with ``-1`` giving a zero row; ``idx`` any shape, result ``idx.shape + w.shape[1:]``."""
    if w is None:
        return None
    safe = idx.clamp(min=0)
    out = w[safe.flatten()].reshape(*idx.shape, *w.shape[1:]).clone()
    out[idx < 0] = 0
    return out


def xmoe_tensors(dense: DenseFFN, groups: torch.Tensor, num_shared: int) -> Dict[str, Optional[torch.Tensor]]:
    """The XMoE parameters (docs/ARCHITECTURE.md names) that reproduce ``dense``."""
    routed, shared = groups[num_shared:], groups[:num_shared]
    t = {
        "w1": gather_rows(dense.w1, routed),
        "b1": gather_rows(dense.b1, routed),
        "w3": gather_rows(dense.w3, routed),
        "b3": gather_rows(dense.b3, routed),
        "w2": gather_rows(dense.w2.t(), routed).transpose(1, 2).contiguous(),
        "bias": None if dense.b2 is None else dense.b2.clone(),
    }
    if num_shared:
        flat = shared.flatten()
        t.update(
            shared_w1=gather_rows(dense.w1, flat),
            shared_b1=gather_rows(dense.b1, flat),
            shared_w3=gather_rows(dense.w3, flat),
            shared_b3=gather_rows(dense.b3, flat),
            shared_w2=gather_rows(dense.w2.t(), flat).t().contiguous(),
        )
    return t


def centroid_router_weight(dense: DenseFFN, groups: torch.Tensor, num_shared: int) -> torch.Tensor:
    """MoEfication's training-free router: each routed expert's mean normalised W1 (gate) row.

    A token whose input aligns with an expert's neurons' input directions drives them hardest,
    so the dot product with their mean direction ranks experts without any data.
    """
    rows = torch.nn.functional.normalize(dense.w1.float(), dim=1)
    routed = groups[num_shared:]
    w = gather_rows(rows, routed)  # [E, h, d], zero rows for padding
    counts = (routed >= 0).sum(1).clamp(min=1).unsqueeze(-1)
    return w.sum(1) / counts


def build_xmoe(
    dense: DenseFFN,
    config: XMoEConfig,
    groups: torch.Tensor,
    path: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """A converted XMoE layer holding ``dense``'s weights as partitioned by ``groups``.

    The router starts as the centroid router for ``router="centroid"`` and ``"fitted"`` (which
    :func:`moefx.calibrate` then trains) and keeps its random init for ``"random"``."""
    config.validate_for(dense.d_model, dense.d_ff, path)
    has_bias = dense.b1 is not None or dense.b2 is not None or dense.b3 is not None
    from moefx.layers import XMoE

    layer = XMoE(config, dense.d_model, dense.d_ff, activation=dense.activation, glu=dense.glu,
                bias=has_bias, converted=True)
    tensors = xmoe_tensors(dense, groups, config.num_shared)
    if config.router != "random":  # "random" keeps the layer's fresh init (a baseline)
        tensors["router.weight"] = centroid_router_weight(dense, groups, config.num_shared)
    params = dict(layer.named_parameters())
    params.update(dict(layer.named_buffers()))
    with torch.no_grad():
        for name, p in params.items():
            src = tensors.get(name)
            if src is None and name == "router.weight":
                continue
            if src is None:
                if name in ("b1", "b3", "bias", "shared_b1", "shared_b3"):
                    p.zero_()
                    continue
                raise RuntimeError(f"XMoE layer parameter {name!r} has no source in the dense FFN{_at(path)}")
            if tuple(src.shape) != tuple(p.shape):
                raise RuntimeError(
                    f"XMoE layer parameter {name!r} has shape {tuple(p.shape)}, conversion produced "
                    f"{tuple(src.shape)}{_at(path)}: the layer does not follow docs/ARCHITECTURE.md"
                )
            p.copy_(src)
    layer.register_buffer("moefx_partition", groups.clone(), persistent=False)
    if dtype is not None:
        layer.to(dtype)
    return layer


def _at(path):
    return f" at '{path}'" if path else ""
