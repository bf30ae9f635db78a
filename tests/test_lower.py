"""The ``lower`` pass: MoE layers (and ``moefx::moe_ffn`` calls) inlined into primitive ops,
outputs equal before and after and equal to the loop references of SPEC §3."""
import collections

import pytest
import torch
from torch import nn

from moefx.config import SliceMoEConfig, XMoEConfig
from moefx.kernels.reference import slicemoe_reference, xmoe_reference
from moefx.layers import SliceMoE, XMoE
from moefx.passes.lower import LowerMoE
from moefx.passes.optimize import _MoELeafTracer

OPS = torch.ops.moefx


class Net(nn.Module):
    def __init__(self, layer, d):
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.moe = layer

    def forward(self, x):
        return self.moe(self.proj(x)) + x


def traced(model):
    return torch.fx.GraphModule(model, _MoELeafTracer().trace(model))


def op_counts(gm):
    return collections.Counter(
        str(n.target).split(".")[1] if "moefx" in str(n.target) else n.op
        for n in gm.graph.nodes if n.op in ("call_function", "call_module")
    )


XMOE_CASES = [
    dict(cfg=XMoEConfig(num_experts=6, threshold=0.7), glu=False, bias=True, converted=False),
    dict(cfg=XMoEConfig(num_experts=6, threshold=None, top_k=2, capacity_factor=1.0), glu=True, bias=False, converted=True),
    dict(cfg=XMoEConfig(num_experts=5, threshold=0.9, max_experts=3, num_shared=1), glu=True, bias=True, converted=True),
]


@pytest.mark.parametrize("case", XMOE_CASES, ids=["threshold-prob", "topk-capacity-glu-unit", "shared-capped"])
def test_lower_xmoe_equals_layer_and_reference(case):
    torch.manual_seed(0)
    d = 16
    layer = XMoE(case["cfg"], d, 40, activation="gelu", glu=case["glu"], bias=case["bias"],
                 converted=case["converted"])
    model = Net(layer, d).eval()
    x = torch.randn(3, 7, d)
    gm = traced(model)
    assert op_counts(gm)["call_module"] == 2
    lowering = LowerMoE()
    result = lowering(gm)
    assert result.modified
    counts = op_counts(result.graph_module)
    assert counts["call_module"] == 1
    expected = {"router_linear": 1, "router_softmax": 1, "select_experts": 1, "dispatch": 1,
                "gather_rows": 1, "combine": 1, "grouped_gemm": 3 if case["glu"] else 2}
    assert {k: counts[k] for k in expected} == expected
    assert counts["apply_capacity"] == (case["cfg"].capacity_factor is not None)
    assert counts["unit_weights"] == (layer.combine == "unit")
    with torch.no_grad():
        want = model(x)
        got = result.graph_module(x)
        ref = xmoe_reference(layer, model.proj(x)) + x
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert "XMoE at 'moe'" in lowering.fired[0]


@pytest.mark.parametrize("gate,glu", [("input", False), ("output", True)])
def test_lower_slicemoe_equals_layer_and_reference(gate, glu):
    torch.manual_seed(0)
    d = 24
    layer = SliceMoE(SliceMoEConfig(num_slices=4, num_experts=5, top_k=2, router_hidden=8, gate=gate),
                     d, 32, activation="silu", glu=glu)
    model = Net(layer, d).eval()
    x = torch.randn(2, 5, d)
    gm = LowerMoE()(traced(model)).graph_module
    counts = op_counts(gm)
    assert counts["router_linear"] == 2 and counts["select_experts"] == 1 and counts["call_module"] == 1
    with torch.no_grad():
        got = gm(x)
        torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got, slicemoe_reference(layer, model.proj(x)) + x, rtol=1e-5, atol=1e-5)


def test_training_mode_layer_is_not_lowered():
    """Lowering reproduces eval-mode routing only: a training-mode layer stays a module and the
    record says why and what to do."""
    layer = SliceMoE(SliceMoEConfig(num_slices=2, num_experts=4, top_k=2, router_hidden=8), 8, 16)
    model = Net(layer, 8).train()
    lowering = LowerMoE()
    result = lowering(traced(model))
    assert not result.modified
    assert op_counts(result.graph_module)["call_module"] == 2
    assert "training mode" in lowering.fired[0] and "model.eval()" in lowering.fired[0]


def test_lower_moe_ffn_in_exported_graph():
    """A torch.export graph holds the layers inlined as ops: its moefx::moe_ffn calls are
    lowered to the primitive expert chain."""
    torch.manual_seed(0)
    model = Net(XMoE(XMoEConfig(num_experts=4, threshold=0.7), 16, 32), 16).eval()
    x = torch.randn(2, 3, 16)
    gm = torch.export.export(model, (x,), strict=False).module()
    assert op_counts(gm)["moe_ffn"] == 1
    lowering = LowerMoE(block_m=8)
    gm = lowering(gm).graph_module
    counts = op_counts(gm)
    assert counts["moe_ffn"] == 0 and counts["dispatch"] == 1 and counts["grouped_gemm"] == 2
    assert counts["xmoe_select"] == 0 and counts["select_experts"] == 1
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)


def test_bad_block_m_is_a_clear_error():
    with pytest.raises(ValueError, match="block_m must be a positive integer"):
        LowerMoE(block_m=0)
