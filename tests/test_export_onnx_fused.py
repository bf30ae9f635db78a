"""Exporting the graphs of ``moefx.optimize``: the primitive ops of the lowering and the fused
ops of the fusion passes, translated into standard ONNX ops (target="portable") and run in
onnxruntime against the PyTorch graph on fresh random inputs of a shape other than the one
exported (fp32, 1e-5 relative), with 1-row blocks (the CPU default) and padded 4-row blocks."""
import collections

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import moefx
from moefx.config import SliceMoEConfig, XMoEConfig
from moefx.export import ExportError, export_onnx
from moefx.export.verify import session
from moefx.kernels import fused as _fused  # noqa: F401  (registers the fused ops)
from moefx.layers import SliceMoE, XMoE
import mystery_op  # noqa: F401  (defines moefx_test::mystery)

D = 16


class Stack(nn.Module):
    """XMoE threshold + GLU, XMoE top-k + capacity + unit combine, SliceMoE input- and output-gated."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(D, D)
        self.xt = XMoE(XMoEConfig(num_experts=6, threshold=0.7, combine="prob"), D, 36, activation="silu", glu=True)
        self.xk = XMoE(XMoEConfig(num_experts=4, threshold=None, top_k=2, capacity_factor=1.0, combine="unit"),
                       D, 24, activation="gelu")
        self.si = SliceMoE(SliceMoEConfig(num_slices=4, num_experts=5, top_k=2, router_hidden=8), D, 32)
        self.so = SliceMoE(SliceMoEConfig(num_slices=2, num_experts=4, top_k=2, router_hidden=8, gate="output"),
                           D, 24, activation="relu", glu=True)

    def forward(self, x):
        h = x + self.xt(self.up(x))
        h = h + self.xk(h)
        h = h + self.si(h)
        return h + self.so(h)


def _moefx_ops_in_graph(gm):
    return collections.Counter(n.target.name().split("::")[1] for n in gm.graph.nodes
                               if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
                               and n.target.namespace == "moefx")


def _moefx_ops_in_onnx(model):
    """moefx ops whose translation produced nodes of the ONNX graph (the exporter records the
    source op of every node in its metadata)."""
    found = set()
    for node in model.graph.node:
        for prop in node.metadata_props:
            if prop.key == "pkg.torch.onnx.class_hierarchy":
                found.update(part.split(".")[1] for part in prop.value.split("'") if part.startswith("moefx."))
    return found


CASES = {
    "lowered-block4": dict(passes=[], block_m=4),
    "fused": dict(),
    "two-kernel-block4": dict(block_m=4, expert_mlp_max_width=4),
}
EXPECTED = {
    "lowered-block4": {"router_linear", "router_softmax", "select_experts", "apply_capacity", "unit_weights",
                       "dispatch", "gather_rows", "grouped_gemm", "activation", "glu_mul", "combine"},
    "fused": {"route", "apply_capacity", "unit_weights", "dispatch", "expert_mlp"},
    "two-kernel-block4": {"route", "apply_capacity", "unit_weights", "dispatch", "gather_gemm1", "gemm2_scatter"},
}


@pytest.mark.parametrize("case", list(CASES))
def test_optimized_graph_exports_and_matches_pytorch(tmp_path, case):
    model = Stack().eval()
    x = torch.randn(2, 12, D)
    gm = moefx.optimize(model, (x,), **CASES[case])
    ops = _moefx_ops_in_graph(gm)
    assert EXPECTED[case] <= set(ops), ops
    path = tmp_path / "m.onnx"
    report = export_onnx(gm, (x,), str(path), target="portable")
    assert report.verification and "non-standard: none" in str(report)
    onnx_model = onnx.load(str(path))
    assert {n.domain for n in onnx_model.graph.node} <= {"", "ai.onnx"}
    assert _moefx_ops_in_onnx(onnx_model) >= EXPECTED[case]

    sess = session(str(path))
    fresh = torch.randn(3, 17, D)
    (got,) = sess.run(None, {sess.get_inputs()[0].name: fresh.numpy()})
    with torch.no_grad():
        want = gm(fresh)
        torch.testing.assert_close(want, model(fresh), rtol=1e-5, atol=1e-5)
    scale = float(want.abs().max())
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5 * scale)


class Layout(nn.Module):
    """dispatch with padded blocks and every op that reads the layout, outputs all kept."""

    def __init__(self, E=5, h=6, block_m=3):
        super().__init__()
        p = lambda *s: nn.Parameter(torch.randn(*s) / s[-1] ** 0.5)  # noqa: E731
        self.E, self.block_m = E, block_m
        self.w1, self.b1, self.w3, self.b3 = p(E, h, D), p(E, h), p(E, h, D), p(E, h)
        self.w2, self.b2 = p(E, D, h), p(E, D)

    def forward(self, x, idx, weight):
        ops = torch.ops.moefx
        slot, block = ops.dispatch(idx, self.E, self.block_m)
        rows = ops.gather_rows(x, slot, weight, True)
        grouped = ops.grouped_gemm(rows, block, self.w1, self.b1)
        hidden = ops.gather_gemm1(x, slot, block, weight, False, self.w1, self.b1, self.w3, self.b3, "gelu_tanh")
        y2 = ops.gemm2_scatter(hidden, slot, block, weight, True, self.w2, self.b2)
        y3 = ops.expert_mlp(x, slot, block, weight, True, True, self.w1, None, self.w3, self.b3, self.w2, self.b2,
                            "quick_gelu")
        y4 = ops.combine(grouped, slot, weight, True)
        return slot, block, rows, grouped, hidden, y2, y3, y4


def _routing(T, E, K=3):
    probs = torch.softmax(torch.randn(T, E) * 2, -1)
    return torch.ops.moefx.select_experts(probs, 0.6, 0, K, False)


def test_block_layout_ops_match_cpu_kernels_exactly(tmp_path):
    """Padded blocks (block_m=3), unused slots (-1) and a never-chosen expert: the layout itself
    must agree bit for bit, and every consumer to fp32 1e-5."""
    module = Layout()
    rows = torch.export.Dim("rows")
    path = tmp_path / "layout.onnx"
    export_onnx(module, (torch.randn(4, D), *_routing(4, 5)), str(path), target="portable", verify=False,
                dynamic_shapes=({0: rows}, {0: rows}, {0: rows}))
    sess = session(str(path))
    x = torch.randn(21, D)
    idx, weight = _routing(21, 5)
    idx = torch.where(idx == 2, torch.full_like(idx, -1), idx)
    weight = torch.where(idx < 0, torch.zeros_like(weight), weight)
    assert (idx < 0).any() and not (idx == 2).any()
    names = [i.name for i in sess.get_inputs()]
    got = sess.run(None, dict(zip(names, (x.numpy(), idx.numpy(), weight.numpy()))))
    with torch.no_grad():
        want = module(x, idx, weight)
    assert (want[0] < 0).any() and (want[1] < 0).any(), "the case must have padding rows and unused blocks"
    np.testing.assert_array_equal(got[0], want[0].numpy())
    np.testing.assert_array_equal(got[1], want[1].numpy())
    for g, w in zip(got[2:], want[2:]):
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-5, atol=1e-5 * float(w.abs().max()))


class Mystery(nn.Module):
    def __init__(self):
        super().__init__()
        self.moe = XMoE(XMoEConfig(num_experts=4, top_k=2, threshold=None), D, 16)

    def forward(self, x):
        return torch.ops.moefx_test.mystery(self.moe(x))


def test_unknown_op_in_optimized_graph_still_gives_the_clear_error(tmp_path):
    x = torch.randn(5, D)
    gm = moefx.optimize(Mystery().eval(), (x,))
    assert _moefx_ops_in_graph(gm)["expert_mlp"] == 1
    path = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match=r"no ONNX translation for node 'mystery' calls moefx_test::mystery.*"
                                          r"register_translation") as info:
        export_onnx(gm, (x,), str(path), target="portable")
    assert "expert_mlp" not in str(info.value) and "route" not in str(info.value)
    assert not path.exists()


def test_ort_target_leaves_lowered_layers_in_standard_ops(tmp_path):
    """A SwiGLU top-k XMoE would become com.microsoft.MoE, but once lowered its module is no longer
    called: the ort target must not swap it (the graph reads its parameters) and exports the
    fused ops in standard ONNX ops, saying why."""
    model = nn.Sequential(XMoE(XMoEConfig(num_experts=4, top_k=2, threshold=None), D, 16, activation="silu",
                               glu=True)).eval()
    x = torch.randn(6, D)
    direct = export_onnx(model, (x,), str(tmp_path / "direct.onnx"), target="ort", verify=False)
    assert direct.contrib_layers == 1
    report = export_onnx(moefx.optimize(model, (x,)), (x,), str(tmp_path / "m.onnx"), target="ort")
    assert report.contrib_layers == 0 and report.verification
    assert "lowered (moefx.optimize)" in report.layers[0].reason
    assert "expert_mlp" in _moefx_ops_in_onnx(onnx.load(str(tmp_path / "m.onnx")))
