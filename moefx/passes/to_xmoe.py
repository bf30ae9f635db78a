"""Rewrite pass: dense FFN blocks -> converted XMoE layers (SPEC.md §1).

``ToXMoE(config).call(gm)`` edits a captured GraphModule: each FFN found in it (or those chosen
by ``filter_fn(module, fqn)`` or a ``{path: XMoEConfig}`` map) is replaced by one
``call_module`` to an XMoE layer holding the block's own weights, partitioned by
``config.split`` (see :mod:`moefx.convert.partition`). Use :func:`moefx.convert` to keep the
user's model (module swaps) whenever the blocks allow it; this pass is its graph fallback and
the building block of a custom pipeline (``PassManager([ToXMoE(cfg)]).run(gm)``).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Union

import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..config import XMoEConfig
from ..convert.dense import DenseFFN
from ..convert.init_xmoe import build_xmoe
from ..convert.partition import partition
from ..convert.rewrite import graph_replace, select, unique_name


def xmoe_layer_for(match, config: XMoEConfig, model: Optional[nn.Module] = None, stats=None, seed: int = 0) -> nn.Module:
    """An XMoE layer computing ``match``'s dense FFN (exactly, with every expert kept)."""
    where = match.path if match.path else match.name
    if not isinstance(config, XMoEConfig):
        raise TypeError(f"ToXMoE needs an XMoEConfig for '{where}', got {type(config).__name__}")
    config.validate_for(match.d_model, match.d_ff, where)
    weights = match.dense_weights(model)
    dtype = weights["w1"].dtype
    dense = DenseFFN.from_dict(weights, match.activation)
    groups = partition(dense, config.num_experts, config.split, config.num_shared, stats=stats, seed=seed, path=where)
    return build_xmoe(dense, config, groups, path=where, dtype=dtype)


class ToXMoE(PassBase):
    """Replace FFN blocks of a GraphModule by XMoE layers (graph edit; see the module docstring).

    ``stats``: optional ``{match name or path: NeuronStats}`` for activation-based splits and
    shared neurons. After ``call``, ``self.converted`` maps each new submodule name to the
    match it replaced.
    """

    kind = "xmoe"

    def __init__(
        self,
        config: Union[XMoEConfig, Dict[str, XMoEConfig]],
        filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
        model: Optional[nn.Module] = None,
        stats: Optional[dict] = None,
        matches=None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.config, self.filter_fn, self.model = config, filter_fn, model
        self.stats, self.matches, self.seed = stats or {}, matches, seed
        self.converted: dict = {}

    def build(self, match, config, model):
        key = match.path if match.path is not None else match.name
        return xmoe_layer_for(match, config, model, stats=self.stats.get(key), seed=self.seed)

    def call(self, gm: fx.GraphModule) -> PassResult:
        from ..passes.find_ffn import find_ffns_in_graph

        matches = self.matches if self.matches is not None else find_ffns_in_graph(gm, model=self.model)
        owner = self.model if self.model is not None else gm
        chosen = select(owner, matches, self.config, self.filter_fn)
        for match, cfg in chosen:
            layer = self.build(match, cfg, self.model if self.model is not None else gm)
            name = unique_name(gm, f"moefx_{self.kind}_{match.path or match.name}")
            graph_replace(gm, match, layer, name)
            self.converted[name] = match
        return PassResult(gm, bool(chosen))
