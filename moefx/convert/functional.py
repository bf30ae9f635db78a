"""XMoE arithmetic on a layer's parameters, with an explicit expert mask.

Calibration needs what the layer's forward does not offer: the output with *every* expert
kept (the dense target of a freshly converted layer), each expert's own output (what a fitted
router learns to predict), and a forward differentiable in the expert weights under a fixed
selection. The experts' dense masked compute is the layer's own (``XMoE.all_expert_hidden``,
``XMoE.dense_masked_experts``, which it also trains through); the rest reads the parameters by
the names of docs/ARCHITECTURE.md and follows SPEC.md §1 exactly (the selection rule is
re-implemented vectorised; tests compare it with the layer's routing).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .dense import activation_fn


CHUNK = 4096
"""Tokens per chunk when a per-token computation runs over a layer's calibration tokens, and per
float32 product of a Gram matrix summed in float64 (the experts' refit, the routers' sums)."""


def select_mask(
    probs: torch.Tensor, threshold: Optional[float], top_k: Optional[int] = None, max_experts: Optional[int] = None
) -> torch.Tensor:
    """SPEC §1 selection as a boolean mask ``[T, E]``: the smallest descending prefix of
    experts whose probability mass reaches ``threshold`` (rank 0 always), or the top ``top_k``."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    if top_k:
        keep = torch.zeros_like(sorted_p, dtype=torch.bool)
        keep[:, :top_k] = True
    else:
        keep = kept_prefix(sorted_p, threshold, max_experts)
    mask = torch.zeros_like(keep)
    mask.scatter_(1, order, keep)
    return mask


def kept_prefix(sorted_p: torch.Tensor, threshold: float, max_experts: Optional[int] = None) -> torch.Tensor:
    """The threshold rule on probabilities already sorted descending per token: ``[T, E]`` bool,
    True for the ranks kept (mass before the rank below ``threshold``; rank 0 always; at most
    ``max_experts``)."""
    keep = (sorted_p.cumsum(-1) - sorted_p) < threshold
    keep[:, 0] = True
    if max_experts:
        keep[:, max_experts:] = False
    return keep


def router_probs(layer, x2d: torch.Tensor) -> torch.Tensor:
    return torch.softmax(F.linear(x2d.float(), layer.router.weight.float()), dim=-1)


def layer_mask(layer, x2d: torch.Tensor) -> torch.Tensor:
    cfg = layer.config
    return select_mask(router_probs(layer, x2d), cfg.threshold, cfg.top_k, cfg.max_experts)


def _p(layer, name):
    return getattr(layer, name, None)


def expert_hidden(layer, x2d: torch.Tensor) -> torch.Tensor:
    """Every routed expert's hidden activations: ``[T, E, h]`` (the layer's own
    :meth:`~moefx.layers.XMoE.all_expert_hidden`)."""
    return layer.all_expert_hidden(x2d)


def shared_hidden(layer, x2d: torch.Tensor) -> Optional[torch.Tensor]:
    w1 = _p(layer, "shared_w1")
    if w1 is None:
        return None
    act = activation_fn(layer.activation)
    h = act(F.linear(x2d, w1, _p(layer, "shared_b1")))
    w3 = _p(layer, "shared_w3")
    if w3 is not None:
        h = h * F.linear(x2d, w3, _p(layer, "shared_b3"))
    return h


def masked_forward(layer, x2d: torch.Tensor, mask: Optional[torch.Tensor] = None,
                   w2_flat: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``combine="unit"`` output with the routed experts chosen by ``mask`` (None: all);
    ``w2_flat``: the routed down projections as one ``[d, E * h]`` matrix (``XMoE.flat_w2``)."""
    gate = x2d.new_ones((x2d.shape[0], layer.config.num_experts)) if mask is None else mask
    y = layer.dense_masked_experts(x2d, gate, w2_flat)
    hs = shared_hidden(layer, x2d)
    if hs is not None:
        y = y + F.linear(hs, layer.shared_w2)
    if _p(layer, "bias") is not None:
        y = y + layer.bias
    return y


def gram_matrix(x: torch.Tensor, blocks: int = 4) -> torch.Tensor:
    """``x^T x`` (``x [T, n]``), its upper block triangle computed in ``blocks`` column blocks and
    mirrored: 10/16 of the products for 4 blocks. On a 2-core CPU a
    ``[4096, 1537]`` chunk (an XMoE refit's features) takes 0.10 s instead of 0.22 s. Narrow
    inputs (under 256 columns) take the one product."""
    n = x.shape[1]
    if n < 256 or blocks <= 1:
        return x.t() @ x
    cuts = [round(i * n / blocks) for i in range(blocks + 1)]
    g = x.new_empty(n, n)
    for a, b in zip(cuts, cuts[1:]):
        rows = x[:, a:b].t() @ x[:, a:]  # [b - a, n - a]: the diagonal block and the ones right of it
        g[a:b, a:] = rows
        g[b:, a:b] = rows[:, b - a:].t()
    return g


def spd_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a^-1 b`` for a symmetric positive definite ``a`` (a ridge-regularised Gram matrix):
    by Cholesky, about half the work of a general solve (on a 2-core CPU, an XMoE refit's
    ``[1537, 1537]`` float64 system with 576 right-hand sides: 0.09 s instead of 0.17 s); a
    general solve where the factorisation fails (``a`` not numerically positive definite)."""
    factor, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(b, factor)
    return torch.linalg.solve(a, b)


def expert_output_norms(layer, x2d: torch.Tensor, metric: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``||E_e(x)||`` for every token and routed expert: ``[T, E]`` (what an oracle ranks by).
    With ``metric`` (``[d, d]``, positive semi-definite), the norm is ``sqrt(y^T metric y)``."""
    h = expert_hidden(layer, x2d)
    # ||W2_e h_e||^2 = h_e^T (W2_e^T W2_e) h_e: one [h, h] Gram matrix per expert instead of
    # materialising every expert's [T, d] output (E small GEMMs; slow for many small experts).
    w2 = layer.w2.to(h.dtype)
    if metric is not None:
        gram = torch.einsum("edh,df,efk->ehk", w2, metric.to(h.dtype), w2)
    else:
        gram = torch.einsum("edh,edk->ehk", w2, w2)
    sq = (torch.einsum("teh,ehk->tek", h, gram) * h).sum(-1)
    return sq.clamp_min(0).sqrt()


def activation_ratio(mask: torch.Tensor, num_shared: int) -> float:
    """Fraction of the FFN's expert groups a token computes, shared groups included."""
    E = mask.shape[1]
    return float((mask.float().sum(1).mean() + num_shared) / (E + num_shared))


def routed_share(ratio: float, num_experts: int, num_shared: int) -> float:
    """The share of the routed experts a token must keep for the layer's activation ratio
    (shared groups included, as :func:`activation_ratio` counts) to be ``ratio``."""
    return (ratio * (num_experts + num_shared) - num_shared) / num_experts


THRESHOLD_HEADROOM = 0.02
"""A threshold ``t`` keeps at most about ``t`` of the routed experts (all probabilities equal),
and only near that when its router's softmax is nearly flat: a share above ``t - THRESHOLD_HEADROOM``
needs a higher threshold (:func:`threshold_for`)."""


def threshold_for(cfg, routed: float) -> Optional[float]:
    """The threshold a threshold-routed layer needs to keep ``routed`` of its routed experts on
    average: its own ``cfg.threshold``, or, where that cannot keep so many (above
    ``t - THRESHOLD_HEADROOM``), halfway from ``routed`` to 1 (at most 0.99). With its own
    threshold the default t = 0.9 reaches an activation ratio of about 0.92 with a fifth of the
    groups shared; per-layer budgets may ask more of the first layers, which cost the model
    most (bench/results-quality.md, eleventh session)."""
    t = cfg.threshold
    if cfg.top_k is not None or t is None or t in (0, 0.0, 1, 1.0) or routed <= t - THRESHOLD_HEADROOM:
        return t
    return max(t, min(0.99, routed + (1.0 - routed) / 2))


def with_threshold(cfg, routed: float):
    """``cfg`` with the threshold :func:`threshold_for` gives ``routed`` (itself when unchanged)."""
    import dataclasses

    t = threshold_for(cfg, routed)
    return cfg if t == cfg.threshold else dataclasses.replace(cfg, threshold=t)


SCALE_TOKENS = 8192
"""Tokens (evenly spaced) that a router's scale is set on, and that the layer report measures."""


def spaced(t: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` evenly spaced rows of ``t`` (all of them when it has ``n`` or fewer): the same rows
    for tensors of the same length, so an input and its target stay paired."""
    if t.shape[0] <= n:
        return t
    return t[torch.linspace(0, t.shape[0] - 1, n).long()]
