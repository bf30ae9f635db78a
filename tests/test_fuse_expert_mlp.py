"""``fuse_expert_mlp``: gather_gemm1 + gemm2_scatter -> moefx::expert_mlp (narrow experts)."""
import collections

import pytest
import torch
from torch import nn

from moefx.config import SliceMoEConfig, XMoEConfig
from moefx.layers import SliceMoE, XMoE
from moefx.passes.fuse_expert_mlp import FuseExpertMLP
from moefx.passes.fuse_gather_gemm import FuseGatherGemm
from moefx.passes.fuse_gemm_scatter import FuseGemmScatter
from moefx.passes.lower import LowerMoE
from moefx.passes.optimize import _MoELeafTracer

OPS = torch.ops.moefx
KEYS = ("gather_gemm1", "gemm2_scatter", "expert_mlp")


def half_fused(layer):
    root = nn.Sequential(layer).eval()
    gm = LowerMoE(block_m=8)(torch.fx.GraphModule(root, _MoELeafTracer().trace(root))).graph_module
    FuseGatherGemm()(gm)
    FuseGemmScatter()(gm)
    return gm


def counts(gm):
    c = collections.Counter(str(n.target).split(".")[1] for n in gm.graph.nodes
                            if n.op == "call_function" and "moefx" in str(n.target))
    return [c[k] for k in KEYS]


def test_fuses_narrow_slicemoe_experts():
    """SliceMoE's slices (here 72 wide, like d=576 cut in 8) get the whole-MLP op."""
    torch.manual_seed(0)
    layer = SliceMoE(SliceMoEConfig(num_slices=2, num_experts=4, top_k=2, router_hidden=8), 144, 64,
                     glu=True)
    gm = half_fused(layer)
    x = torch.randn(5, 144)
    with torch.no_grad():
        want = gm(x)
        ref = layer(x)
    assert counts(gm) == [1, 1, 0]
    fuse = FuseExpertMLP()
    assert fuse(gm).modified
    assert counts(gm) == [0, 0, 1]
    with torch.no_grad():
        got = gm(x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert "(width 72)" in fuse.fired[0]


def test_does_not_fire_for_experts_wider_than_the_tile():
    layer = XMoE(XMoEConfig(num_experts=4, threshold=0.8), 32, 64)
    gm = half_fused(layer)
    fuse = FuseExpertMLP(max_width=16)
    assert not fuse(gm).modified
    assert counts(gm) == [1, 1, 0]
    assert "width 32 > 16" in fuse.fired[0]


class HiddenReadTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(3, 6, 4))
        self.w2 = nn.Parameter(torch.randn(3, 4, 6))

    def forward(self, x, idx, weight):
        d = OPS.dispatch(idx, 3, 4)
        hid = OPS.gather_gemm1(x, d[0], d[1], weight, False, self.w1, None, None, None, "relu")
        y = OPS.gemm2_scatter(hid, d[0], d[1], weight, True, self.w2, None)
        return y, hid.sum()


def test_does_not_fire_when_hidden_activations_are_read_elsewhere():
    gm = torch.fx.symbolic_trace(HiddenReadTwice())
    fuse = FuseExpertMLP()
    assert not fuse(gm).modified
    assert counts(gm) == [1, 1, 0]
    assert "other users" in fuse.fired[0]


def test_max_width_beyond_the_kernel_is_refused():
    with pytest.raises(ValueError, match="max_width"):
        FuseExpertMLP(max_width=1024)


def test_fused_op_shape_error_names_the_op_and_layout():
    x, idx = torch.randn(4, 8), torch.zeros(4, 1, dtype=torch.long)
    ss, be = OPS.dispatch(idx, 2, 4)
    w1, w2 = torch.randn(2, 5, 8), torch.randn(2, 8, 6)  # w2 should be [E, d, 5]
    with pytest.raises(Exception, match=r"moefx::expert_mlp: w2 must be \[E, d, h\] with h = 5"):
        OPS.expert_mlp(x, ss, be, torch.ones(4, 1), False, True, w1, None, None, None, w2, None, "relu")
