"""The activation functions every moefx layer, op and reference shares.

One table keeps the names of SPEC.md and docs/ARCHITECTURE.md (`relu, gelu, gelu_tanh, silu,
quick_gelu, relu2, identity`) bound to one definition each, so the fast path, the float64
reference and the exporters cannot drift apart on what "gelu" means (erf form; `gelu_tanh` is
the tanh form that onnxruntime's contrib MoE calls "gelu"). `relu2` is the squared ReLU,
``relu(x) ** 2``, of Primer, Nemotron, Persimmon and Arcee.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from moefx.config import ACTIVATIONS, ConfigError


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _relu2(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


_FORWARD: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "quick_gelu": _quick_gelu,
    "relu2": _relu2,
    "identity": _identity,
}


def check_activation(name: str, where: str = "activation") -> str:
    """Return ``name`` if moefx knows it, else raise naming the valid choices."""
    if name not in _FORWARD:
        raise ConfigError(f"{where}={name!r} is not supported; use one of {ACTIVATIONS}")
    return name


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The out-of-place activation function called ``name``."""
    return _FORWARD[check_activation(name)]


def activation_(name: str, z: torch.Tensor) -> torch.Tensor:
    """Apply the activation in place where torch offers it (saves one buffer per expert)."""
    if name == "relu":
        return z.relu_()
    if name == "silu":
        return F.silu(z, inplace=True)
    if name == "gelu":
        return torch._C._nn.gelu_(z)
    if name == "gelu_tanh":
        return torch._C._nn.gelu_(z, approximate="tanh")
    if name == "relu2":
        return z.relu_().square_()
    if name == "identity":
        return z
    return z.copy_(_FORWARD[name](z))


def activation_backward(name: str, grad: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """d act(z)/dz · grad, written out so that the ops' backward needs no autograd tape."""
    if name == "relu":
        return grad * (z > 0).to(grad.dtype)
    if name == "gelu":
        return torch.ops.aten.gelu_backward(grad, z, approximate="none")
    if name == "gelu_tanh":
        return torch.ops.aten.gelu_backward(grad, z, approximate="tanh")
    if name == "silu":
        return torch.ops.aten.silu_backward(grad, z)
    if name == "quick_gelu":
        s = torch.sigmoid(1.702 * z)
        return grad * (s + 1.702 * z * s * (1 - s))
    if name == "relu2":
        return grad * (2.0 * z.clamp_min(0))
    if name == "identity":
        return grad
    raise ConfigError(f"activation={name!r} is not supported; use one of {ACTIVATIONS}")
