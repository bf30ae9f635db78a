"""``moefx.optimize``: lowering plus every fusion, with a readable record of what fired where."""
import collections
import io

import pytest
import torch
from torch import nn

import moefx
from moefx.config import SliceMoEConfig, XMoEConfig
from moefx.layers import SliceMoE, XMoE
from moefx.kernels.reference import slicemoe_reference, xmoe_reference


class Block(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.up = nn.Linear(d, d)
        self.xmoe = XMoE(XMoEConfig(num_experts=6, threshold=0.8), d, 64, activation="silu", glu=True)
        self.smoe = SliceMoE(SliceMoEConfig(num_slices=4, num_experts=6, top_k=2, router_hidden=8), d, 48)

    def forward(self, x):
        h = x + self.xmoe(self.up(x))
        return h + self.smoe(h)


def moefx_ops(gm):
    return collections.Counter(str(n.target).split(".")[1] for n in gm.graph.nodes
                               if n.op == "call_function" and "moefx" in str(n.target))


def test_optimize_lowers_and_fuses_everything_and_says_where():
    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randn(2, 5, 32)
    stream = io.StringIO()
    gm = moefx.optimize(model, (x,), verbose=True, stream=stream)
    assert isinstance(gm, torch.fx.GraphModule)
    assert not any(n.op == "call_module" and n.target in ("xmoe", "smoe") for n in gm.graph.nodes)
    ops = moefx_ops(gm)
    assert ops["route"] == 2 and ops["expert_mlp"] == 2 and ops["dispatch"] == 2
    assert sum(ops[k] for k in ("router_softmax", "select_experts", "gather_rows", "grouped_gemm",
                                "combine", "gather_gemm1", "gemm2_scatter")) == 0
    with torch.no_grad():
        got = gm(x)
        torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)
        h = x + xmoe_reference(model.xmoe, model.up(x))
        torch.testing.assert_close(got, h + slicemoe_reference(model.smoe, h), rtol=1e-5, atol=1e-5)
    record = gm.moefx_record
    for name in ("lower", "fuse_router", "fuse_gather_gemm", "fuse_gemm_scatter", "fuse_expert_mlp"):
        assert len(record.fired(name)) == 2, (name, record.events)
    assert any("layer 'xmoe'" in e for e in record.fired("fuse_expert_mlp"))
    printed = stream.getvalue()
    assert "XMoE at 'xmoe'" in printed and "SliceMoE at 'smoe'" in printed and "-> expert_mlp" in printed


def test_wide_experts_keep_the_two_kernel_form():
    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randn(4, 32)
    gm = moefx.optimize(model, (x,), expert_mlp_max_width=16)
    ops = moefx_ops(gm)
    assert ops["expert_mlp"] == 1 and ops["gather_gemm1"] == 1 and ops["gemm2_scatter"] == 1
    assert any("width 32 > 16" in e for e in gm.moefx_record.events)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_pass_subset_and_unknown_pass():
    model = Block().eval()
    x = torch.randn(3, 32)
    gm = moefx.optimize(model, (x,), passes=["fuse_router"])
    ops = moefx_ops(gm)
    assert ops["route"] == 2 and ops["gather_rows"] == 2 and ops["expert_mlp"] == 0
    with pytest.raises(ValueError, match="unknown passes"):
        moefx.optimize(model, (x,), passes=["fuse_everything"])


def test_graph_module_input_is_not_modified():
    model = Block().eval()
    x = torch.randn(3, 32)
    from moefx.passes.optimize import _MoELeafTracer

    source = torch.fx.GraphModule(model, _MoELeafTracer().trace(model))
    code = source.code
    gm = moefx.optimize(source, (x,))
    assert source.code == code and gm is not source
    assert moefx_ops(gm)["expert_mlp"] == 2
    assert gm.xmoe.w1 is model.xmoe.w1  # parameters shared, not copied


class NeedsExport(nn.Module):
    """``len(x)`` defeats symbolic tracing; optimize falls back to moefx.capture."""

    def __init__(self):
        super().__init__()
        self.moe = XMoE(XMoEConfig(num_experts=4, top_k=2), 16, 32)

    def forward(self, x):
        return self.moe(x.reshape(len(x), -1, 16))


def test_untraceable_model_goes_through_capture():
    torch.manual_seed(0)
    model = NeedsExport().eval()
    x = torch.randn(2, 3, 16)
    gm = moefx.optimize(model, (x,))
    assert "capture" in gm.moefx_record.capture
    ops = moefx_ops(gm)
    assert ops["moe_ffn"] == 0 and ops["xmoe_select"] == 0 and ops["expert_mlp"] == 1
    assert ops["route"] == 1  # the captured aten.linear + aten.softmax router is fused too
    assert not any(n.target is torch.ops.aten.softmax.int for n in gm.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)


def test_model_without_moe_layers_is_reported():
    model = nn.Sequential(nn.Linear(4, 4)).eval()
    gm = moefx.optimize(model, (torch.randn(2, 4),))
    assert gm.moefx_record.events == []
    assert "nothing lowered" in gm.moefx_record.format()


def test_optimized_graph_exports_with_dynamic_batch():
    """The fused ops' fake kernels give shapes from shapes only (the static block bound), so
    the optimized graph goes through torch.export with a dynamic batch and sequence."""
    from torch.export import Dim

    torch.manual_seed(0)
    model = Block().eval()
    gm = moefx.optimize(model, (torch.randn(2, 5, 32),))
    ep = torch.export.export(gm, (torch.randn(2, 5, 32),), strict=False,
                             dynamic_shapes=({0: Dim("batch", max=64), 1: Dim("seq", max=64)},))
    targets = [str(n.target) for n in ep.graph.nodes if "moefx" in str(n.target)]
    assert targets.count("moefx.expert_mlp.default") == 2 and targets.count("moefx.route.default") == 2
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), model(x), rtol=1e-5, atol=1e-5)
