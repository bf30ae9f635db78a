"""SliceMoE: every token cut into S contiguous slices, each slice routed to its top-k of E
small experts by one shared router (SPEC.md §2).

Slices travel as rows: ``[T, d]`` becomes ``[T·S, d/S]`` (row ``t·S + s`` is slice ``s`` of
token ``t``), so routing and the expert compute are the same ops as XMoE's with ``N = T·S``,
and the output is the slice outputs put back in their original order by a reshape.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import moefx.kernels  # noqa: F401  (registers torch.ops.moefx)
from moefx.config import ConfigError, SliceMoEConfig, check_widths
from moefx.kernels import cpu
from moefx.kernels.reference import router_dtype
from moefx.layers.activations import check_activation


def _uniform(shape, bound: float) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape).uniform_(-bound, bound))


class SliceMoE(nn.Module):
    """Slice-routed mixture of experts.

    Parameters follow docs/ARCHITECTURE.md: ``router = Sequential(Linear(d/S, H_r), ReLU,
    Linear(H_r, E))``, ``w1/b1 [E, h_e, d/S]/[E, h_e]``, ``w3/b3`` (GLU only), ``w2/b2
    [E, d/S, h_e]/[E, d/S]``; ``h_e = expert_hidden or d_ff // top_k``.

    Training-mode forwards apply cross-slice dropout (rate ``slice_dropout``) and leave the
    slice-level capacity loss ``α · CV²(soft load)`` in ``aux_loss`` (None in eval mode).
    Decisions where SPEC.md is silent: the top-k weights are renormalised in the router dtype
    before being cast to the model dtype; the router's softmax sees no temperature.
    """

    def __init__(
        self,
        config: SliceMoEConfig,
        d_model: int,
        d_ff: int,
        activation: str = "gelu",
        glu: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(config, SliceMoEConfig):
            raise ConfigError(f"SliceMoE needs a SliceMoEConfig, got {type(config).__name__}")
        check_widths("SliceMoE", d_model=d_model, d_ff=d_ff)
        config.validate_for(d_model, d_ff)
        self.config = config
        self.d_model = d_model
        self.d_ff = d_ff
        self.activation = check_activation(activation)
        self.glu = bool(glu)
        S, E = config.num_slices, config.num_experts
        ds = d_model // S
        h = config.hidden_for(d_ff)
        self.slice_dim = ds
        self.expert_hidden = h
        self.router = nn.Sequential(nn.Linear(ds, config.router_hidden), nn.ReLU(), nn.Linear(config.router_hidden, E))
        b_in, b_out = 1 / math.sqrt(ds), 1 / math.sqrt(h)
        self.w1 = _uniform((E, h, ds), b_in)
        self.b1 = _uniform((E, h), b_in)
        self.w3 = _uniform((E, h, ds), b_in) if glu else None
        self.b3 = _uniform((E, h), b_in) if glu else None
        self.w2 = _uniform((E, ds, h), b_out)
        self.b2 = _uniform((E, ds), b_out)
        self.aux_loss: Optional[torch.Tensor] = None
        self._stats_sink = None
        self._expert_views = None

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"d_model={self.d_model}, slices={c.num_slices}x{self.slice_dim}, experts={c.num_experts}x{self.expert_hidden}, "
            f"top_k={c.top_k}, gate={c.gate}, activation={self.activation}, glu={self.glu}"
        )

    def router_probs(self, slices: torch.Tensor) -> torch.Tensor:
        rd = router_dtype(slices.dtype)
        lin1, lin2 = self.router[0], self.router[2]
        hidden = F.relu(F.linear(slices.to(rd), lin1.weight.to(rd), lin1.bias.to(rd)), inplace=True)
        return torch.softmax(F.linear(hidden, lin2.weight.to(rd), lin2.bias.to(rd)), dim=-1)

    def route(self, x2d: torch.Tensor):
        """Routing of ``x2d [T, d]``: ``(idx i64[T·S, k], weight [T·S, k], probs [T·S, E])``, one
        row per slice (row ``t·S + s``), weights renormalised over the kept slots, after
        cross-slice dropout in training mode."""
        cfg = self.config
        slices = x2d.reshape(-1, self.slice_dim)
        probs = self.router_probs(slices)
        idx, weight = torch.ops.moefx.xmoe_select(probs, 0.0, cfg.top_k, 0)
        if self.training and cfg.slice_dropout > 0:
            keep = torch.rand(weight.shape, device=weight.device) >= cfg.slice_dropout
            keep[:, 0] |= ~keep.any(dim=-1)
            idx = torch.where(keep, idx, torch.full_like(idx, -1))
            weight = weight * keep.to(weight.dtype)
        weight = weight / weight.sum(dim=-1, keepdim=True)
        if self._stats_sink is not None:
            self._stats_sink.record_slicemoe(self, probs, idx)
        return idx, weight, probs

    def experts(self, x2d: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        slices = x2d.reshape(-1, self.slice_dim)
        y = torch.ops.moefx.moe_ffn(
            slices, idx, weight, self.w1, self.b1, self.w3, self.b3, self.w2, self.b2,
            self.activation, self.config.gate == "input",
        )
        return y.reshape(x2d.shape)

    def capacity_loss(self, probs: torch.Tensor) -> torch.Tensor:
        """``α · (std(load) / mean(load))²`` with the soft load ``Σ_slices p_e`` (population std)."""
        if probs.shape[0] == 0:
            return probs.new_zeros(())
        load = probs.sum(dim=0)
        return self.config.capacity_loss_coef * load.var(correction=0) / load.mean().square()

    def _plain_inference(self, x: torch.Tensor) -> bool:
        """True for an eager, gradient-free, eval-mode call on ordinary CPU tensors: nothing
        traces, differentiates or intercepts the call, so the forward may run the ops' CPU
        kernels directly (see :meth:`_forward_inference`). Any tracer (fx, torch.export,
        dynamo, jit), dispatch or function mode, functorch transform or autograd sees the ops."""
        return (
            not self.training
            and not torch.is_grad_enabled()
            and type(x) is torch.Tensor
            and x.device.type == "cpu"
            and self.w1.device.type == "cpu"
            and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing()
            and torch._C._len_torch_dispatch_stack() == 0
            and not torch._C._is_torch_function_mode_enabled()
            and not torch._C._are_functorch_transforms_active()
        )

    def _apply(self, fn, *args, **kwargs):
        self._expert_views = None  # views would keep the old storage alive
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        state = dict(super().__getstate__())
        state["_expert_views"] = None
        return state

    def expert_views(self):
        """``(w1, b1, w3, b3, w2, b2)`` split per expert (``unbind(0)``; None where absent),
        built once and kept while the parameters keep their storage: the decode path indexes
        one expert's matrices dozens of times per step, and each fresh view costs ~1.5 us.
        Dropped on ``.to()``/``.cuda()``/``.half()`` (``_apply``) and rebuilt when a parameter
        is replaced or re-pointed (checked by data pointer, shape and strides)."""
        params = (self.w1, self.b1, self.w3, self.b3, self.w2, self.b2)
        key = tuple(None if p is None else (p.data_ptr(), p.shape, p.stride(), p.dtype, p.device) for p in params)
        cached = self._expert_views
        if cached is None or cached[0] != key:
            views = tuple(None if p is None else p.detach().unbind(0) for p in params)
            cached = self._expert_views = (key, views)
        return cached[1]

    def _forward_inference(self, x2d: torch.Tensor) -> torch.Tensor:
        """:meth:`route` + :meth:`experts` with the CPU kernels of ``moefx::xmoe_select`` and
        ``moefx::moe_ffn`` called directly: the same computation, without the two custom-op
        dispatches (~40 us each, a third of the dense FFN's whole decode step) and the op's
        input validation (the ids come from our own top-k). The router's two linears take
        :func:`moefx.kernels.cpu.linear`, oneDNN with the ReLU fused for many slices."""
        cfg = self.config
        slices = x2d.reshape(-1, self.slice_dim)
        rd = router_dtype(slices.dtype)
        lin1, lin2 = self.router[0], self.router[2]

        def param(p):
            return None if p is None else p.to(rd)

        probs = torch.softmax(cpu.router_mlp(slices.to(rd), param(lin1.weight), param(lin1.bias),
                                             param(lin2.weight), param(lin2.bias)), dim=-1)
        idx, weight = cpu.xmoe_select(probs, 0.0, cfg.top_k, 0)
        weight = weight / weight.sum(dim=-1, keepdim=True)
        if self._stats_sink is not None:
            self._stats_sink.record_slicemoe(self, probs, idx)
        decode = idx.numel() <= cfg.num_experts  # the per-pair GEMV path of cpu.moe_ffn
        return cpu.moe_ffn(
            slices, idx, weight, self.w1, self.b1, self.w3, self.b3, self.w2, self.b2,
            self.activation, cfg.gate == "input", expert_views=self.expert_views() if decode else None,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.d_model:
            raise ValueError(
                f"SliceMoE expects inputs [..., {self.d_model}] (d_model), got shape {tuple(x.shape)}"
            )
        x2d = x.reshape(-1, self.d_model)
        if self._plain_inference(x):
            self.aux_loss = None
            return self._forward_inference(x2d).reshape(x.shape)
        idx, weight, probs = self.route(x2d)
        y = self.experts(x2d, idx, weight)
        self.aux_loss = self.capacity_loss(probs) if self.training else None
        return y.reshape(x.shape)
