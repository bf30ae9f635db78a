"""Rewrite pass: dense FFN blocks -> SliceMoE layers initialised from the dense weights.

Same interface as :mod:`moefx.passes.to_xmoe` (``ToSliceMoE(config).call(gm)``, ``filter_fn``
or a ``{path: SliceMoEConfig}`` map). The initialisation is described in
:mod:`moefx.convert.init_slicemoe`; unlike XMoE it is an approximation that
:func:`moefx.calibrate` refines, using the dense FFN the layer keeps as ``moefx_teacher``.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from ..config import SliceMoEConfig
from ..convert.dense import DenseFFN
from ..convert.init_slicemoe import build_slicemoe
from .to_xmoe import ToXMoE


def slicemoe_layer_for(match, config: SliceMoEConfig, model: Optional[nn.Module] = None, seed: int = 0) -> nn.Module:
    where = match.path if match.path else match.name
    if not isinstance(config, SliceMoEConfig):
        raise TypeError(f"ToSliceMoE needs a SliceMoEConfig for '{where}', got {type(config).__name__}")
    config.validate_for(match.d_model, match.d_ff, where)
    weights = match.dense_weights(model)
    dense = DenseFFN.from_dict(weights, match.activation)
    return build_slicemoe(dense, config, path=where, dtype=weights["w1"].dtype, seed=seed)


class ToSliceMoE(ToXMoE):
    """Replace FFN blocks of a GraphModule by SliceMoE layers (graph edit)."""

    kind = "slicemoe"

    def build(self, match, config, model):
        return slicemoe_layer_for(match, config, model, seed=self.seed)
