"""Routers for converted XMoE layers: centroid (no data) and fitted (trained on activations).

``router="centroid"`` is built at conversion (see ``init_xmoe.centroid_router_weight``).

``router="fitted"`` learns, from calibration inputs, which experts matter for a token. The
target is each expert's share of the output norm, ``q_e = ||E_e(x)|| / sum_f ||E_f(x)||``: the
oracle that the ANCHORS.md measurements rank by; calibration measures the norm, by default, in
the Fisher metric of the model's output (``calibrate.output_fisher``: what an expert's output
changes in the model's prediction, not its raw size). The router (the layer's own
``Linear(d, E, bias=False)``, so the layer contract is unchanged) is trained by cross-entropy
between ``softmax(logits)`` and ``q``, whose optimum puts logits at ``log q + c``: softmax mass
then concentrates on the experts with the largest outputs, which is what the threshold rule
reads. Finally :func:`calibrate_scale` multiplies the router weight by a scalar (a softmax
temperature) so that the configured threshold keeps the wanted fraction of experts on the
calibration tokens; ranking is unchanged, only how much mass the leaders hold.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .functional import CHUNK, SCALE_TOKENS, gram_matrix, kept_prefix, spaced, spd_solve


class LeastSquares:
    """The sums ``X^T X`` and ``X^T Y`` (float64) of a least-squares fit, accumulated over the
    token sets :meth:`add` is given: fitting on more tokens later costs only the new ones."""

    def __init__(self) -> None:
        self.gram: Optional[torch.Tensor] = None
        self.xty: Optional[torch.Tensor] = None
        self.tokens = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add the tokens ``x [T, in]`` with targets ``y [T, out]``: float32 products per
        :data:`CHUNK` tokens, summed in float64 (the routers' fit and the experts' refit): for 16384 tokens of 576
        features and 256 targets, 0.09 s instead of 0.22 s for float64 products, the sums the same
        to a relative 3e-7."""
        for s in range(0, x.shape[0], CHUNK):
            xb, yb = x[s : s + CHUNK].float(), y[s : s + CHUNK].float()
            gram, xty = gram_matrix(xb).double(), (xb.t() @ yb).double()
            self.gram = gram if self.gram is None else self.gram + gram
            self.xty = xty if self.xty is None else self.xty + xty
        self.tokens += x.shape[0]

    def solve(self, ridge: float = 1e-3) -> torch.Tensor:
        """``W [out, in]`` minimising ``|X W^T - Y|^2 + ridge * mean(diag X^T X) * |W|^2``."""
        gram = self.gram + ridge * float(self.gram.diagonal().mean()) * torch.eye(self.gram.shape[0], dtype=self.gram.dtype)
        return spd_solve(gram, self.xty).t()


def fit_router(
    layer,
    x2d: torch.Tensor,
    norms: torch.Tensor,
    steps: int = 100,
    lr: float = 3e-3,
    batch: int = 1024,
    seed: int = 0,
    sums: Optional[LeastSquares] = None,
) -> float:
    """Train ``layer.router`` on inputs ``x2d [T, d]`` and expert output norms ``[T, E]``.

    Returns the final mean cross-entropy. Initialised by least squares on ``log q``, so a
    hundred Adam steps suffice. ``sums``: the least-squares start is taken over the tokens of
    earlier calls given the same object as well as these (it accumulates them); the Adam steps
    see only these. With ``steps=0``, fitting on tokens A and then, with the same ``sums``, on
    tokens B gives the router a fit on A and B together at the cost of B alone.
    """
    gen = torch.Generator().manual_seed(seed)
    x = x2d.detach().float()
    norms = norms.detach().float()
    q = norms / norms.sum(-1, keepdim=True).clamp(min=1e-12)
    weight = layer.router.weight
    w = weight.detach().float().clone().requires_grad_(True)
    # Start from the closed-form least-squares fit of log q (centred per token), which is
    # most of the way there and costs one d x d solve; Adam then optimises the actual loss.
    with torch.no_grad():
        target = torch.log(q + 1e-4)
        target = target - target.mean(-1, keepdim=True)
        sums = LeastSquares() if sums is None else sums
        sums.add(x, target)
        w.copy_(sums.solve().float())
    opt = torch.optim.Adam([w], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    loss_val = float("nan")
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (min(batch, x.shape[0]),), generator=gen)
        logp = torch.log_softmax(F.linear(x[idx], w), dim=-1)
        loss = -(q[idx] * logp).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_val = float(loss.detach())
    with torch.no_grad():
        weight.copy_(w.to(weight.dtype))
    return loss_val


SCALE_ITERS = 24
"""Bisection steps of :func:`scale_for` on the log-scale interval [-12, 12]: the scale to a
relative 1.4e-6, far finer than the kept share on thousands of tokens can tell (40 steps cost
~8 s more over SmolLM2's calibration, probes and final rescale)."""


def calibrate_scale(
    layer, x2d: torch.Tensor, target_routed: float, iters: int = SCALE_ITERS
) -> float:
    """Scale the router weight so the threshold rule keeps ``target_routed`` of the routed
    experts on average over ``x2d``. Returns the scale applied.

    A larger scale sharpens the softmax, so fewer experts are needed to reach the threshold:
    the kept fraction decreases monotonically (up to ties) and a bisection on log-scale finds
    it. With a top-k config, or threshold 0 or 1, the count is fixed and nothing changes. A
    share above what the layer's threshold can keep lifts it first
    (:func:`moefx.convert.functional.threshold_for`).
    """
    from .functional import with_threshold

    cfg = layer.config = with_threshold(layer.config, target_routed)
    if cfg.top_k is not None or cfg.threshold in (0, 0.0, 1, 1.0):
        return 1.0
    x = spaced(x2d, SCALE_TOKENS).float()
    scale = scale_for(F.linear(x, layer.router.weight.float()), cfg, target_routed, iters)
    with torch.no_grad():
        layer.router.weight.mul_(scale)
    return scale


def scale_for(base: torch.Tensor, cfg, target_routed: float, iters: int = SCALE_ITERS) -> float:
    """The logit scale at which the threshold rule keeps ``target_routed`` of the routed
    experts on average over the logits ``base [T, E]`` (bisection on log-scale)."""
    if cfg.top_k is not None or cfg.threshold in (0, 0.0, 1, 1.0):
        return 1.0
    E = base.shape[-1]
    target = min(max(target_routed, 1.0 / E), 1.0)
    # A positive scale never changes the ranking, so the logits are sorted once and each
    # bisection step only applies select_mask's prefix rule (no sort or scatter per step).
    ranked = base.float().sort(dim=-1, descending=True).values
    lo, hi = -12.0, 12.0  # log-scale bounds: fraction(lo) ~ all, fraction(hi) ~ top-1
    for _ in range(iters):
        mid = (lo + hi) / 2
        frac = float(kept_prefix(torch.softmax(ranked * math.exp(mid), -1), cfg.threshold, cfg.max_experts).float().mean())
        if frac > target:
            lo = mid
        else:
            hi = mid
    return math.exp((lo + hi) / 2)
