"""A dense FFN as plain tensors, and the hidden activations conversion reasons about.

Everything in conversion (partitioning, routers, calibration targets) works on the canonical
form that ``FFNMatch.dense_weights`` returns: ``w1 [d_ff, d]`` (W1, or W_gate for a GLU),
``b1``, ``w3 [d_ff, d]`` (W_up, GLU only), ``b3``, ``w2 [d, d_ff]``, ``b2``. Keeping it as a
small dataclass rather than the user's modules lets the same code serve every FFN layout
(``nn.Linear``, GPT-2 ``Conv1D``, fused gate/up projections).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from ..layers.activations import activation_fn


@dataclass
class DenseFFN:
    w1: torch.Tensor
    w2: torch.Tensor
    activation: str
    b1: Optional[torch.Tensor] = None
    w3: Optional[torch.Tensor] = None
    b3: Optional[torch.Tensor] = None
    b2: Optional[torch.Tensor] = None

    @classmethod
    def from_dict(cls, weights: Dict[str, Optional[torch.Tensor]], activation: str) -> "DenseFFN":
        get = lambda k: None if weights.get(k) is None else weights[k].detach().float().clone()
        return cls(w1=get("w1"), w2=get("w2"), activation=activation, b1=get("b1"),
                   w3=get("w3"), b3=get("b3"), b2=get("b2"))

    @property
    def d_model(self) -> int:
        return self.w1.shape[1]

    @property
    def d_ff(self) -> int:
        return self.w1.shape[0]

    @property
    def glu(self) -> bool:
        return self.w3 is not None

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """``act(W1 x + b1) * (W3 x + b3)``: the d_ff activations that W2 mixes."""
        h = activation_fn(self.activation)(F.linear(x, self.w1.to(x.dtype), _opt(self.b1, x)))
        if self.w3 is not None:
            h = h * F.linear(x, self.w3.to(x.dtype), _opt(self.b3, x))
        return h

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.hidden(x), self.w2.to(x.dtype), _opt(self.b2, x))


def _opt(t: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    return None if t is None else t.to(like.dtype)
