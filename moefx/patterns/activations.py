"""Activation functions as the FFN matcher sees them: one canonical name per function.

Models write the same activation many ways: ``nn.GELU()``, ``F.gelu``, HF's
``NewGELUActivation`` (a tanh formula spelled out in ~9 pointwise ops), ``FastGELU``,
``x * torch.sigmoid(1.702 * x)``, ``x * sigmoid(x)``, ``relu(x) ** 2`` / ``torch.square(relu(x))``... Rather than one pattern per spelling,
the canonicalisation pass (:class:`moefx.passes.canonicalize.CanonicalizeActivations`) takes any
small cone of pointwise ops that depends on one tensor and *evaluates* it on a probe vector; when
the values agree with a known activation to 1e-7 it replaces the cone with one canonical node.
That catches spellings nobody wrote a pattern for, and cannot confuse GELU (erf) with its tanh
approximation (they differ by up to 5e-4 on the probe).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

aten = torch.ops.aten


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's ``x * sigmoid(1.702 x)``; a graph target of its own, since aten has no such op."""
    return x * torch.sigmoid(1.702 * x)


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    """The squared ReLU of Primer / Nemotron / Persimmon / Arcee; a graph target of its own."""
    return torch.relu(x).square()


#: Canonical activation names that an FFN may use (the names of SPEC.md / moefx.config).
FFN_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "quick_gelu": quick_gelu,
    "relu2": relu_squared,
}

#: The names above, as error messages list them.
FFN_ACTIVATION_NAMES = ", ".join(FFN_ACTIVATIONS)

#: Nonlinearities that are not FFN activations moefx can convert; seen between two Linears they
#: make a rejected near-match whose reason names them.
OTHER_NONLINEAR = {
    aten.tanh.default: "tanh",
    aten.sigmoid.default: "sigmoid",
    aten.elu.default: "elu",
    aten.leaky_relu.default: "leaky_relu",
    aten.hardtanh.default: "hardtanh",
    aten.relu6.default: "relu6",
    aten.mish.default: "mish",
    aten.softplus.default: "softplus",
    aten.hardswish.default: "hardswish",
    aten.hardsigmoid.default: "hardsigmoid",
    aten.selu.default: "selu",
    aten.celu.default: "celu",
    aten.softmax.int: "softmax",
    aten._softmax.default: "softmax",
    aten.log_softmax.int: "log_softmax",
}


def activation_of(node) -> Optional[str]:
    """Canonical name of the activation a (canonicalised) node computes, or None."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    t = node.target
    if t in (aten.relu.default,):
        return "relu"
    if t in (aten.silu.default,):
        return "silu"
    if t is quick_gelu:
        return "quick_gelu"
    if t is relu_squared:
        return "relu2"
    if t in (aten.gelu.default,):
        approx = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        return "gelu_tanh" if approx == "tanh" else "gelu"
    return None


def other_nonlinearity(node) -> Optional[str]:
    if isinstance(node, fx.Node) and node.op == "call_function":
        return OTHER_NONLINEAR.get(node.target)
    return None


def canonical_call(name: str):
    """``(target, args_after_x, kwargs)`` of the node that computes activation ``name``."""
    if name == "relu":
        return aten.relu.default, (), {}
    if name == "gelu":
        return aten.gelu.default, (), {}
    if name == "gelu_tanh":
        return aten.gelu.default, (), {"approximate": "tanh"}
    if name == "silu":
        return aten.silu.default, (), {}
    if name == "quick_gelu":
        return quick_gelu, (), {}
    if name == "relu2":
        return relu_squared, (), {}
    raise KeyError(name)


#: Pointwise aten ops a spelled-out activation may use; anything else ends the cone.
POINTWISE = {
    aten.mul.Tensor, aten.mul.Scalar, aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor,
    aten.sub.Scalar, aten.rsub.Scalar, aten.rsub.Tensor, aten.div.Tensor, aten.div.Scalar,
    aten.pow.Tensor_Scalar, aten.tanh.default, aten.erf.default, aten.sigmoid.default,
    aten.exp.default, aten.neg.default, aten.reciprocal.default, aten.sqrt.default,
    aten.rsqrt.default, aten.relu.default, aten.clamp_min.default, aten.clamp.default,
    aten.gelu.default, aten.silu.default, aten.square.default, aten.abs.default,
    aten.log1p.default, aten.expm1.default, aten.softplus.default,
}

MAX_CONE = 24
"""The largest spelled-out activation (pointwise nodes) the canonicaliser evaluates."""


def pointwise_cone(root, max_nodes: int = MAX_CONE):
    """``(members, x)``: the pointwise nodes of the cone ending at ``root`` (graph order not
    guaranteed) and the one tensor it reads, or None when ``root`` is not pointwise, the cone
    reads more than one tensor, or it is larger than ``max_nodes``."""
    if not (isinstance(root, fx.Node) and root.op == "call_function" and root.target in POINTWISE):
        return None
    members: list = []
    leaves: set = set()
    stack, seen = [root], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_function" and n.target in POINTWISE and (n is root or len(members) < max_nodes):
            members.append(n)
            for a in list(n.args) + list(n.kwargs.values()):
                if isinstance(a, fx.Node):
                    stack.append(a)
                elif not isinstance(a, (int, float, bool, str, type(None))):
                    return None
        else:
            leaves.add(n)
    if len(leaves) != 1 or len(members) > max_nodes:
        return None
    return members, next(iter(leaves))


def describe_cone(members) -> str:
    """``"relu, square"``: the distinct ops of a cone, for messages."""
    names = []
    for m in members:
        name = getattr(m.target, "__name__", str(m.target)).split(".")[0]
        if name not in names:
            names.append(name)
    return ", ".join(sorted(names))


PROBE = torch.linspace(-6.0, 6.0, 97, dtype=torch.float64)
_REFERENCE = {name: fn(PROBE) for name, fn in FFN_ACTIVATIONS.items()}


def identify(fn_values: torch.Tensor) -> Optional[str]:
    """Which canonical activation takes PROBE to ``fn_values`` (to 1e-7), if any."""
    if fn_values.shape != PROBE.shape or not torch.isfinite(fn_values).all():
        return None
    for name, ref in _REFERENCE.items():
        if torch.allclose(fn_values, ref, rtol=1e-7, atol=1e-7):
            return name
    return None
