"""Layer-wise calibration of converted MoE layers against their dense FFNs.

Why layer-wise: a 135M model on 2 CPU cores cannot afford end-to-end training, but each FFN
is a small regression problem. One forward of the *dense* model (every converted XMoE layer
temporarily computing all its experts, which is exactly its dense FFN before calibration; a
SliceMoE layer running the dense teacher it keeps from conversion) records each layer's
input and its dense output, the fit's target. Then, one layer at a time, with only that layer's
activations loaded:

XMoE (``combine="unit"``):
  1. router: ``fitted`` routers are trained to predict each expert's output-norm share
     (router.py), the norm taken by default in the Fisher metric of the model's prediction
     (:func:`output_fisher`: one extra forward and backward pass); with ``target_ratio`` the
     router is rescaled so the configured threshold keeps that fraction of the FFN's expert
     groups (shared groups count as always kept); ``budgets=`` can instead spread the mean ratio unevenly over the layers by their
     measured error-vs-ratio curves (see ``budgets`` in :func:`calibrate`; uniform is the default).
  2. experts: under the routing now fixed, the down projections of all groups (and the
     output bias) are refit in closed form by ridge regression onto the dense output, the
     ridge pulling toward the converted weights. A dropped expert's contribution is partly
     re-expressed by the kept ones (a few percent of relative error on SmolLM2; see
     bench/results-quality.md). Optionally ``steps`` Adam steps then refine every expert
     weight (selection held fixed: it is not differentiable).
SliceMoE: ``steps`` Adam steps of the whole layer (router included: its probabilities gate
  the expert inputs, so it does get gradients) on the MSE to the dense output.

Memory: recorded inputs are spilled to a temporary directory once they exceed
``spill_bytes``, and read back one layer at a time. Nothing else of the model is copied.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
import warnings
from contextlib import contextmanager
from functools import partial
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..data import output_tensor
from .functional import (CHUNK, SCALE_TOKENS, activation_ratio, expert_hidden, expert_output_norms, layer_mask,
                         masked_forward, routed_share, select_mask, shared_hidden, spaced,
                         with_threshold)
from .replay import BlockReplay
from .rewrite import replace_forwards, restore_forwards, set_mode
from .router import LeastSquares, calibrate_scale, fit_router, scale_for


def is_xmoe(m: nn.Module) -> bool:
    return hasattr(m, "router") and hasattr(m, "w2") and hasattr(m, "config") and hasattr(m.config, "threshold")


def is_slicemoe(m: nn.Module) -> bool:
    return hasattr(m, "router") and hasattr(m, "w2") and hasattr(m, "config") and hasattr(m.config, "num_slices")


def moe_layers(model: nn.Module) -> Dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if is_xmoe(m) or is_slicemoe(m)}


def teacher_of(layer):
    """The dense FFN a SliceMoE layer was initialised from (kept by the rewrite pass)."""
    return getattr(layer, "moefx_teacher", None)


def dense_forward(layer, x: torch.Tensor) -> torch.Tensor:
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    teacher = teacher_of(layer)
    if teacher is not None:
        y = teacher(x2.float()).to(x.dtype)
    elif is_xmoe(layer):
        y = masked_forward(layer, x2, None)
    else:
        raise RuntimeError("a SliceMoE layer without its dense teacher cannot be calibrated")
    return y.reshape(shape)


@contextmanager
def dense_mode(layers: Dict[str, nn.Module]):
    """Run every converted layer as its dense FFN inside the block."""
    saved = replace_forwards(layers, {n: (lambda lyr: (lambda x, *a, **k: dense_forward(lyr, x)))(layer)
                                      for n, layer in layers.items()})
    try:
        yield
    finally:
        restore_forwards(layers, saved)


DENSE_OUT = "/dense"
"""Suffix of a layer's recorded dense outputs in the :class:`ActivationStore` (no module path
holds a ``/``)."""


class ActivationStore:
    """Per-layer recorded tensors, spilled to a temporary directory beyond ``spill_bytes``."""

    def __init__(self, names: List[str], spill_bytes: int):
        self.names = names
        self.spill_bytes = spill_bytes
        self.mem: Dict[str, List[torch.Tensor]] = {n: [] for n in names}
        self.files: Dict[str, List[str]] = {n: [] for n in names}
        self.bytes = 0
        self.dir: Optional[str] = None
        self.last_rows: Dict[str, int] = {}

    def add(self, name: str, t: torch.Tensor) -> None:
        t = t.detach().reshape(-1, t.shape[-1]).float().clone()
        self.last_rows[name] = t.shape[0]  # the tokens of the latest batch: the last rows of take()
        self.mem[name].append(t)
        self.bytes += t.numel() * 4
        if self.bytes > self.spill_bytes:
            self.spill()

    def spill(self) -> None:
        if self.dir is None:
            self.dir = tempfile.mkdtemp(prefix="moefx-calib-")
        for i, name in enumerate(self.names):
            if self.mem[name]:
                path = os.path.join(self.dir, f"{i}-{len(self.files[name])}.pt")
                torch.save(torch.cat(self.mem[name]), path)
                self.files[name].append(path)
                self.mem[name] = []
        self.bytes = 0

    def peek(self, name: str) -> torch.Tensor:
        """What :meth:`take` would return, left in the store (a first pass over the layers that a
        second will take again: nothing is written back to disk)."""
        parts = [torch.load(p, weights_only=True) for p in self.files[name]] + self.mem[name]
        return torch.cat(parts) if parts else torch.empty(0)

    def take(self, name: str) -> torch.Tensor:
        """The rows recorded for ``name`` (empty if no token reached the layer), removed from the store."""
        x = self.peek(name)
        self.bytes -= sum(t.numel() * 4 for t in self.mem[name])
        for p in self.files[name]:
            os.remove(p)
        self.files[name], self.mem[name] = [], []
        return x

    def close(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class Inputs:
    """One batch of model inputs: positional ``args`` and keyword ``kwargs``."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.args is None:
            self.args = ()
        elif not isinstance(self.args, (tuple, list)):
            self.args = (self.args,)
        self.args = tuple(self.args)
        self.kwargs = dict(self.kwargs or {})

    def tensors(self) -> List[torch.Tensor]:
        """The tensor inputs, positional first."""
        return [v for v in list(self.args) + list(self.kwargs.values()) if isinstance(v, torch.Tensor)]

    def rows(self) -> Optional[int]:
        """The batch size: the leading dimension of the first tensor input (None without one)."""
        t = self.tensors()
        return t[0].shape[0] if t and t[0].dim() else None

    @classmethod
    def of(cls, batch) -> "Inputs":
        """A tensor is the first positional input, a tuple the positional inputs, a dict the
        keyword inputs."""
        if isinstance(batch, Inputs):
            return batch
        if isinstance(batch, dict):
            return cls((), batch)
        if isinstance(batch, (tuple, list)):
            return cls(tuple(batch), {})
        return cls((batch,), {})


def run_batch(model: nn.Module, batch):
    b = Inputs.of(batch)
    return model(*b.args, **b.kwargs)


@dataclass
class LayerReport:
    name: str
    kind: str
    tokens: int
    rel_err_before: float
    cos_before: float
    ratio_before: float
    rel_err_after: float = float("nan")
    cos_after: float = float("nan")
    ratio_after: float = float("nan")
    seconds: float = 0.0
    ratio_model: float = float("nan")
    """Activation ratio in the converted model itself (its own inputs, after every layer is
    converted and any distillation), once :func:`rescale_in_model` has run; NaN otherwise."""

    @property
    def ratio(self) -> float:
        """The layer's activation ratio: in the converted model when measured there
        (``ratio_model``), else on the dense model's activations (``ratio_after``)."""
        return self.ratio_model if self.ratio_model == self.ratio_model else self.ratio_after


@dataclass
class CalibrationReport:
    layers: List[LayerReport] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0
    budgets: Dict[str, float] = field(default_factory=dict)
    distill: Optional["DistillReport"] = None  # noqa: F821  (moefx.convert.distill)
    rescale_text: str = ""
    """What the final rescale ran on: ``"held-out"`` (distillation batches nothing was fit or
    trained on) or ``"calibration"``; empty when it did not run."""

    def table(self) -> str:
        in_model = any(r.ratio_model == r.ratio_model for r in self.layers)  # any not NaN
        head = (f"{'layer':<28} {'kind':<8} {'relerr before':>13} {'after':>7} {'cos before':>10} "
                f"{'after':>7} {'act before':>10} {'after':>7}" + (f" {'in model':>8}" if in_model else ""))
        rows = [head, "-" * len(head)]
        for r in self.layers:
            rows.append(
                f"{r.name[-28:]:<28} {r.kind:<8} {r.rel_err_before:>13.4f} {r.rel_err_after:>7.4f} "
                f"{r.cos_before:>10.4f} {r.cos_after:>7.4f} {r.ratio_before:>10.3f} {r.ratio_after:>7.3f}"
                + (f" {r.ratio_model:>8.3f}" if in_model else "")
            )
        if self.layers:
            m = lambda a: sum(getattr(r, a) for r in self.layers) / len(self.layers)
            rows.append("-" * len(head))
            rows.append(
                f"{'mean':<28} {'':<8} {m('rel_err_before'):>13.4f} {m('rel_err_after'):>7.4f} "
                f"{m('cos_before'):>10.4f} {m('cos_after'):>7.4f} {m('ratio_before'):>10.3f} {m('ratio_after'):>7.3f}"
                + (f" {self.mean('ratio_model'):>8.3f}" if in_model else "")
            )
        rows.append(f"{len(self.layers)} layers, {self.tokens} tokens, {self.seconds:.1f} s"
                    + ("; 'in model': activation on the converted model's own inputs, after the final rescale"
                       + (f" (on {self.rescale_text} text)" if self.rescale_text else "") if in_model else ""))
        if self.distill is not None and self.distill.steps:
            rows.append(self.distill.line())
        return "\n".join(rows)

    def mean(self, attr: str) -> float:
        """Mean of ``attr`` over the layers that have it (NaN entries skipped; NaN if none)."""
        values = [getattr(r, attr) for r in self.layers]
        values = [v for v in values if v == v]
        return sum(values) / len(values) if values else float("nan")


def _errors(y: torch.Tensor, target: torch.Tensor):
    rel = float((y - target).norm() / target.norm().clamp(min=1e-12))
    cos = float(F.cosine_similarity(y.float(), target.float(), dim=-1).mean())
    return rel, cos


def chunked(fn, layer, x2d: torch.Tensor) -> torch.Tensor:
    """``fn(layer, rows)`` over ``x2d`` in chunks of :data:`CHUNK` rows, concatenated (bounds the
    memory of the [tokens, d_ff]-sized intermediates)."""
    return torch.cat([fn(layer, x2d[s : s + CHUNK]) for s in range(0, x2d.shape[0], CHUNK)])


def slicemoe_ratio(layer) -> float:
    """A SliceMoE layer's activation ratio, fixed by its config: its top-k experts' hidden width
    over the dense FFN's."""
    return min(1.0, layer.config.top_k * layer.config.hidden_for(layer.d_ff) / layer.d_ff)


def layer_output(layer, x2d: torch.Tensor):
    """The layer's output (inference semantics, computed by the plain-PyTorch functional forms
    that tests check against the layer's own forward) and its activation ratio on ``x2d``."""
    outs, ratios = [], []
    for s in range(0, x2d.shape[0], CHUNK):
        xb = x2d[s : s + CHUNK]
        if is_xmoe(layer):
            mask = layer_mask(layer, xb)
            if layer.combine == "unit" and layer.config.capacity_factor is None:
                outs.append(masked_forward(layer, xb, mask).float())
            else:
                outs.append(layer(xb.unsqueeze(0)).reshape(xb.shape[0], -1).float())
            ratios.append(activation_ratio(mask, layer.config.num_shared) * xb.shape[0])
        else:
            outs.append(slicemoe_forward(layer, xb).float())
            ratios.append(slicemoe_ratio(layer) * xb.shape[0])
    return torch.cat(outs), sum(ratios) / x2d.shape[0]


def refit_down(layer, x2d: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, ridge: float = 1.0) -> None:
    """Ridge-regress every group's down projection (and the output bias) onto ``target``
    with the routed hidden activations masked by the fixed selection ``mask``.

    The ridge pulls toward the *current* weights, not toward zero: with few calibration
    tokens (a 1.5k-feature regression on a few thousand tokens) an unanchored fit memorises
    the calibration text and generalises worse than no fit at all (measured on SmolLM2), while
    the anchored fit only moves the weights where the data insists."""
    from .functional import expert_hidden, shared_hidden, spd_solve

    E, h = layer.w1.shape[0], layer.w1.shape[1]
    has_shared = getattr(layer, "shared_w2", None) is not None
    has_bias = getattr(layer, "bias", None) is not None
    sums = LeastSquares()  # float32 products per CHUNK-token chunk, summed in float64
    with torch.no_grad():
        for s in range(0, x2d.shape[0], CHUNK):
            xb = x2d[s : s + CHUNK].float()
            feats = [(expert_hidden(layer, xb) * mask[s : s + CHUNK].float().unsqueeze(-1)).reshape(xb.shape[0], E * h)]
            if has_shared:
                feats.insert(0, shared_hidden(layer, xb))
            if has_bias:
                feats.append(torch.ones(xb.shape[0], 1))
            sums.add(torch.cat(feats, 1), target[s : s + CHUNK])
        gram, rhs = sums.gram, sums.xty
        prior = []
        if has_shared:
            prior.append(layer.shared_w2.detach().t())
        prior.append(layer.flat_w2().detach().t())
        if has_bias:
            prior.append(layer.bias.detach().reshape(1, -1))
        prior = torch.cat(prior).double()
        lam = ridge * float(gram.diagonal().mean())
        gram += lam * torch.eye(gram.shape[0], dtype=gram.dtype)
        rhs += lam * prior
        sol = spd_solve(gram, rhs)  # [features, d]
        off = 0
        if has_shared:
            hs = layer.shared_w2.shape[1]
            layer.shared_w2.copy_(sol[off : off + hs].t().to(layer.shared_w2.dtype))
            off += hs
        layer.set_flat_w2(sol[off : off + E * h].t())
        off += E * h
        if has_bias:
            layer.bias.copy_(sol[off].to(layer.bias.dtype))


def finetune(layer, x2d: torch.Tensor, target: torch.Tensor, steps: int, lr: float, batch: int = 1024, seed: int = 0) -> None:
    """Adam on the layer's expert weights (XMoE: selection fixed by the current router; SliceMoE:
    the whole layer), minimising the relative squared error to the dense output."""
    if steps <= 0:
        return
    gen = torch.Generator().manual_seed(seed)
    xmoe = is_xmoe(layer)
    params = [p for n, p in layer.named_parameters() if not (xmoe and n.startswith("router"))]
    was = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    denom = target.pow(2).mean()
    layer.train()
    try:
        for _ in range(steps):
            idx = torch.randint(0, x2d.shape[0], (min(batch, x2d.shape[0]),), generator=gen)
            xb, yb = x2d[idx], target[idx]
            if xmoe:
                with torch.no_grad():
                    mask = layer_mask(layer, xb)
                y = masked_forward(layer, xb, mask)
            else:
                y = slicemoe_forward(layer, xb)
            loss = (y.float() - yb).pow(2).mean() / denom
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    finally:
        layer.eval()
        for p, w in zip(params, was):
            p.requires_grad_(w)
            p.grad = None


def slicemoe_forward(layer, x2d: torch.Tensor) -> torch.Tensor:
    """SliceMoE forward in plain differentiable PyTorch (SPEC §2, eval semantics: no slice
    dropout), one expert at a time over the rows routed to it. Calibration trains through
    this rather than the layer's custom op so that training cost is a few GEMMs per expert."""
    from .dense import activation_fn

    cfg = layer.config
    slices = x2d.reshape(-1, layer.slice_dim)
    probs = layer.router_probs(slices)
    top_p, top_i = probs.topk(cfg.top_k, dim=-1)
    weight = (top_p / top_p.sum(-1, keepdim=True)).to(slices.dtype)
    act = activation_fn(layer.activation)
    out = torch.zeros_like(slices)
    for e in range(cfg.num_experts):
        rows, slot = (top_i == e).nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        w = weight[rows, slot].unsqueeze(-1)
        v = slices[rows] * w if cfg.gate == "input" else slices[rows]
        h = act(F.linear(v, layer.w1[e], layer.b1[e]))
        if layer.w3 is not None:
            h = h * F.linear(v, layer.w3[e], layer.b3[e])
        y = F.linear(h, layer.w2[e], layer.b2[e])
        if cfg.gate != "input":
            y = y * w
        out = out.index_add(0, rows, y)
    return out.reshape(x2d.shape)


FIT_TOKENS = 16384
"""Most tokens (evenly spaced) an XMoE layer's experts are refit on; its router fits on all the
calibration tokens (SmolLM2: routers fit on 16k tokens instead of 4k cut their held-out error
by 6-12%; the experts' ridge refit costs twice the router's time per token)."""

REPORT_TOKENS = 2048
"""Tokens (evenly spaced) a layer's report measures its errors on; its activation ratios are
measured on the :data:`SCALE_TOKENS` its scale is set on (they need only the router). On
SmolLM2 the errors on 8192 tokens cost 36 s of the 10-minute budget; on 2048, and the ratios
from the router alone, ~13 s."""


def report_ratio(layer, x2d: torch.Tensor) -> float:
    """The layer's activation ratio on (at most :data:`SCALE_TOKENS` evenly spaced of) ``x2d``,
    the tokens :func:`calibrate_scale` sets its scale on."""
    if not is_xmoe(layer):
        return slicemoe_ratio(layer)
    with torch.no_grad():
        return activation_ratio(chunked(layer_mask, layer, spaced(x2d, SCALE_TOKENS)), layer.config.num_shared)


def calibrate_layer(
    layer,
    x2d: torch.Tensor,
    target: torch.Tensor,
    *,
    target_ratio: Optional[float] = None,
    fit_router: Optional[bool] = None,
    fit_experts: bool = True,
    router_steps: int = 0,
    steps: int = 0,
    lr: Optional[float] = None,
    ridge: float = 1.0,
    batch: int = 1024,
    name: str = "",
    router_x: Optional[torch.Tensor] = None,
    metric: Optional[torch.Tensor] = None,
    router_sums: Optional[LeastSquares] = None,
) -> LayerReport:
    """Fit one converted layer to ``target``, its dense FFN's output on ``x2d``: the router (on
    ``router_x`` if given, a superset of ``x2d``'s tokens: a router fits better on more tokens,
    and needs no dense output; with ``router_sums``, on those tokens and the ones the sums
    already hold, :func:`moefx.convert.router.fit_router`; ranking experts by their output norms
    in ``metric`` if given, e.g. :func:`output_fisher`'s), its scale for ``target_ratio``, then
    the experts."""
    t0 = time.perf_counter()
    x2d = x2d.float()
    target = target.float()
    xs, ts = spaced(x2d, REPORT_TOKENS), spaced(target, REPORT_TOKENS)
    with torch.no_grad():
        y0 = layer_output(layer, xs)[0]
    tokens = x2d.shape[0] if router_x is None else router_x.shape[0]
    rep = LayerReport(name, "xmoe" if is_xmoe(layer) else "slicemoe", tokens, *_errors(y0, ts),
                      report_ratio(layer, x2d))
    if is_xmoe(layer):
        cfg = layer.config
        if fit_router is None:
            fit_router = cfg.router == "fitted"
        if fit_router:
            xr = x2d if router_x is None else router_x.float()
            with torch.no_grad():
                norms = chunked(partial(expert_output_norms, metric=metric), layer, xr)
            _fit(layer, xr, norms, router_steps, router_sums)
            del xr
            if router_sums is not None:
                rep.tokens = router_sums.tokens
        if target_ratio is not None:
            calibrate_scale(layer, x2d, routed_share(target_ratio, cfg.num_experts, cfg.num_shared))
        if fit_experts:
            with torch.no_grad():
                mask = chunked(layer_mask, layer, x2d)
            refit_down(layer, x2d, target, mask, ridge=ridge)
            finetune(layer, x2d, target, steps, lr or 1e-4, batch=batch)
    elif fit_experts:
        finetune(layer, x2d, target, steps or 200, lr or 1e-3, batch=batch)
    with torch.no_grad():
        y1 = layer_output(layer, xs)[0]
    rep.rel_err_after, rep.cos_after = _errors(y1, ts)
    rep.ratio_after = report_ratio(layer, x2d)
    rep.seconds = time.perf_counter() - t0
    return rep


TRAIN_COST = {"experts": 3.0, "blocks": 3.0, "blocks-down": 2.8}
"""A distillation step (forward and backward of the student) costs about this many teacher
forwards of the same tokens, by what it trains (SmolLM2, ``blocks``: 4.7 s against 1.5 s for
512 tokens; 5.5 s against 1.75 s on a slower day; ``blocks-down`` skips two of a GLU layer's
nine products: 3.76 s against 4.07 s, steady state, alternating in one process). Fresh teacher
batches are recorded while the time left trains each example once at this cost
(:func:`moefx.convert.distill.worth_recording`)."""
BFLOAT16_STEP = 0.67
"""A distillation step under bfloat16 autocast costs about this fraction of a float32 one (the
teacher forward stays float32): on a 2-core Sapphire Rapids CPU (AMX), SmolLM2 ``blocks``
1.25 s against 1.88 s, 0.61 s a teacher forward (bench/results-quality.md, eighteenth session)."""


def split_rows(inputs: "Inputs", target, rows: Optional[int]) -> list:
    """``(inputs, target)`` cut along the batch dimension into pieces of ``rows`` rows, when every
    tensor input and the target share that leading dimension (else, or for ``rows=None``, whole)."""
    from .distill import Target

    parts = (target.values, target.index, target.dense)
    n = inputs.rows()
    if rows is None or n is None or n <= rows:
        return [(inputs, target)]
    if any(t.dim() == 0 or t.shape[0] != n for t in inputs.tensors() + [p for p in parts if p is not None]):
        return [(inputs, target)]

    def cut(v, s):
        return v[s : s + rows].clone() if isinstance(v, torch.Tensor) else v

    return [(Inputs(tuple(cut(a, s) for a in inputs.args), {k: cut(v, s) for k, v in inputs.kwargs.items()}),
             Target(*(cut(p, s) if p is not None else None for p in parts)))
            for s in range(0, n, rows)]


def batch_key(inputs: "Inputs") -> tuple:
    """A content key of one batch (shapes and bytes of its tensors), to skip a distillation
    batch whose teacher output the calibration pass already recorded."""
    def key(v):
        if isinstance(v, torch.Tensor):
            return ("t", tuple(v.shape), str(v.dtype), hash(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()))
        return ("v", repr(v))
    return (tuple(key(a) for a in inputs.args), tuple((k, key(v)) for k, v in sorted(inputs.kwargs.items())))


@contextmanager
def swapped_weights(layers: Dict[str, nn.Module], originals: Dict[str, List[torch.Tensor]]):
    """The converted layers with their weights from before calibration (``originals``, in
    ``parameters()`` order); the calibrated ones back on exit. (A SliceMoE layer's dense mode
    runs its teacher, which calibration keeps until the recording is done.)"""
    saved = {}
    try:
        for n, layer in layers.items():
            params = list(layer.parameters())
            saved[n] = [p.data for p in params]
            for p, o in zip(params, originals[n]):
                p.data = o
        yield
    finally:
        for n, data in saved.items():
            for p, d in zip(layers[n].parameters(), data):
                p.data = d


def drop_teacher(layer, fitted: bool) -> None:
    """Free a calibrated SliceMoE layer's dense teacher (not part of the converted model)."""
    if fitted and teacher_of(layer) is not None:
        layer.moefx_teacher = None


DISTILL_TOPK = 1024
"""Words of the teacher's distribution a distillation target keeps per token (the rest is one
bucket, :func:`moefx.convert.distill.sparse_kl`). On SmolLM2 (49k words, 75%, the same 72 steps
on the same examples) 1024 instead of 64 gave 1.0926x dense perplexity against 1.0966x and a
1.8% lower KL divergence from the dense model on the evaluation text; recording costs 0.09 s
more per 512 tokens, a training step nothing measurable (bench/results-quality.md, fourteenth
and fifteenth sessions). 4 MB per 512-token example (values float32, word indices int32)."""

DISTILL_RESERVE_S = 10.0
"""Seconds of ``budget_seconds`` kept back for what follows the last distillation step (the
held-out scoring, putting the model back)."""

BUDGET_MODES = ("uniform", "model", "relative", "absolute", "inverse")
BUDGET_GRID = tuple(round(0.05 * i, 2) for i in range(2, 21))


CURVE_TOKENS = 1024
"""Tokens (evenly spaced) a layer's error curve is measured on."""


def error_curve(layer, x2d: torch.Tensor, target: torch.Tensor, grid=BUDGET_GRID, max_tokens: int = CURVE_TOKENS):
    """Relative squared output error of an XMoE layer (current router, rescaled, no refit) at
    each activation ratio of ``grid``: ``(achieved ratios, errors)``, ascending in ratio.

    Why: layers differ a lot in how much they lose when routed (middle layers of SmolLM2 lose
    2-3x more than the first and last at the same ratio), so a global budget is better spent
    unevenly; this curve is what :func:`allocate_budgets` trades on. Measured on at most
    ``max_tokens`` evenly spaced tokens; the router weight is left unchanged."""
    cfg = layer.config
    E, S = cfg.num_experts, cfg.num_shared
    x2d, target = spaced(x2d, max_tokens).float(), spaced(target, max_tokens).float()
    with torch.no_grad():
        h = expert_hidden(layer, x2d)
        base_y = torch.zeros_like(target)
        hs = shared_hidden(layer, x2d)
        if hs is not None:
            base_y = base_y + F.linear(hs, layer.shared_w2)
        if getattr(layer, "bias", None) is not None:
            base_y = base_y + layer.bias
        logits = F.linear(x2d, layer.router.weight.float())
        denom = float(target.pow(2).sum().clamp(min=1e-12))
        points = {}
        for r in grid:
            routed = routed_share(r, E, S)
            if routed < 1.0 / E - 1e-9:
                continue
            c = with_threshold(cfg, routed)
            scale = scale_for(logits, c, routed)
            mask = select_mask(torch.softmax(logits * scale, -1), c.threshold, c.top_k, c.max_experts)
            y = base_y + torch.einsum("teh,edh->td", h * mask.unsqueeze(-1).to(h.dtype), layer.w2)
            got = activation_ratio(mask, S)
            points[round(got, 4)] = float((y - target).pow(2).sum()) / denom
    rs = sorted(points)
    errs = [points[r] for r in rs]
    for i in range(len(errs) - 2, -1, -1):  # more compute never hurts: monotone envelope
        errs[i] = max(errs[i], errs[i + 1])
    return rs, errs


PROBE_TOKENS = 512
"""Calibration tokens ``budgets="model"``'s probes run the model on (:func:`model_curves`):
whole rows spread evenly over the last calibration batch (:func:`probe_rows`), which the routers
are first fit without. On SmolLM2, 512 tokens (82 s for 30 layers) did as well as 1024 (181 s),
and left distillation 71 steps instead of 50 (1.14x against 1.15x dense perplexity at 75%).
256 tokens (36 s) moved 7 of the 30 budgets by 0.05-0.1, and the layer-wise fit at those
budgets scored 1.172x dense perplexity instead of 1.156x before distillation (8192 tokens,
bench/results-quality.md, fifteenth session): more than the ~9 steps the 45 s would buy."""
PROBE_SCALE_TOKENS = 2048
"""Recorded inputs per layer (evenly spaced) that the probes' router scales are set on."""
MODEL_SPREAD = 0.15
"""``budgets="model"``: each layer's ratio stays within the mean target +- this unless told
(and at most :data:`MODEL_CAP`). 0.2 did no better on SmolLM2 at 75% (1.12x and 1.15x in two
runs, against 1.14-1.16x in three with 0.15; on 8192 tokens 1.104x against 1.104-1.108x;
bench/results-quality.md, eleventh session)."""
MODEL_CAP = 0.95
"""``budgets="model"``: the most any one layer gets (its threshold is lifted to reach it,
:func:`moefx.convert.functional.threshold_for`); 1.0 would leave a layer dense."""


def probe_rows(batches: List, max_tokens: Optional[int] = None) -> List["Inputs"]:
    """About ``max_tokens`` (default :data:`PROBE_TOKENS`) tokens of ``batches`` as single rows
    spread evenly over all of them."""
    max_tokens = PROBE_TOKENS if max_tokens is None else max_tokens
    rows = [p for b in batches for p in _pieces(b, 1)]
    if not rows:
        return []
    per_row = max(1, batch_tokens(rows[0]))  # a piece of one row
    n = min(len(rows), max(1, math.ceil(max_tokens / per_row)))
    return [rows[round(i * (len(rows) - 1) / max(1, n - 1))] for i in range(n)] if n > 1 else rows[:1]


def probe_loss(out, ref) -> float:
    """How far a model output is from the dense model's on the same inputs, summed over its
    tokens: the KL divergence ``KL(dense || model)`` for logits (``ref``: the dense
    log-probabilities and probabilities, :func:`_reference`), the squared error for a plain
    tensor (``ref``: the dense output)."""
    t, is_logits = output_tensor(out)
    t = t.float()
    if is_logits:
        lp_dense, p_dense = ref
        lp = torch.log_softmax(t.reshape(-1, t.shape[-1]), -1)
        # sum p (log p - log q), in place on the fresh log q: the dense probabilities come
        # computed once per probe row, not once per probe (three passes over [T, vocab] saved)
        return float(torch.sub(lp_dense, lp, out=lp).mul_(p_dense).sum())
    return float((t - ref).pow(2).sum())


def _reference(out):
    """The dense output a probe is compared with, and what the probe's costs are divided by:
    log-probabilities with their probabilities and the token count for logits, the tensor and
    its squared norm otherwise."""
    t, is_logits = output_tensor(out)
    t = t.float()
    if is_logits:  # float32: the KL of a well-fitted layer (1e-3 per token) is below float16's rounding of log p
        lp = torch.log_softmax(t.reshape(-1, t.shape[-1]), -1)
        return (lp, lp.exp()), math.prod(t.shape[:-1])
    return t, float(t.pow(2).sum().clamp(min=1e-12))


def model_curves(model: nn.Module, layers: Dict[str, nn.Module], probe: List, inputs: Dict[str, torch.Tensor],
                 target: float, spread: float, progress: bool = False, replay: bool = True) -> Dict[str, tuple]:
    """Each threshold-routed XMoE layer's cost curve in the model's own output, for ``budgets="model"``.

    For every layer alone (all the others computing their dense FFN), its router is rescaled to
    activation ratios ``target - spread`` and ``target + spread`` and the model is run on the
    ``probe`` inputs (a list, e.g. :func:`probe_rows`): the cost is the mean KL divergence per
    token from the all-dense output (:func:`probe_loss`; for a plain tensor output, its relative
    squared error). Between and at the two points the curve is log-linear (on SmolLM2, measured
    at five ratios from 0.55 to 0.95, log KL falls close to linearly in the ratio, with slopes
    from -5 to -9 per unit of ratio), sampled every 0.05 for :func:`allocate_budgets`:
    ``{name: (ratios, costs)}``. ``inputs`` holds each layer's recorded calibration inputs, on
    which the probes' scales are set (so the ratios are those the layer keeps on calibration
    text); the router weights are left as they were.

    Why not a per-layer error: SmolLM2's first eight FFNs cost the most KL at a given ratio
    (layer 0 at 0.75: 0.042; layers 12-22: 0.004-0.006) although their relative output errors
    are among the smallest, and the end-to-end cost follows neither the relative error nor its
    first-order (Fisher) estimate (bench/results-quality.md, tenth session).

    With ``replay`` (the default), the blocks before the probed layer's (transformer layers)
    are not recomputed: they return what they computed in the reference run
    (:class:`moefx.convert.replay.BlockReplay`), which is what they would compute again. The
    curves are the same; on SmolLM2 the probes take ~30% less time."""
    from tqdm.auto import tqdm

    replay = BlockReplay(model, inputs if replay else ())
    refs = []
    with torch.no_grad(), dense_mode(layers):
        for i, p in enumerate(probe):
            with replay.recording(i):
                refs.append(_reference(run_batch(model, p)))
    total = sum(r[1] for r in refs)

    def cost(name: str) -> float:
        loss = 0.0
        for i, (p, (ref, _)) in enumerate(zip(probe, refs)):
            with replay.replaying(i, name):  # the blocks before this layer's: as in the reference run
                loss += probe_loss(run_batch(model, p), ref)
        return loss / total

    curves = {}
    with torch.no_grad():
        for name in tqdm(list(inputs), desc="measuring each layer's cost in the model", disable=not progress):
            layer = layers[name]
            cfg = layer.config
            E, S = cfg.num_experts, cfg.num_shared
            weight = layer.router.weight.detach().clone()
            logits = F.linear(inputs[name].float(), weight.float())
            points = []
            others = {n: l for n, l in layers.items() if n != name}
            try:
                for r in (max(target - spread, 0.0), min(target + spread, MODEL_CAP)):
                    routed = max(routed_share(r, E, S), 0.0)
                    c = layer.config = with_threshold(cfg, routed)
                    scale = scale_for(logits, c, routed)
                    got = activation_ratio(select_mask(torch.softmax(logits * scale, -1), c.threshold,
                                                       c.top_k, c.max_experts), S)
                    layer.router.weight.copy_(weight * scale)
                    with dense_mode(others):
                        points.append((got, max(cost(name), 1e-12)))
            finally:
                layer.router.weight.copy_(weight)
                layer.config = cfg
            (r0, c0), (r1, c1) = points
            if r1 - r0 < 0.025:  # the two probes kept the same share: nothing to trade
                curves[name] = ([r0], [c0])
                continue
            n = max(1, round((r1 - r0) / 0.05))
            rs = [r0 + (r1 - r0) * i / n for i in range(n + 1)]
            costs = [math.exp(math.log(c0) + (math.log(c1) - math.log(c0)) * (r - r0) / (r1 - r0)) for r in rs]
            for i in range(len(costs) - 2, -1, -1):  # more compute never hurts: monotone envelope
                costs[i] = max(costs[i], costs[i + 1])
            curves[name] = (rs, costs)
    return curves


FISHER_TOKENS = 2048
"""Calibration tokens :func:`output_fisher` runs its forward and backward pass on."""
ROUTER_TARGETS = ("fisher", "norm")


def output_fisher(model: nn.Module, layers: Dict[str, nn.Module], batches: List,
                  max_tokens: int = FISHER_TOKENS, seed: int = 0, progress: bool = False) -> Dict[str, torch.Tensor]:
    """For each layer, ``G = mean_t g_t g_t^T`` (``[d, d]``), ``g_t`` the gradient at the
    layer's output (token ``t``) of the model's log-likelihood of a word *sampled from the
    model itself*: the Fisher information of the model's output distribution with respect to
    the layer's output. A change ``e`` of the layer's output then costs about ``e^T G e / 2``
    of KL divergence at the model's output (to first order through the layers after it), the
    quantity distillation minimises; a plain norm ``e^T e`` counts every direction alike,
    including those the rest of the model ignores. For an output that is a plain tensor (no
    ``.logits``), ``g_t`` is the gradient of ``<output, v>`` with a standard normal ``v``, so
    ``E[g g^T] = J^T J``: the squared error at the output. One forward and backward of the
    model on the first ``max_tokens`` tokens of ``batches``, in the mode the model is in (use
    inside :func:`dense_mode` for the dense model's); no weight gradient is computed or left."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    sums = {n: None for n in layers}
    counts = {n: 0 for n in layers}

    def capture(name):
        def grad_hook(g):
            g2 = g.detach().reshape(-1, g.shape[-1]).double()
            sums[name] = g2.t() @ g2 if sums[name] is None else sums[name] + g2.t() @ g2
            counts[name] += g2.shape[0]

        def hook(mod, args, out):
            if not isinstance(out, torch.Tensor) or not out.is_floating_point():
                return None
            if not out.requires_grad:  # the first layer: a leaf every later gradient reaches
                out = out.detach().requires_grad_(True)
            out.register_hook(grad_hook)
            return out
        return hook

    flags = {p: p.requires_grad for p in model.parameters()}
    hooks = [layer.register_forward_hook(capture(n)) for n, layer in layers.items()]
    seen = 0
    bar = tqdm(total=max_tokens, desc="measuring what layer outputs change in the prediction", unit="tok",
               disable=not progress)
    try:
        for p in flags:  # gradients at the layers' outputs only: no weight gradient computed or left
            p.requires_grad_(False)
        with torch.enable_grad():
            for b in (piece for batch in batches for piece in _pieces(batch, max_tokens)):
                if seen >= max_tokens:
                    break
                t, is_logits = output_tensor(run_batch(model, b))
                if not t.requires_grad:
                    raise ValueError("output_fisher: the model's output does not depend on its converted layers")
                t = t.float()
                if is_logits:
                    flat = t.reshape(-1, t.shape[-1])
                    with torch.no_grad():
                        words = sample_rows(torch.softmax(flat, -1), gen)
                    loss = F.cross_entropy(flat, words, reduction="sum")
                else:
                    loss = (t * torch.randn(t.shape, generator=gen)).sum()
                loss.backward()
                n = int(math.prod(t.shape[:-1]))
                seen += n
                bar.update(min(n, max_tokens - bar.n))
    finally:
        bar.close()
        for h in hooks:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return {n: (s / counts[n]).float() for n, s in sums.items() if s is not None}


def sample_rows(probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One index per row of ``probs [T, V]`` (rows summing to ~1), drawn with those
    probabilities: the first index whose running sum passes a uniform draw. The same
    distribution as ``torch.multinomial(probs, 1)``, which on a 2-core CPU takes 3.0 s for
    SmolLM2's 2048 x 49152 probabilities where this takes 0.06 s. ``probs`` is overwritten."""
    cdf = probs.cumsum_(-1)
    u = torch.rand(cdf.shape[0], 1, generator=gen, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_max_(cdf.shape[-1] - 1)


def batch_tokens(batch) -> int:
    """The tokens (positions) of one batch: its first tensor input's size without the feature
    dimension of a float input (``[rows, seq]`` ids or ``[rows, seq, d]`` embeddings)."""
    t = Inputs.of(batch).tensors()
    if not t:
        return 0
    shape = t[0].shape[:-1] if t[0].is_floating_point() else t[0].shape
    return int(math.prod(shape))


def _pieces(batch, max_tokens: int) -> List["Inputs"]:
    """``batch`` cut along its batch dimension into pieces of at most ``max_tokens`` tokens (a
    backward pass holds every layer's activations: a user's large batch must not run whole)."""
    from .distill import Target

    inputs = Inputs.of(batch)
    rows = inputs.rows()
    if not rows:  # no tensor input, or a 0-d one: nothing to cut along
        return [inputs]
    per_row = max(1, batch_tokens(inputs) // rows)
    return [i for i, _ in split_rows(inputs, Target(), max(1, max_tokens // per_row))]


def allocate_budgets(curves: Dict[str, tuple], target: float, spread: Optional[float] = None) -> Dict[str, float]:
    """Per-layer activation ratios whose mean is ``target`` (to within one grid step over the
    number of layers; the last step is cut to hit it), chosen greedily: every layer starts at its smallest ratio and the budget
    goes, step by step, to the layer whose error falls most per unit of ratio. Each layer's
    error is relative (scale-free), so every layer counts alike.

    If ``target`` is below what the smallest ratios allow, every layer gets its smallest.
    ``spread`` keeps every layer within ``target +- spread`` (its nearest point if none is)."""
    names = list(curves)
    if not names:
        return {}
    if spread is not None:
        kept = {}
        for n in names:
            rs, es = curves[n]
            idx = [i for i, r in enumerate(rs) if abs(r - target) <= spread + 1e-9]
            if not idx:
                idx = [min(range(len(rs)), key=lambda i: abs(rs[i] - target))]
            kept[n] = ([rs[i] for i in idx], [es[i] for i in idx])
        curves = kept
    pos = {n: 0 for n in names}
    last = None
    ratio = lambda n: curves[n][0][pos[n]]
    total = target * len(names)
    while sum(ratio(n) for n in names) < total - 1e-9:
        best, gain = None, -1.0
        for n in names:
            rs, es = curves[n]
            i = pos[n]
            if i + 1 >= len(rs):
                continue
            g = (es[i] - es[i + 1]) / max(rs[i + 1] - rs[i], 1e-9)
            if g > gain:
                best, gain = n, g
        if best is None:
            break
        pos[best] += 1
        last = best
    out = {n: ratio(n) for n in names}
    excess = sum(out.values()) - total
    if excess > 1e-9 and last is not None:  # the last step overshot: take back the excess
        out[last] = max(curves[last][0][pos[last] - 1], out[last] - excess)
    return out


RESCALE_TOKENS = 2048
"""Tokens the final in-model rescale (:func:`rescale_in_model`) runs on: held-out distillation
batches where there are that many, else calibration batches (:func:`calibrate`)."""
RESCALE_COST = 1.3
"""The final rescale over that many tokens (a forward of the converted model through the masked
dense path, then each layer's scale), in units of the dense recording pass's time per token,
kept back from the distillation budget (SmolLM2, 256 + 64 experts: 8 s for 2048 tokens, where
the dense pass took 6-8 s per 2048)."""


def rescale_in_model(model: nn.Module, layers: Dict[str, nn.Module], ratios: Dict[str, Optional[float]],
                     batches: List, max_tokens: int = RESCALE_TOKENS) -> Dict[str, float]:
    """Set each threshold-routed XMoE layer's softmax scale so that it keeps its activation
    ratio (``ratios[name]``, shared groups included) on the inputs it gets *in the converted
    model*, and return the ratio each layer then keeps there.

    Why: the layer-wise fit sets the scale on the dense model's activations. In the converted
    model every layer sees inputs already changed by the converted layers before it, and
    distillation that trains the blocks moves them further. On SmolLM2 (256 + 64 experts,
    distilled) the converted model kept 0.478 where 0.500 was asked (0.749 for 0.750 at 75%).
    One forward of ``max_tokens`` tokens of ``batches`` records every layer's inputs; a
    layer's new scale changes the inputs of the layers after it only slightly, so one pass is
    enough (the returned ratios are those of that pass, before the later layers' inputs shifted)."""
    inputs: Dict[str, List[torch.Tensor]] = {}
    todo = {n: l for n, l in layers.items() if is_xmoe(l) and ratios.get(n) is not None
            and l.config.top_k is None and l.config.threshold not in (0, 1)}
    if not todo or not batches:
        return {}

    def hook(name):
        def record(mod, args):
            inputs.setdefault(name, []).append(args[0].detach().reshape(-1, mod.d_model).float())
        return record

    from .distill import _xmoe_train_forward, masked_layers

    # the same outputs through the masked dense path: on a CPU, experts of a few neurons run it
    # 2-3x faster than the grouped op (SmolLM2, 256 + 64 experts, 2048 tokens: 5.9 s, not 13-20 s)
    masked = {n: layers[n] for n in masked_layers(layers)}
    saved = replace_forwards(masked, {n: _xmoe_train_forward(layer) for n, layer in masked.items()})
    hooks = [layer.register_forward_pre_hook(hook(n)) for n, layer in todo.items()]
    seen = 0
    try:
        with torch.no_grad():
            for b in batches:
                if seen >= max_tokens:
                    break
                run_batch(model, b)
                seen = sum(t.shape[0] for t in next(iter(inputs.values()), []))
    finally:
        for h in hooks:
            h.remove()
        restore_forwards(masked, saved)
    kept = {}
    for name, layer in todo.items():
        if name not in inputs:
            continue
        x = torch.cat(inputs.pop(name))
        cfg = layer.config
        calibrate_scale(layer, x, routed_share(ratios[name], cfg.num_experts, cfg.num_shared))
        with torch.no_grad():
            kept[name] = activation_ratio(layer_mask(layer, x), cfg.num_shared)
    return kept


def _fit(layer, x2d, norms, steps, sums=None):
    fit_router(layer, x2d, norms, steps=steps, sums=sums)


LOW_PRECISION = (torch.float16, torch.bfloat16)


class float32_weights:
    """Cast a model's float16/bfloat16 parameters and buffers to float32 in place (``.data``, so
    every Parameter keeps its identity and ties); calling the object casts each back to its own
    dtype. Calibration solves least-squares systems and takes Adam steps that half precision
    cannot hold; float32 buffers of a half model (RoPE frequencies) are left as they are."""

    def __init__(self, model: nn.Module) -> None:
        self._changed = []
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                if t.dtype in LOW_PRECISION:
                    self._changed.append((t, t.dtype))
                    t.data = t.data.float()
        self.cast = len(self._changed)
        self.dtypes = {dt for _, dt in self._changed}

    def __call__(self) -> None:
        with torch.no_grad():
            for t, dt in self._changed:
                t.data = t.data.to(dt)
        self._changed = []


def float32_inputs(batch):
    """``batch`` with its float16/bfloat16 tensors (pixel values, embeddings) in float32."""
    from torch.utils._pytree import tree_map

    return tree_map(lambda v: v.float() if isinstance(v, torch.Tensor) and v.dtype in LOW_PRECISION else v, batch)


def calibrate(
    model: nn.Module,
    batches: Iterable,
    *,
    target_ratio: Optional[float] = None,
    fit_router: Optional[bool] = None,
    fit_experts: bool = True,
    router_steps: int = 0,
    steps: int = 0,
    lr: Optional[float] = None,
    ridge: float = 1.0,
    batch: int = 1024,
    spill_bytes: int = 512 << 20,
    progress: bool = True,
    verbose: bool = True,
    budgets: str = "uniform",
    budget_spread: Optional[float] = None,
    distill_steps: int = 0,
    distill_batches: Optional[Iterable] = None,
    distill_lr: float = 1e-4,
    distill_topk: int = DISTILL_TOPK,
    distill_seconds: Optional[float] = None,
    budget_seconds: Optional[float] = None,
    distill_train: str = "experts",
    distill_schedule: str = "constant",
    distill_labels: float = 0.0,
    distill_router_lr: float = 0.0,
    distill_precision: str = "float32",
    rescale: bool = True,
    router_target: str = "fisher",
) -> CalibrationReport:
    """Fit every converted MoE layer of ``model`` to its dense FFN, layer by layer.

    ``batches``: inputs as the model takes them (a tensor, a tuple of positional arguments, or
    a dict of keyword arguments), e.g. ``moefx.data.token_batches(tokenizer)``. More tokens fit
    better routers: each router is a least-squares fit of ``E`` outputs on ``d`` features, and
    on SmolLM2 (256 + 64 experts) 16k tokens cut its held-out error by 6-12% against 4k; at 50%
    activation, 32k tokens gave 1.44-1.48x dense perplexity where 4k gave 1.66x, within the same 10
    minutes (bench/results-quality.md). The routers fit on every token; the experts' refit and
    the report use at most :data:`FIT_TOKENS` of them, evenly spaced.
    ``target_ratio``: wanted mean activation ratio of XMoE layers (fraction of expert groups a
    token computes, shared included); None keeps the router's scale; a dict {layer name: ratio}
    sets each layer's own ratio. ``fit_router`` (default:
    the config's ``router == "fitted"``) trains XMoE routers; ``fit_experts=False`` leaves the
    expert weights alone. ``steps``: Adam steps per layer after the closed-form refit (XMoE,
    default 0) or in all (SliceMoE, default 200), on ``batch`` random calibration tokens
    each. ``budgets``: ``"uniform"`` (default) gives every XMoE layer ``target_ratio``;
    ``"model"`` spends the mean ``target_ratio`` where the model's output loses most: each
    layer alone is routed at ``target_ratio +- budget_spread`` (0.15 unless given) with every
    other layer dense, the KL divergence from the dense model's output is measured on
    :data:`PROBE_TOKENS` tokens of the last calibration batch, which the routers are fit
    without for this when there are several batches (two forwards per layer, from the layer's
    block on: the blocks before it are replayed from a dense reference run, :func:`model_curves`), and
    :func:`allocate_budgets` trades on those curves. On SmolLM2 (256 + 64 experts, 75%) it gave
    the first layers 0.80-0.90 and layers 14-28 0.65-0.75, and 1.14x dense perplexity against
    1.17x for ``"inverse"`` (1.12-1.16x over four more runs, 1.104-1.108x on an 8192-token
    text), though its ~1.5 minutes left distillation 71 steps instead of 92;
    at 50% it gained nothing (1.49x against 1.44-1.48x; bench/results-quality.md, tenth session). ``"relative"`` / ``"absolute"`` spend the mean ``target_ratio`` unevenly, more where routing
    loses more (:func:`allocate_budgets` on each layer's error curve, measured after its router
    fit, as relative squared error or in output units), each layer within ``target_ratio +-
    budget_spread`` if given. ``"inverse"`` mirrors the ``"relative"`` allocation (spread 0.1
    unless given) around ``target_ratio``: more to the layers whose *relative* error is small,
    the first and last ones of SmolLM2, where an error costs most end to end. On SmolLM2
    ``"inverse"`` gave 1.49x / 2.60x dense perplexity at 75% / 50% against 1.55x / 2.75x
    uniform (one run each); ``"relative"`` and ``"absolute"`` were worse. Uniform stays the
    default: cheaper (no curve pass) and the gain is not yet confirmed (bench/results-quality.md).
    ``distill_steps``: after the layer-wise fit, that many Adam steps (lr ``distill_lr``) of
    end-to-end distillation (:mod:`moefx.convert.distill`): every converted layer's experts
    trained together so that the model's output matches the dense model's (sparse KL on the
    teacher's top-``distill_topk`` words for logits, :data:`DISTILL_TOPK` unless given, relative squared error for a plain
    tensor), one batch of ``distill_batches`` (default: ``batches``) per step, stopping early
    after ``distill_seconds`` of distillation or when the whole call has run ``budget_seconds``
    (the layer-wise fit always completes; only distillation is cut short). Distinct text helps more than repeats: give it more batches than
    steps, small ones (e.g. 2 x 256 tokens). The calibration ``batches`` are distillation examples
    too: the dense pass that records the layers' inputs records their teacher outputs for free
    (cut into the distillation batches' size, :func:`split_rows`). The teacher's outputs for ``distill_batches`` are
    recorded after the layer-wise fit, in dense mode with the pre-calibration weights swapped
    back in, skipping any batch equal to a calibration batch (:func:`batch_key`), and only as
    many as the remaining time can train on beyond the calibration examples, each once (the
    recording times itself: :func:`moefx.convert.distill.worth_recording`). ``distill_schedule``: ``"constant"`` (default) or ``"cosine"`` (warm-up, then
    decay to a tenth by the end: :func:`moefx.convert.distill.lr_factor`). ``distill_labels``
    (default 0): the weight of the text's own next tokens in the distillation target
    (:func:`moefx.convert.distill.distill_loss`). It adapts the model to the calibration text's
    domain rather than keeping it close to the dense model: on SmolLM2 at 75%, 0.3 gave 1.03x
    the dense model's perplexity on held-out docstrings, but the dense model fine-tuned the same
    way reached 13.28 (0.85x), so the converted model is 1.21x that; without labels it stays
    at 1.14x of the dense model it replaces (bench/results-quality.md, eleventh session).
    Finer experts route better: SmolLM2 with 256 + 64 experts of 5 neurons reached 1.24x at
    75% against 1.35x for 64 + 16 in the same session (bench/results-quality.md). On SmolLM2 (64 + 16 experts, inverse budgets), 96 steps on 49k
    tokens took dense perplexity x1.49 -> x1.33 at 75% activation and x2.60 -> x1.92 at 50%,
    ~6 minutes of the 10 (bench/results-quality.md). ``distill_train="blocks"`` also trains
    every other block parameter (attention, norms; never the embeddings, the output head or
    the XMoE routers): the dense model's own weights then move as well, in exchange for more
    freedom to absorb the experts' error (SmolLM2 at 75%: 1.30x against 1.33x, one run).
    ``distill_train="blocks-down"`` trains the same but leaves the converted layers' up and gate
    projections at their dense values: ~7% faster steps, so a few more of them in a time budget
    (:func:`moefx.convert.distill.distill`).
    ``distill_router_lr`` (default 0: routers frozen): the peak learning rate at which
    distillation also trains the XMoE routers, end to end through a straight-through gate
    (:func:`moefx.convert.distill._xmoe_train_forward`); the final rescale then resets each
    layer's ratio. On SmolLM2 at 75% (72 steps, same examples and order) 1e-3 gave 1.094x dense
    perplexity against 1.101x with frozen routers, and 1.097x against 1.099x with another order
    (bench/results-quality.md, twelfth session).
    ``distill_precision``: ``"float32"`` (default), ``"bfloat16"`` (distillation's products under
    bfloat16 autocast; routing, loss, weights and Adam's state stay float32, the teacher and
    everything before distillation run in float32) or ``"auto"`` (bfloat16 where the device has
    bfloat16 matrix units: :func:`moefx.convert.distill.fast_bfloat16`). On a 2-core CPU with AMX a
    step took 1.25 s instead of 1.88 s, and the same 200 steps scored 1.0934x dense perplexity
    against 1.0985x; within the 10 minutes, on a longer distillation text, 1.078-1.097x in four
    runs, against 1.097x in float32 (bench/results-quality.md, eighteenth session).
    ``router_target``: what a fitted XMoE router learns to rank experts by. ``"fisher"``
    (default): each expert's output norm in the metric of what it changes in the model's
    prediction, the Fisher information of the dense model's output with respect to the layer's
    output (:func:`output_fisher`, one forward and backward pass over :data:`FISHER_TOKENS`
    calibration tokens), so an expert whose output the later layers ignore ranks low however
    large it is. ``"norm"``: the plain output norm. On SmolLM2 (256 + 64 experts, 75%, layer-wise
    only) the Fisher target gave 1.22-1.24x dense perplexity against 1.25x; with distillation
    after it the two were alike within noise (bench/results-quality.md).
    A model whose output has neither logits nor a tensor falls back to ``"norm"`` with a warning.
    ``rescale`` (default on): at the end, one forward of the converted model on the first
    :data:`RESCALE_TOKENS` tokens of held-out text resets every threshold-routed XMoE layer's scale
    so that it keeps its ratio on the inputs it gets in the converted model, not only on the
    dense model's (:func:`rescale_in_model`; the report's ``ratio_model`` column); its time is
    kept out of ``budget_seconds``' distillation share. The held-out text is the distillation
    batches nothing was fit or trained on (never recorded as teachers), where they hold that
    many tokens; else the calibration batches. A router keeps fewer experts on text it was not
    fit on: on SmolLM2 at 75%, a scale set on calibration text kept 0.741 on unseen text of the
    same kind and 0.736 on the evaluation text; set on unseen text, 0.750 and 0.746
    (``report.rescale_text`` says which text was used). Prints a progress bar and, with
    ``verbose``, the per-layer report (relative error, cosine, activation ratio, before/after).
    A float16/bfloat16 model is calibrated in float32 (:class:`float32_weights`) and every
    parameter and buffer goes back to its own dtype at the end.
    """
    from .distill import autocast_dtype, distill, model_device, record_teachers, teacher_target
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    layers = moe_layers(model)
    if not layers:
        raise ValueError(
            "calibrate found no converted MoE layer in the model: run moefx.convert(...) first"
        )
    names = list(layers)
    if budgets not in BUDGET_MODES:
        raise ValueError(f"calibrate(budgets={budgets!r}): use one of {', '.join(BUDGET_MODES)}")
    if router_target not in ROUTER_TARGETS:
        raise ValueError(f"calibrate(router_target={router_target!r}): use one of {', '.join(ROUTER_TARGETS)}")
    if isinstance(target_ratio, dict):
        unknown = set(target_ratio) - set(names)
        if unknown:
            raise ValueError(f"calibrate(target_ratio=...): no converted layer named {sorted(unknown)}; "
                             f"use names from moefx.convert.calibrate.moe_layers(model)")
    if not 0.0 <= distill_labels < 1.0:
        raise ValueError(f"calibrate(distill_labels={distill_labels}): the weight of the text's next tokens "
                         f"must be in [0, 1)")
    if not distill_router_lr >= 0.0:
        raise ValueError(f"calibrate(distill_router_lr={distill_router_lr}): use 0 (routers frozen) or a "
                         f"positive learning rate")
    if distill_steps < 0:
        raise ValueError(f"calibrate(distill_steps={distill_steps}): use 0 (no distillation) or more")
    from .distill import DISTILL_PRECISIONS, DISTILL_SCHEDULES, DISTILL_TRAIN

    # checked before anything runs: distillation starts after minutes of layer-wise fitting
    if distill_train not in DISTILL_TRAIN:
        raise ValueError(f"calibrate(distill_train={distill_train!r}): use one of {', '.join(DISTILL_TRAIN)}")
    if distill_schedule not in DISTILL_SCHEDULES:
        raise ValueError(f"calibrate(distill_schedule={distill_schedule!r}): use one of {', '.join(DISTILL_SCHEDULES)}")
    if distill_precision not in DISTILL_PRECISIONS:
        raise ValueError(f"calibrate(distill_precision={distill_precision!r}): use one of "
                         f"{', '.join(DISTILL_PRECISIONS)}")
    batches = list(batches)
    rows = None  # calibration batches become distillation examples of the distillation batches' size
    if distill_batches is not None:
        distill_batches = list(distill_batches)
        rows = Inputs.of(distill_batches[0]).rows() if distill_batches else None
    restore_dtypes = float32_weights(model)
    if restore_dtypes.cast:
        batches = [float32_inputs(b) for b in batches]
        if distill_batches is not None:
            distill_batches = [float32_inputs(b) for b in distill_batches]
        if verbose:
            print(f"calibrating in float32: {restore_dtypes.cast} parameters/buffers in "
                  f"{', '.join(sorted(str(d).replace('torch.', '') for d in restore_dtypes.dtypes))} "
                  "are cast back at the end")
    # each layer's input and its dense output (the layer-wise fit's target: the dense pass
    # computes it anyway) are recorded; nothing is registered before the arguments are read
    store = ActivationStore(names + [n + DENSE_OUT for n in names], spill_bytes)

    def record(name):
        def hook(mod, args, out):
            store.add(name, args[0])
            store.add(name + DENSE_OUT, out)
        return hook

    hooks = [layers[n].register_forward_hook(record(n)) for n in names]
    was_training = model.training
    set_mode(model, False)
    report = CalibrationReport()
    examples = []
    rescale_batches = batches  # the final rescale's text: held-out distillation batches where there are enough
    try:
        t_dense = time.perf_counter()
        with torch.no_grad(), dense_mode(layers):
            for inputs in tqdm(batches, desc="recording dense activations", disable=not progress):
                out = run_batch(model, inputs)
                if distill_steps:  # the dense model's outputs of these tokens are distillation targets too
                    examples += split_rows(Inputs.of(inputs), teacher_target(out, distill_topk), rows)
                del out
            for h in hooks:
                h.remove()
            hooks = []
        t_dense = time.perf_counter() - t_dense
        metrics = {}
        fitted = {n: l for n, l in layers.items() if is_xmoe(l)
                  and (fit_router if fit_router is not None else l.config.router == "fitted")}
        if router_target == "fisher" and fitted:
            try:
                with dense_mode(layers):
                    metrics = output_fisher(model, fitted, batches, max_tokens=FISHER_TOKENS, progress=progress)
            except (TypeError, ValueError) as err:  # no logits or tensor output to take a gradient of
                warnings.warn(f"calibrate(router_target='fisher'): {err}; the routers rank experts by "
                              f"plain output norms (pass router_target='norm' to silence this)")
        deferred = bool(distill_steps and distill_batches is not None)
        if deferred:
            # The teacher outputs of the distillation batches are recorded after the layer-wise
            # fit, with the converted layers' dense weights swapped back in for the recording: by
            # then the time left is known, so only as many batches are recorded as the budget can
            # train on (each costs a forward; ~1/4 of a training step).
            originals = {n: [p.detach().clone() for p in layers[n].parameters()] for n in names}
        if isinstance(target_ratio, dict):
            ratios = {n: target_ratio.get(n) for n in names}
            budgets = "uniform"
        else:
            ratios = {n: target_ratio for n in names}
        prefitted = set()
        sums, held_rows = {}, {}  # budgets="model": the routers' least-squares sums, refit on the held rows
        if budgets != "uniform" and target_ratio is not None:
            curves, probe_inputs = {}, {}
            desc = "fitting routers" if budgets == "model" else "measuring layer sensitivity"
            for name in tqdm(names, desc=desc, disable=not progress):
                layer = layers[name]
                if not is_xmoe(layer) or layer.config.top_k is not None or layer.config.threshold in (0, 1):
                    continue
                x = store.peek(name)  # the layer-wise fit below takes it
                if x.shape[0] == 0:
                    raise ValueError(f"no calibration tokens reached layer '{name}'")
                # "model" probes the last calibration batch: its routers are fit without it (a router
                # looks better on the tokens it was fit on, unevenly across layers), and refit on
                # every token afterwards, in the layer-wise fit
                held = store.last_rows.get(name, 0) if budgets == "model" and len(batches) > 1 else 0
                xr = x[: x.shape[0] - held] if held else x
                if name in fitted:
                    with torch.no_grad():
                        norms = chunked(partial(expert_output_norms, metric=metrics.get(name)), layer, xr)
                    if held and not router_steps:  # the refit then adds the held rows only
                        sums[name], held_rows[name] = LeastSquares(), held
                    _fit(layer, xr, norms, router_steps, sums.get(name))
                    if budgets != "model":
                        prefitted.add(name)
                del xr
                if budgets == "model":  # the curves come from the model below, on these inputs' scales
                    probe_inputs[name] = spaced(x, PROBE_SCALE_TOKENS).clone()
                else:
                    xc = spaced(x, CURVE_TOKENS)  # the curve's tokens: the dense output of these only
                    with torch.no_grad():
                        target = dense_forward(layer, xc).float()
                    rs, errs = error_curve(layer, xc, target)
                    if budgets == "absolute":
                        energy = float(target.pow(2).sum(-1).mean())
                        errs = [e * energy for e in errs]
                    curves[name] = (rs, errs)
                    del xc, target
                del x
            if budgets == "model":
                spread = MODEL_SPREAD if budget_spread is None else budget_spread
                curves = model_curves(model, layers, probe_rows(batches[-1:]), probe_inputs, target_ratio, spread,
                                      progress=progress)
                del probe_inputs
                ratios.update(allocate_budgets(curves, target_ratio))
            elif budgets == "inverse":
                spread = 0.1 if budget_spread is None else budget_spread
                alloc = allocate_budgets(curves, target_ratio, spread)
                ratios.update({n: min(1.0, max(0.0, 2 * target_ratio - r)) for n, r in alloc.items()})
            else:
                ratios.update(allocate_budgets(curves, target_ratio, budget_spread))
        report.budgets = {n: ratios[n] for n in names if ratios[n] is not None}
        for name in tqdm(names, desc="calibrating layers", disable=not progress):
            layer = layers[name]
            x, y = store.take(name), store.take(name + DENSE_OUT)
            if x.shape[0] == 0:
                raise ValueError(f"no calibration tokens reached layer '{name}'")
            xf = spaced(x, FIT_TOKENS)  # the experts' fit and the report use at most FIT_TOKENS
            target = spaced(y, FIT_TOKENS)
            del y
            router_x = x if xf is not x else None
            if name in sums:
                router_x = x[x.shape[0] - held_rows[name]:]
            rep = calibrate_layer(
                layer, xf, target, target_ratio=ratios[name],
                fit_router=False if name in prefitted else fit_router, fit_experts=fit_experts,
                router_steps=router_steps, steps=steps, lr=lr, ridge=ridge, batch=batch, name=name,
                router_x=router_x, metric=metrics.get(name), router_sums=sums.pop(name, None),
            )
            report.layers.append(rep)
            report.tokens = rep.tokens
            if not deferred:
                drop_teacher(layer, fit_experts)
            del x, xf, target
        store.close()
        if distill_steps:
            seconds = distill_seconds
            if budget_seconds is not None:
                left = budget_seconds - (time.perf_counter() - t0) - DISTILL_RESERVE_S
                if rescale:
                    left -= RESCALE_COST * t_dense * min(1.0, RESCALE_TOKENS / max(1, report.tokens))
                seconds = left if seconds is None else min(seconds, left)
            if deferred:
                t_rec = time.perf_counter()
                held = sum(t.tokens for _, t in examples)
                # training the calibration examples takes ~TRAIN_COST[mode] forwards of their tokens (as
                # timed in the dense pass, which also recorded): more are recorded only if there is
                # time beyond that, and then while the recording's own timing says they fit
                train_cost = TRAIN_COST[distill_train]
                if autocast_dtype(distill_precision, model_device(model)) is not None:
                    train_cost *= BFLOAT16_STEP
                room = seconds is None or train_cost * t_dense * held / max(1, report.tokens) < seconds
                more = max(0, distill_steps + 2 - len(examples))
                known = {batch_key(i) for i, _ in examples}
                fresh = [b for b in distill_batches if batch_key(Inputs.of(b)) not in known]
                recorded = []
                if more and room:
                    with swapped_weights(layers, originals), torch.no_grad(), dense_mode(layers):
                        recorded = record_teachers(model, fresh, distill_topk, progress=progress,
                                                   max_batches=more, seconds=seconds,
                                                   train_cost=train_cost, trained_tokens=held)
                    examples += recorded
                spare = fresh[len(recorded):]  # neither fit nor trained on: the final rescale's text
                if sum(batch_tokens(b) for b in spare) >= RESCALE_TOKENS:
                    rescale_batches = spare
                del originals
                for layer in layers.values():
                    drop_teacher(layer, fit_experts)
                if seconds is not None:
                    seconds -= time.perf_counter() - t_rec
            report.distill = distill(model, examples, steps=distill_steps, lr=distill_lr,
                                     seconds=seconds, progress=progress, train=distill_train,
                                     schedule=distill_schedule, labels=distill_labels,
                                     router_lr=distill_router_lr, precision=distill_precision)
        if rescale and target_ratio is not None:
            kept = rescale_in_model(model, layers, ratios, rescale_batches)
            report.rescale_text = "held-out" if rescale_batches is not batches else "calibration"
            for rep in report.layers:
                rep.ratio_model = kept.get(rep.name, float("nan"))
    finally:
        for h in hooks:
            h.remove()
        store.close()
        set_mode(model, was_training)
        restore_dtypes()
    report.seconds = time.perf_counter() - t0
    if verbose:
        print(report.table())
    return report
