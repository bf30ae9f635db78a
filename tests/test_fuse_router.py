"""``fuse_router``: router_linear + router_softmax + select_experts -> moefx::route."""
import collections

import torch
from torch import nn

from moefx.config import SliceMoEConfig, XMoEConfig
from moefx.layers import SliceMoE, XMoE
from moefx.passes.fuse_router import FuseRouter
from moefx.passes.lower import LowerMoE
from moefx.passes.optimize import _MoELeafTracer

OPS = torch.ops.moefx


def lowered(layer):
    root = nn.Sequential(layer).eval()
    gm = torch.fx.GraphModule(root, _MoELeafTracer().trace(root))
    return LowerMoE(block_m=8)(gm).graph_module


def counts(gm):
    return collections.Counter(str(n.target).split(".")[1] for n in gm.graph.nodes
                               if n.op == "call_function" and "moefx" in str(n.target))


def test_fuses_xmoe_router_and_keeps_outputs():
    torch.manual_seed(0)
    layer = XMoE(XMoEConfig(num_experts=6, threshold=0.8), 16, 48)
    gm = lowered(layer)
    x = torch.randn(9, 16)
    with torch.no_grad():
        before = gm(x)
    assert [counts(gm)[k] for k in ("router_linear", "router_softmax", "select_experts", "route")] == [1, 1, 1, 0]
    fuse = FuseRouter()
    assert fuse(gm).modified
    assert [counts(gm)[k] for k in ("router_linear", "router_softmax", "select_experts", "route")] == [0, 0, 0, 1]
    with torch.no_grad():
        torch.testing.assert_close(gm(x), before, rtol=1e-6, atol=1e-7)
    assert "-> route at layer '0'" in fuse.fired[0]


def test_fuses_only_the_last_linear_of_the_slicemoe_router():
    torch.manual_seed(0)
    layer = SliceMoE(SliceMoEConfig(num_slices=2, num_experts=4, top_k=2, router_hidden=8), 16, 32)
    gm = lowered(layer)
    x = torch.randn(5, 16)
    with torch.no_grad():
        before = gm(x)
    FuseRouter()(gm)
    c = counts(gm)
    assert c["route"] == 1 and c["router_linear"] == 1 and c["select_experts"] == 0
    route = next(n for n in gm.graph.nodes if str(n.target) == "moefx.route.default")
    assert route.args[-1] is True  # renormalised top-k
    with torch.no_grad():
        torch.testing.assert_close(gm(x), before, rtol=1e-6, atol=1e-7)


class RouterReadingLogits(nn.Module):
    """A router whose raw logits are also read (e.g. for a z-loss): fusing would lose them."""

    def __init__(self, read_probs=False):
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 8))
        self.read_probs = read_probs

    def forward(self, x):
        logits = OPS.router_linear(x, self.w, None)
        probs = OPS.router_softmax(logits)
        sel = OPS.select_experts(probs, 0.6, 0, 0, False)
        extra = probs.sum() if self.read_probs else logits.sum()
        return sel[0], sel[1], extra


def test_does_not_fire_when_logits_have_other_users():
    gm = torch.fx.symbolic_trace(RouterReadingLogits())
    fuse = FuseRouter()
    assert not fuse(gm).modified
    assert counts(gm)["route"] == 0 and counts(gm)["router_linear"] == 1
    assert "other users" in fuse.fired[0]


def test_other_readers_of_the_probabilities_get_routes_third_output():
    model = RouterReadingLogits(read_probs=True)
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(7, 8)
    with torch.no_grad():
        before = model(x)
        assert FuseRouter()(gm).modified
        after = gm(x)
    assert counts(gm)["route"] == 1 and counts(gm)["router_softmax"] == 0
    assert torch.equal(after[0], before[0])
    torch.testing.assert_close(after[1], before[1])
    torch.testing.assert_close(after[2], before[2])
