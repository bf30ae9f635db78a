"""The ``ort`` target: each MoE layer whose semantics ``com.microsoft.MoE`` expresses exactly
is swapped, for the duration of the export, for a wrapper whose expert compute is one
``moefx::ort_moe`` op; its translation emits the contrib node (SPEC.md §4). Routing stays in
standard ONNX ops (the router, ``xmoe_select``, ``capacity_drop``), so the contrib op only ever
sees the final per-row expert weights and the rest of the model exports normally.

Where the layer's routing *is* the contrib op's own (softmax over all E, then top-k: XMoE
``top_k`` with ``combine="prob"`` and no capacity, whose weights are the raw probabilities,
``normalize_routing_weights=0``; SliceMoE ``gate="output"``, whose k weights are renormalised,
``normalize_routing_weights=1``), the router's logits go to the node directly
(``moefx::ort_moe_routed``): no Softmax, TopK or log-weight scatter around it.

What the contrib op cannot do exactly, and therefore what falls back to the portable form:

- input gating (SliceMoE ``gate="input"``): the op scales expert outputs, never inputs;
- erf GELU: the op's ``"gelu"`` is the tanh approximation (accepted with ``accept_gelu_tanh``);
- GLU other than SiLU/quick-GELU gates: on CPU GLU exists only as SwiGLU,
  ``g * sigmoid(alpha * g) * (l + beta)`` with gate/up rows interleaved (``swiglu_fusion=1``;
  onnxruntime has no fc3 on CPU), which is SiLU-GLU at alpha=1 and quick-GELU-GLU at
  alpha=1.702, beta=0 (checked on onnxruntime 1.32 against silu(gate) * up, also for inputs
  with |g| > 30: no implicit clamp when ``swiglu_limit`` is absent);
- ``quick_gelu`` and ``relu2`` (squared ReLU) without GLU, and any dtype but float32 (the CPU kernel moefx has checked).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor, nn

import moefx.kernels  # noqa: F401  (registers torch.ops.moefx.*)

CONTRIB = "com.microsoft.MoE"
PORTABLE = "portable"

_PLAIN_ACTIVATIONS = {"relu": "relu", "silu": "silu", "identity": "identity", "gelu_tanh": "gelu"}
_SWIGLU_ALPHA = {"silu": 1.0, "quick_gelu": 1.702}


@torch.library.custom_op("moefx::ort_moe", mutates_args=())
def ort_moe(
    x: Tensor,
    idx: Tensor,
    weight: Tensor,
    fc1: Tensor,
    fc1_bias: Optional[Tensor],
    fc2: Tensor,
    fc2_bias: Optional[Tensor],
    activation_type: str,
    k: int,
    swiglu_fusion: int,
    activation_alpha: float,
    activation_beta: float,
) -> Tensor:
    """``y[n] = Σ_j weight[n,j] · FFN_{idx[n,j]}(x[n])`` with onnxruntime MoE's weight layout and
    activation names (fc1 rows interleaved gate/up when ``swiglu_fusion == 1``); the PyTorch
    side of the op the exporter translates to ``com.microsoft.MoE``."""
    w1, b1, w3, b3, activation = _unfuse(fc1, fc1_bias, activation_type, swiglu_fusion, activation_alpha, activation_beta)
    return torch.ops.moefx.moe_ffn(x, idx, weight, w1, b1, w3, b3, fc2, fc2_bias, activation, False)


@ort_moe.register_fake
def _(x, idx, weight, fc1, fc1_bias, fc2, fc2_bias, activation_type, k, swiglu_fusion, activation_alpha, activation_beta):
    return torch.empty_like(x)


@torch.library.custom_op("moefx::ort_moe_routed", mutates_args=())
def ort_moe_routed(
    x: Tensor,
    logits: Tensor,
    fc1: Tensor,
    fc1_bias: Optional[Tensor],
    fc2: Tensor,
    fc2_bias: Optional[Tensor],
    activation_type: str,
    k: int,
    normalize: int,
    swiglu_fusion: int,
    activation_alpha: float,
    activation_beta: float,
) -> Tensor:
    """``com.microsoft.MoE`` routing its rows itself: ``p = softmax(logits)`` over all E, the
    top ``k`` experts by p, weighted by p (renormalised over the k when ``normalize``)."""
    probs = torch.softmax(logits.float(), dim=-1)
    weight, idx = probs.topk(k, dim=-1)
    if normalize:
        weight = weight / weight.sum(-1, keepdim=True)
    return ort_moe(x, idx, weight.to(x.dtype), fc1, fc1_bias, fc2, fc2_bias, activation_type, k,
                   swiglu_fusion, activation_alpha, activation_beta)


@ort_moe_routed.register_fake
def _(x, logits, fc1, fc1_bias, fc2, fc2_bias, activation_type, k, normalize, swiglu_fusion, activation_alpha,
      activation_beta):
    return torch.empty_like(x)


def _unfuse(fc1, fc1_bias, activation_type, swiglu_fusion, alpha, beta):
    if activation_type == "swiglu":
        if swiglu_fusion != 1:
            raise ValueError(f"moefx::ort_moe: swiglu needs swiglu_fusion=1 (interleaved), got {swiglu_fusion}")
        if beta != 0.0:
            raise ValueError(f"moefx::ort_moe: activation_beta must be 0 for moefx GLU layers, got {beta}")
        by_alpha = {v: name for name, v in _SWIGLU_ALPHA.items()}
        if alpha not in by_alpha:
            raise ValueError(f"moefx::ort_moe: activation_alpha {alpha} matches no moefx GLU activation")
        b1 = None if fc1_bias is None else fc1_bias[:, 0::2]
        b3 = None if fc1_bias is None else fc1_bias[:, 1::2]
        return fc1[:, 0::2], b1, fc1[:, 1::2], b3, by_alpha[alpha]
    names = {v: k for k, v in _PLAIN_ACTIVATIONS.items()}
    if activation_type not in names:
        raise ValueError(f"moefx::ort_moe: unknown activation_type {activation_type!r}")
    return fc1, fc1_bias, None, None, names[activation_type]


def interleave_rows(gate: Tensor, up: Tensor) -> Tensor:
    """``[E, h, ...]`` gate and up → ``[E, 2h, ...]`` with rows g0, u0, g1, u1, ... (SwiGLU
    ``swiglu_fusion=1``)."""
    return torch.stack([gate, up], dim=2).reshape(gate.shape[0], 2 * gate.shape[1], *gate.shape[2:])


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """What the ``ort`` target does with one MoE layer, and why."""

    path: str
    kind: str
    emitted: str
    reason: str
    activation_type: Optional[str] = None
    swiglu_alpha: Optional[float] = None
    k: int = 0
    approximated: bool = False
    direct: bool = False
    """The router's logits feed the contrib op, which does softmax and top-k itself."""


def _layer_kinds():
    from moefx.layers import SliceMoE, XMoE

    return XMoE, SliceMoE


def moe_layers(model: nn.Module):
    """``(path, layer)`` for every moefx MoE layer in ``model``, outermost first."""
    XMoE, SliceMoE = _layer_kinds()
    return [(name or "<root>", m) for name, m in model.named_modules() if isinstance(m, (XMoE, SliceMoE))]


def plan_layer(path: str, layer: nn.Module, target: str, accept_gelu_tanh: bool = False) -> LayerPlan:
    """Decide contrib op or portable form for one layer (reasons are user-facing)."""
    XMoE, SliceMoE = _layer_kinds()
    kind = type(layer).__name__
    if target == "portable":
        return LayerPlan(path, kind, PORTABLE, "target='portable': standard ONNX ops only")
    if isinstance(layer, SliceMoE) and layer.config.gate == "input":
        return LayerPlan(path, kind, PORTABLE, "SliceMoE gate='input' scales expert inputs; "
                         "com.microsoft.MoE only gates outputs")
    if layer.w1.dtype != torch.float32:
        return LayerPlan(path, kind, PORTABLE, f"weights are {layer.w1.dtype}; the com.microsoft.MoE "
                         "path is checked for float32 only")
    k = layer.config.max_selected if isinstance(layer, XMoE) else layer.config.top_k
    plan = _contrib_plan(path, kind, layer, k, accept_gelu_tanh)
    if plan.emitted == CONTRIB and _routes_like_contrib(layer):
        plan = dataclasses.replace(plan, direct=True,
                                   reason=plan.reason + "; top-k routing inside the node")
    return plan


def _routes_like_contrib(layer: nn.Module) -> bool:
    """Whether the layer's inference routing is exactly the contrib op's own (module docstring)."""
    XMoE, _ = _layer_kinds()
    if layer.training:  # SliceMoE's cross-slice dropout; XMoE's routing is the same, kept simple
        return False
    if isinstance(layer, XMoE):
        cfg = layer.config
        return cfg.top_k is not None and layer.combine == "prob" and cfg.capacity_factor is None
    return True  # SliceMoE, gate="output" (input gating never reaches the contrib op)


def _contrib_plan(path: str, kind: str, layer: nn.Module, k: int, accept_gelu_tanh: bool) -> LayerPlan:
    act = layer.activation
    if layer.glu:
        if act not in _SWIGLU_ALPHA:
            return LayerPlan(path, kind, PORTABLE, f"GLU with {act}: onnxruntime CPU MoE has GLU only as "
                             "SwiGLU (silu or quick_gelu gate)")
        alpha = _SWIGLU_ALPHA[act]
        return LayerPlan(path, kind, CONTRIB, f"GLU {act} as interleaved SwiGLU (alpha={alpha}, beta=0)",
                         "swiglu", alpha, k)
    if act == "gelu":
        if not accept_gelu_tanh:
            return LayerPlan(path, kind, PORTABLE, "erf GELU: com.microsoft.MoE 'gelu' is the tanh "
                             "approximation (pass accept_gelu_tanh=True to accept it)")
        return LayerPlan(path, kind, CONTRIB, "erf GELU approximated by the tanh form (accept_gelu_tanh=True)",
                         "gelu", None, k, approximated=True)
    if act not in _PLAIN_ACTIVATIONS:
        return LayerPlan(path, kind, PORTABLE, f"activation {act} has no com.microsoft.MoE equivalent")
    return LayerPlan(path, kind, CONTRIB, f"{act} routed experts, exact", _PLAIN_ACTIVATIONS[act], None, k)


class OrtMoE(nn.Module):
    """Stand-in for an XMoE/SliceMoE layer during an ``ort`` export: the layer's own routing,
    then ``moefx::ort_moe`` for the routed experts; shared experts and the output bias of an
    XMoE layer stay plain PyTorch ops. Holds the original layer, whose parameters it uses."""

    def __init__(self, layer: nn.Module, plan: LayerPlan) -> None:
        super().__init__()
        XMoE, _ = _layer_kinds()
        self.layer = layer
        self.plan = plan
        self.is_xmoe = isinstance(layer, XMoE)
        self.width = layer.d_model if self.is_xmoe else layer.slice_dim
        if plan.activation_type == "swiglu":
            with torch.no_grad():
                self.register_buffer("fc1", interleave_rows(layer.w1, layer.w3), persistent=False)
                if layer.b1 is None and layer.b3 is None:
                    self.fc1_bias = None
                else:
                    b1 = layer.b1 if layer.b1 is not None else torch.zeros_like(layer.b3)
                    b3 = layer.b3 if layer.b3 is not None else torch.zeros_like(layer.b1)
                    self.register_buffer("fc1_bias", interleave_rows(b1, b3), persistent=False)
        else:
            self.fc1 = None
            self.fc1_bias = None

    def forward(self, x: Tensor) -> Tensor:
        layer, plan = self.layer, self.plan
        x2d = x.reshape(-1, layer.d_model)
        fc1 = self.fc1 if self.fc1 is not None else layer.w1
        fc1_bias = self.fc1_bias if self.fc1 is not None else layer.b1
        fc2_bias = None if self.is_xmoe else layer.b2
        rows = x2d.reshape(-1, self.width)
        activation = (plan.activation_type, plan.k)
        swiglu = (1 if plan.activation_type == "swiglu" else 0,
                  plan.swiglu_alpha if plan.swiglu_alpha is not None else 1.0, 0.0)
        if plan.direct:
            normalize = 0 if self.is_xmoe else 1
            y = torch.ops.moefx.ort_moe_routed(rows, self._logits(rows), fc1, fc1_bias, layer.w2, fc2_bias,
                                               *activation, normalize, *swiglu)
        else:
            idx, weight, _ = layer.route(x2d)
            if self.is_xmoe:
                weight = layer.combine_weight(idx, weight)
            y = torch.ops.moefx.ort_moe(rows, idx, weight, fc1, fc1_bias, layer.w2, fc2_bias, *activation, *swiglu)
        y = y.reshape(x2d.shape)
        if self.is_xmoe:
            if layer.config.num_shared:
                y = y + layer.shared_ffn(x2d)
            if layer.bias is not None:
                y = y + layer.bias
        return y.reshape(x.shape)

    def _logits(self, rows: Tensor) -> Tensor:
        """The router's float32 logits for ``rows`` (the layer's own router, before softmax)."""
        layer = self.layer
        if self.is_xmoe:
            return torch.nn.functional.linear(rows.float(), layer.router.weight.float())
        lin1, lin2 = layer.router[0], layer.router[2]
        hidden = torch.relu(torch.nn.functional.linear(rows.float(), lin1.weight.float(), lin1.bias.float()))
        return torch.nn.functional.linear(hidden, lin2.weight.float(), lin2.bias.float())


class swapped_layers:
    """Context manager: put an :class:`OrtMoE` in place of every layer planned for the contrib
    op, and put the original layers back on exit, whatever happened (the user's model is never
    left modified)."""

    def __init__(self, model: nn.Module, plans: list) -> None:
        self.model = model
        self.plans = [p for p in plans if p.emitted == CONTRIB]
        self._undo = []

    def __enter__(self) -> nn.Module:
        """Returns the module to export: the model, or a wrapper when the model is itself an
        MoE layer planned for the contrib op."""
        modules = dict(self.model.named_modules())
        for plan in self.plans:
            if plan.path == "<root>":
                return OrtMoE(self.model, plan)
            parent_name, _, child = plan.path.rpartition(".")
            parent = modules[parent_name] if parent_name else self.model
            original = getattr(parent, child)
            setattr(parent, child, OrtMoE(original, plan))
            self._undo.append((parent, child, original))
        return self.model

    def __exit__(self, *exc):
        for parent, child, original in reversed(self._undo):
            setattr(parent, child, original)
        self._undo.clear()
        return False
