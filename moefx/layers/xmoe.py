"""XMoE: a dense FFN's hidden neurons split into many small experts, each token keeping the
fewest experts whose router probability mass reaches a threshold (SPEC.md §1).

The layer is two separable halves so that the lowering pass and the ONNX exporter can reuse
them: :meth:`XMoE.route` (router in float32, softmax, ``moefx::xmoe_select``, optional
``moefx::capacity_drop``) and the expert compute (``moefx::moe_ffn`` plus the always-on shared
experts and the layer's own output bias, which is added once, never per expert).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import moefx.kernels  # noqa: F401  (registers torch.ops.moefx)
from moefx.config import ConfigError, XMoEConfig, check_widths
from moefx.kernels.reference import router_dtype, xmoe_capacity
from moefx.layers.activations import activation_fn, check_activation


def _uniform(shape, bound: float) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape).uniform_(-bound, bound))


class XMoE(nn.Module):
    """Threshold- or top-k-routed mixture of small FFN experts.

    Parameters follow docs/ARCHITECTURE.md: ``router.weight [E, d]``, ``w1/b1 [E, h, d]/[E, h]``,
    ``w3/b3`` (GLU only), ``w2 [E, d, h]``, ``bias [d]`` and ``shared_*`` when ``num_shared > 0``,
    with ``h = ceil(d_ff / (num_experts + num_shared))``. A fresh layer is initialised like the
    ``nn.Linear`` layers it replaces (uniform, ±1/sqrt(fan_in) per expert); conversion overwrites
    every parameter. ``converted=True`` only changes the default combine to ``"unit"``.

    After a training-mode forward, ``aux_loss`` holds the Switch-style balance loss on the top-1
    choice, ``coef · E · Σ_e mean_T(p_e) · frac_top1_e`` (SPEC §1); it is None in eval mode.
    """

    def __init__(
        self,
        config: XMoEConfig,
        d_model: int,
        d_ff: int,
        activation: str = "gelu",
        glu: bool = False,
        bias: bool = True,
        converted: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(config, XMoEConfig):
            raise ConfigError(f"XMoE needs an XMoEConfig, got {type(config).__name__}")
        check_widths("XMoE", d_model=d_model, d_ff=d_ff)
        config.validate_for(d_model, d_ff)
        self.config = config
        self.d_model = d_model
        self.d_ff = d_ff
        self.activation = check_activation(activation)
        self.glu = bool(glu)
        self.converted = bool(converted)
        self.combine = config.resolved_combine(converted)
        E = config.num_experts
        h = math.ceil(d_ff / (E + config.num_shared))
        self.expert_hidden = h
        self.router = nn.Linear(d_model, E, bias=False)
        b_in, b_out = 1 / math.sqrt(d_model), 1 / math.sqrt(h)
        self.w1 = _uniform((E, h, d_model), b_in)
        self.b1 = _uniform((E, h), b_in) if bias else None
        self.w3 = _uniform((E, h, d_model), b_in) if glu else None
        self.b3 = _uniform((E, h), b_in) if glu and bias else None
        self.w2 = _uniform((E, d_model, h), b_out)
        self.bias = _uniform((d_model,), 1 / math.sqrt(d_ff)) if bias else None
        Hs = config.num_shared * h
        if Hs:
            self.shared_w1 = _uniform((Hs, d_model), b_in)
            self.shared_b1 = _uniform((Hs,), b_in) if bias else None
            self.shared_w3 = _uniform((Hs, d_model), b_in) if glu else None
            self.shared_b3 = _uniform((Hs,), b_in) if glu and bias else None
            self.shared_w2 = _uniform((d_model, Hs), 1 / math.sqrt(Hs))
        self.aux_loss: Optional[torch.Tensor] = None
        self._stats_sink = None

    def extra_repr(self) -> str:
        c = self.config
        rule = f"top_k={c.top_k}" if c.top_k is not None else f"threshold={c.threshold}"
        return (
            f"d_model={self.d_model}, d_ff={self.d_ff}, experts={c.num_experts}x{self.expert_hidden}, "
            f"{rule}, combine={self.combine}, shared={c.num_shared}, activation={self.activation}, glu={self.glu}"
        )

    def capacity(self, num_tokens) -> Optional[int]:
        """Slots per expert for a batch of ``num_tokens`` (None: dropless)."""
        return xmoe_capacity(num_tokens, self.config.num_experts, self.config.capacity_factor)

    def route(self, x2d: torch.Tensor):
        """Routing of ``x2d [T, d]``: ``(idx i64[T, K], weight [T, K], probs [T, E])``, after
        capacity. ``weight`` holds raw probabilities (the combine mode is applied by
        :meth:`combine_weight`)."""
        cfg = self.config
        rd = router_dtype(x2d.dtype)
        probs = torch.softmax(F.linear(x2d.to(rd), self.router.weight.to(rd)), dim=-1)
        threshold = float(cfg.threshold) if cfg.threshold is not None else 0.0
        idx, weight = torch.ops.moefx.xmoe_select(probs, threshold, cfg.top_k or 0, cfg.max_experts or 0)
        pre_capacity = idx
        cap = self.capacity(x2d.shape[0])
        if cap is not None:
            idx, weight = torch.ops.moefx.capacity_drop(idx, weight, cfg.num_experts, cap)
        if self._stats_sink is not None:
            self._stats_sink.record_xmoe(self, probs, pre_capacity, idx)
        return idx, weight, probs

    def combine_weight(self, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The per-slot weights handed to ``moe_ffn``: the probability (``"prob"``) or 1 for
        every kept slot (``"unit"``)."""
        if self.combine == "unit":
            return (idx >= 0).to(weight.dtype)
        return weight

    def shared_ffn(self, x2d: torch.Tensor) -> torch.Tensor:
        hidden = activation_fn(self.activation)(F.linear(x2d, self.shared_w1, self.shared_b1))
        if self.shared_w3 is not None:
            hidden = hidden * F.linear(x2d, self.shared_w3, self.shared_b3)
        return F.linear(hidden, self.shared_w2)

    DENSE_TRAIN_SHARE = 0.5
    """When training (train mode, gradients flowing) on a batch that keeps at least this share of
    the routed experts, the experts run as two dense GEMMs over every expert with the unchosen ones' hidden units
    zeroed (see :meth:`dense_masked_experts`): the same values and gradients, but at a high
    share the grouped op's many small per-expert GEMMs and their backward cost more than the
    dense FLOPs (CPU, d=576, d_ff=1536, 89% kept, 512 tokens, forward + backward: 264 -> 90 ms
    with 64 experts, 910 -> 99 ms with 256). Eval mode (inference, with or without no_grad),
    export and compilation always use the op."""

    def use_dense_training(self, x2d: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> bool:
        if not (self.training and torch.is_grad_enabled()) or isinstance(x2d, torch.fx.Proxy):
            return False
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return False
        params = (self.w1, self.b1, self.w3, self.b3, self.w2)
        if not (x2d.requires_grad or weight.requires_grad or any(p is not None and p.requires_grad for p in params)):
            return False
        kept = int((idx >= 0).sum())
        return kept >= self.DENSE_TRAIN_SHARE * idx.shape[0] * self.config.num_experts

    def all_expert_hidden(self, x2d: torch.Tensor) -> torch.Tensor:
        """Every routed expert's hidden activations for every row, ``[N, E, h]``: one GEMM over
        all experts' stacked rows (two for GLU)."""
        E, h, d = self.w1.shape
        hidden = activation_fn(self.activation)(
            F.linear(x2d, self.w1.reshape(E * h, d), None if self.b1 is None else self.b1.reshape(E * h)))
        if self.w3 is not None:
            hidden = hidden * F.linear(x2d, self.w3.reshape(E * h, d), None if self.b3 is None else self.b3.reshape(E * h))
        return hidden.view(x2d.shape[0], E, h)

    def dense_masked_experts(self, x2d: torch.Tensor, gate: torch.Tensor,
                             w2_flat: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``Σ_e gate[n,e] · FFN_e(x[n])`` over every routed expert at once, ``gate [N, E]`` being
        each row's weight per expert (0 for an expert it did not choose): with the gate of a
        routing (:meth:`routing_gate`), ``moe_ffn``'s routed sum, exact up to float summation
        order and differentiable in x, the gate and the expert parameters. ``w2_flat``: the
        down projections as one ``[d, E * h]`` matrix (:meth:`flat_w2`), for a caller that trains
        them in that layout; by default it is made from ``w2`` (a copy, and another in backward)."""
        E, h, d = self.w1.shape
        hidden = (self.all_expert_hidden(x2d) * gate.unsqueeze(-1).to(x2d.dtype)).reshape(x2d.shape[0], E * h)
        return F.linear(hidden, self.flat_w2() if w2_flat is None else w2_flat)

    def flat_w2(self) -> torch.Tensor:
        """The routed experts' down projections ``w2 [E, d, h]`` as one ``[d, E * h]`` matrix (a copy)."""
        E, d, h = self.w2.shape
        return self.w2.permute(1, 0, 2).reshape(d, E * h)

    @torch.no_grad()
    def set_flat_w2(self, flat: torch.Tensor) -> None:
        """Write ``flat [d, E * h]`` (the layout of :meth:`flat_w2`) into ``w2``, cast to its dtype."""
        E, d, h = self.w2.shape
        self.w2.copy_(flat.reshape(d, E, h).permute(1, 0, 2))

    def routing_gate(self, x2d: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``[N, E]``: row n's weight for expert e (``weight[n, j]`` where ``idx[n, j] == e``, else 0)."""
        w = torch.where(idx >= 0, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))
        return x2d.new_zeros((x2d.shape[0], self.config.num_experts)).scatter_add(1, idx.clamp_min(0), w.to(x2d.dtype))

    def experts(self, x2d: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Expert compute for given routing: routed experts + shared experts + layer bias."""
        combined = self.combine_weight(idx, weight)
        if self.use_dense_training(x2d, idx, combined):
            y = self.dense_masked_experts(x2d, self.routing_gate(x2d, idx, combined))
        else:
            y = torch.ops.moefx.moe_ffn(
                x2d, idx, combined, self.w1, self.b1, self.w3, self.b3,
                self.w2, None, self.activation, False,
            )
        # y is the op's fresh output: without autograd, add into it rather than allocate again
        # (a [T, d] pass saved per term; ~0.5 ms of a 22 ms T=2048 call)
        inplace = not (torch.is_grad_enabled() and (y.requires_grad or (self.bias is not None and self.bias.requires_grad)))
        if self.config.num_shared:
            y = y.add_(self.shared_ffn(x2d)) if inplace else y + self.shared_ffn(x2d)
        if self.bias is not None:
            y = y.add_(self.bias) if inplace else y + self.bias
        return y

    def balance_loss(self, probs: torch.Tensor) -> torch.Tensor:
        """Switch-style loss on the top-1 choice: ``coef · E · Σ_e mean_T(p_e) · frac_top1_e``."""
        E = self.config.num_experts
        T = probs.shape[0]
        if T == 0:
            return probs.new_zeros(())
        top1 = F.one_hot(probs.argmax(dim=-1), E).to(probs.dtype)
        return self.config.aux_loss_coef * E * (probs.mean(0) * top1.mean(0)).sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.d_model:
            raise ValueError(
                f"XMoE expects inputs [..., {self.d_model}] (d_model), got shape {tuple(x.shape)}"
            )
        x2d = x.reshape(-1, self.d_model)
        idx, weight, probs = self.route(x2d)
        y = self.experts(x2d, idx, weight)
        self.aux_loss = self.balance_loss(probs) if self.training else None
        return y.reshape(x.shape)
