"""Initialising a SliceMoE layer from a dense FFN (SPEC.md §2), before calibration refines it.

A SliceMoE expert maps one d/S slice of the token to a d/S slice of the output, so no exact
copy of a dense FFN exists: the dense FFN mixes all of x into every neuron. The starting point
is the dense FFN's *block-diagonal* part, which is what an expert can represent:

- expert ``e`` gets a home slice ``s = e mod S`` and a rank ``r = e div S`` among the experts
  of that slice;
- the dense neurons are ranked by how much they connect slice s in to slice s out,
  ``||W1[i, s]|| * ||W2[s, i]||``, and expert e takes ``h_e`` of them, rank ``r`` taking the
  next block (wrapping around when the experts of a slice want more than d_ff neurons);
- ``w1[e] = W1[neurons, s] * k`` (and ``w3`` likewise): with ``gate="input"`` a slice reaches
  each of its k experts scaled by a routing weight of about 1/k, which this undoes at init;
  ``w2[e] = W2[s, neurons]``; biases are copied (``b2`` split evenly over the k experts).

The router (an MLP shared by all slices) keeps its fresh initialisation: which expert a slice
should use is learnt by calibration, which trains the whole layer against the dense output
(``moefx.calibrate``). The dense FFN is kept on the layer as ``moefx_teacher`` (not a
parameter, not saved) until calibration has used it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..config import SliceMoEConfig
from .dense import DenseFFN


def build_slicemoe(dense: DenseFFN, config: SliceMoEConfig, path: Optional[str] = None,
                   dtype: Optional[torch.dtype] = None, seed: int = 0) -> nn.Module:
    from moefx.layers import SliceMoE

    config.validate_for(dense.d_model, dense.d_ff, path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer = SliceMoE(config, dense.d_model, dense.d_ff, activation=dense.activation, glu=dense.glu)
    S, E, k = config.num_slices, config.num_experts, config.top_k
    ds, h = layer.slice_dim, layer.expert_hidden
    w1, w2 = dense.w1.float(), dense.w2.float()
    with torch.no_grad():
        for e in range(E):
            s, r = e % S, e // S
            cols = slice(s * ds, (s + 1) * ds)
            score = w1[:, cols].norm(dim=1) * w2[cols, :].norm(dim=0)
            order = score.argsort(descending=True)
            take = torch.arange(r * h, (r + 1) * h) % dense.d_ff
            neurons = order[take]
            layer.w1[e].copy_(w1[neurons][:, cols] * k)
            layer.b1[e].copy_(dense.b1[neurons] if dense.b1 is not None else torch.zeros(h))
            if dense.glu:
                layer.w3[e].copy_(dense.w3.float()[neurons][:, cols])
                layer.b3[e].copy_(dense.b3[neurons] if dense.b3 is not None else torch.zeros(h))
            layer.w2[e].copy_(w2[cols][:, neurons])
            layer.b2[e].copy_(dense.b2[cols] / k if dense.b2 is not None else torch.zeros(ds))
    layer.moefx_teacher = dense
    if dtype is not None:
        layer.to(dtype)
    return layer
