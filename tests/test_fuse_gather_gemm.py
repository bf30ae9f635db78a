"""``fuse_gather_gemm``: gather_rows + grouped_gemm + activation (+ GLU) -> moefx::gather_gemm1."""
import collections

import pytest
import torch
from torch import nn

from moefx.config import XMoEConfig
from moefx.layers import XMoE
from moefx.passes.fuse_gather_gemm import FuseGatherGemm
from moefx.passes.lower import LowerMoE
from moefx.passes.optimize import _MoELeafTracer

OPS = torch.ops.moefx
KEYS = ("gather_rows", "grouped_gemm", "activation", "glu_mul", "gather_gemm1")


def lowered(layer):
    root = nn.Sequential(layer).eval()
    gm = torch.fx.GraphModule(root, _MoELeafTracer().trace(root))
    return LowerMoE(block_m=8)(gm).graph_module


def counts(gm):
    c = collections.Counter(str(n.target).split(".")[1] for n in gm.graph.nodes
                            if n.op == "call_function" and "moefx" in str(n.target))
    return [c[k] for k in KEYS]


@pytest.mark.parametrize("glu,before,after", [
    (False, [1, 2, 1, 0, 0], [0, 1, 0, 0, 1]),
    (True, [1, 3, 1, 1, 0], [0, 1, 0, 0, 1]),
])
def test_fuses_gather_gemm_activation(glu, before, after):
    torch.manual_seed(0)
    layer = XMoE(XMoEConfig(num_experts=5, threshold=0.8), 16, 40, activation="silu", glu=glu)
    gm = lowered(layer)
    x = torch.randn(11, 16)
    with torch.no_grad():
        want = gm(x)
    assert counts(gm) == before
    fuse = FuseGatherGemm()
    assert fuse(gm).modified
    assert counts(gm) == after
    with torch.no_grad():
        torch.testing.assert_close(gm(x), want, rtol=1e-6, atol=1e-6)
    assert ("glu_mul" in fuse.fired[0]) == glu


class GatheredRowsReadTwice(nn.Module):
    """The gathered rows feed the expert GEMM and something else: they must stay in memory."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(3, 6, 4))
        self.w2 = nn.Parameter(torch.randn(3, 4, 6))

    def forward(self, x, idx, weight):
        d = OPS.dispatch(idx, 3, 4)
        rows = OPS.gather_rows(x, d[0], weight, False)
        hid = OPS.activation(OPS.grouped_gemm(rows, d[1], self.w1, None), "relu")
        y = OPS.combine(OPS.grouped_gemm(hid, d[1], self.w2, None), d[0], weight, True)
        return y, rows.sum()


def test_does_not_fire_when_gathered_rows_have_other_users():
    gm = torch.fx.symbolic_trace(GatheredRowsReadTwice())
    fuse = FuseGatherGemm()
    assert not fuse(gm).modified
    assert counts(gm) == [1, 2, 1, 0, 0]
    assert "other users" in fuse.fired[0]
