"""``fuse_gemm_scatter``: grouped_gemm + combine (weight, scatter-add) -> moefx::gemm2_scatter."""
import collections

import torch
from torch import nn

from moefx.config import SliceMoEConfig
from moefx.layers import SliceMoE
from moefx.passes.fuse_gemm_scatter import FuseGemmScatter
from moefx.passes.lower import LowerMoE
from moefx.passes.optimize import _MoELeafTracer

OPS = torch.ops.moefx
KEYS = ("grouped_gemm", "combine", "gemm2_scatter")


def counts(gm):
    c = collections.Counter(str(n.target).split(".")[1] for n in gm.graph.nodes
                            if n.op == "call_function" and "moefx" in str(n.target))
    return [c[k] for k in KEYS]


def test_fuses_gemm2_and_combine():
    torch.manual_seed(0)
    layer = SliceMoE(SliceMoEConfig(num_slices=4, num_experts=6, top_k=2, router_hidden=8, gate="output"),
                     24, 32, activation="gelu_tanh")
    root = nn.Sequential(layer).eval()
    gm = LowerMoE(block_m=4)(torch.fx.GraphModule(root, _MoELeafTracer().trace(root))).graph_module
    x = torch.randn(6, 24)
    with torch.no_grad():
        want = gm(x)
    assert counts(gm) == [2, 1, 0]
    fuse = FuseGemmScatter()
    assert fuse(gm).modified
    assert counts(gm) == [1, 0, 1]
    fused = next(n for n in gm.graph.nodes if "gemm2_scatter" in str(n.target))
    assert fused.args[4] is True  # output gating: the weight is applied in the epilogue
    with torch.no_grad():
        torch.testing.assert_close(gm(x), want, rtol=1e-6, atol=1e-6)


class Experts(nn.Module):
    def __init__(self, read_outputs=False, second_dispatch=False):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(3, 6, 4))
        self.w2 = nn.Parameter(torch.randn(3, 4, 6))
        self.read_outputs = read_outputs
        self.second_dispatch = second_dispatch

    def forward(self, x, idx, weight):
        d = OPS.dispatch(idx, 3, 4)
        blocks = OPS.dispatch(idx, 3, 8)[1] if self.second_dispatch else d[1]
        rows = OPS.gather_rows(x, d[0], weight, False)
        hid = OPS.activation(OPS.grouped_gemm(rows, d[1], self.w1, None), "relu")
        out = OPS.grouped_gemm(hid, blocks, self.w2, None)
        y = OPS.combine(out, d[0], weight, True)
        return (y, out.sum()) if self.read_outputs else y


def test_does_not_fire_when_expert_outputs_have_other_users():
    gm = torch.fx.symbolic_trace(Experts(read_outputs=True))
    fuse = FuseGemmScatter()
    assert not fuse(gm).modified
    assert counts(gm) == [2, 1, 0]
    assert "other users" in fuse.fired[0]


def test_does_not_fire_across_different_dispatches():
    gm = torch.fx.symbolic_trace(Experts(second_dispatch=True))
    assert not FuseGemmScatter()(gm).modified
    assert counts(gm) == [2, 1, 0]
