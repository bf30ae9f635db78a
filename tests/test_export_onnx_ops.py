"""The ONNX translations of the moefx ops, op by op, against the loop references of SPEC §3
(moefx.kernels.reference), run in onnxruntime on fresh random inputs of a shape other than the
one exported (so the dynamic axes are exercised too)."""
import numpy as np
import onnx
import pytest
import torch

import moefx.kernels  # noqa: F401
from moefx.export import export_onnx
from moefx.export.ort import interleave_rows
from moefx.export.verify import session
from moefx.kernels.reference import capacity_drop_reference, moe_ffn_reference, xmoe_select_reference

ROWS = torch.export.Dim("rows")


def _export(module, example, path, dynamic_shapes):
    export_onnx(module, example, str(path), target="portable", verify=False, dynamic_shapes=dynamic_shapes)
    model = onnx.load(str(path))
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    return session(str(path)), model


def _run(sess, *arrays):
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, {n: a.numpy() for n, a in zip(names, arrays)})


def _probs(T, E):
    return torch.softmax(torch.randn(T, E) * 2, dim=-1)


class Select(torch.nn.Module):
    def __init__(self, threshold, top_k, max_experts):
        super().__init__()
        self.args = (threshold, top_k, max_experts)

    def forward(self, probs):
        return torch.ops.moefx.xmoe_select(probs, *self.args)


@pytest.mark.parametrize(
    "threshold,top_k,max_experts",
    [(0.5, 0, 0), (0.9, 0, 3), (0.0, 0, 0), (1.0, 0, 0), (0.0, 2, 0)],
    ids=["t0.5", "t0.9-cap3", "t0-top1", "t1-all", "top2"],
)
def test_xmoe_select_matches_reference(tmp_path, threshold, top_k, max_experts):
    sess, _ = _export(Select(threshold, top_k, max_experts), (_probs(6, 8),), tmp_path / "s.onnx", ({0: ROWS},))
    probs = _probs(37, 8)
    idx, weight = _run(sess, probs)
    ref_idx, ref_weight = xmoe_select_reference(probs, threshold, top_k, max_experts)
    np.testing.assert_array_equal(idx, ref_idx.numpy())
    np.testing.assert_allclose(weight, ref_weight.numpy(), rtol=1e-6, atol=0)
    kept = (idx >= 0).sum(1)
    if top_k == 0 and threshold == 1.0:
        assert (kept == 8).all()
    if top_k == 0 and threshold == 0.0:
        assert (kept == 1).all()


class Capacity(torch.nn.Module):
    def __init__(self, num_experts, capacity):
        super().__init__()
        self.num_experts, self.capacity = num_experts, capacity

    def forward(self, idx, weight):
        return torch.ops.moefx.capacity_drop(idx, weight, self.num_experts, self.capacity)


def test_capacity_drop_matches_reference(tmp_path):
    E = 6
    idx0, w0 = xmoe_select_reference(_probs(5, E), 0.0, 3, 0)
    sess, _ = _export(Capacity(E, 4), (idx0, w0), tmp_path / "c.onnx", ({0: ROWS}, {0: ROWS}))
    idx, weight = xmoe_select_reference(_probs(29, E), 0.8, 0, 3)
    got_idx, got_w = _run(sess, idx, weight)
    ref_idx, ref_w = capacity_drop_reference(idx, weight, E, 4)
    assert (ref_idx < 0).sum() > (idx < 0).sum(), "the case must drop something"
    np.testing.assert_array_equal(got_idx, ref_idx.numpy())
    np.testing.assert_allclose(got_w, ref_w.numpy(), rtol=1e-6, atol=0)


class Ffn(torch.nn.Module):
    def __init__(self, E, d, h, glu, bias, out_bias, activation, gate_input):
        super().__init__()
        p = lambda *s: torch.nn.Parameter(torch.randn(*s) / s[-1] ** 0.5)  # noqa: E731
        self.w1, self.w2 = p(E, h, d), p(E, d, h)
        self.b1 = p(E, h) if bias else None
        self.w3 = p(E, h, d) if glu else None
        self.b3 = p(E, h) if glu and bias else None
        self.b2 = p(E, d) if out_bias else None
        self.activation, self.gate_input = activation, gate_input

    def forward(self, x, idx, weight):
        return torch.ops.moefx.moe_ffn(x, idx, weight, self.w1, self.b1, self.w3, self.b3, self.w2, self.b2,
                                      self.activation, self.gate_input)

    def reference(self, x, idx, weight):
        return moe_ffn_reference(x, idx, weight, self.w1, self.b1, self.w3, self.b3, self.w2, self.b2,
                                 self.activation, self.gate_input)


def _routing(T, E, never=None):
    logits = torch.randn(T, E) * 2
    if never is not None:
        logits[:, never] = -30.0
    idx, weight = xmoe_select_reference(torch.softmax(logits, -1), 0.7, 0, 3)
    return idx, weight


@pytest.mark.parametrize(
    "glu,bias,out_bias,activation,gate_input",
    [
        (False, True, False, "gelu", False),
        (True, False, False, "silu", False),
        (False, True, True, "relu", True),
        (True, True, True, "gelu_tanh", True),
        (False, False, True, "quick_gelu", False),
        (False, True, False, "relu2", False),
    ],
    ids=["gelu-bias", "swiglu", "relu-gate-input", "geglu-tanh-gate-input", "quick-gelu-outbias", "relu2"],
)
def test_moe_ffn_portable_matches_reference(tmp_path, glu, bias, out_bias, activation, gate_input):
    E, d, h = 5, 12, 7
    ffn = Ffn(E, d, h, glu, bias, out_bias, activation, gate_input)
    example = (torch.randn(4, d), *_routing(4, E))
    sess, model = _export(ffn, example, tmp_path / "f.onnx", ({0: ROWS}, {0: ROWS}, {0: ROWS}))
    assert not any(n.op_type == "Transpose" for n in model.graph.node), "expert weight slices must be folded"
    x = torch.randn(23, d)
    idx, weight = _routing(23, E, never=2)
    (got,) = _run(sess, x, idx, weight)
    with torch.no_grad():
        ref = ffn.reference(x, idx, weight)
    assert (idx == 2).sum() == 0 and (idx < 0).any()
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


class OrtFfn(torch.nn.Module):
    """moefx::ort_moe with SwiGLU-interleaved fc1, as the ort target builds it."""

    def __init__(self, E, d, h):
        super().__init__()
        self.ref = Ffn(E, d, h, glu=True, bias=True, out_bias=True, activation="silu", gate_input=False)
        self.register_buffer("fc1", interleave_rows(self.ref.w1.detach(), self.ref.w3.detach()))
        self.register_buffer("fc1_bias", interleave_rows(self.ref.b1.detach(), self.ref.b3.detach()))

    def forward(self, x, idx, weight):
        return torch.ops.moefx.ort_moe(x, idx, weight, self.fc1, self.fc1_bias, self.ref.w2, self.ref.b2,
                                      "swiglu", 3, 1, 1.0, 0.0)


def test_ort_moe_contrib_node_matches_reference(tmp_path):
    """Probability weights that do not sum to one and rows using fewer than k experts: the
    log-weight logits plus the rescale by the row total must reproduce Σ w·FFN exactly."""
    E, d, h = 6, 10, 8
    module = OrtFfn(E, d, h)
    example = (torch.randn(4, d), *_routing(4, E))
    path = tmp_path / "o.onnx"
    export_onnx(module, example, str(path), target="ort", verify=False,
                dynamic_shapes=({0: ROWS}, {0: ROWS}, {0: ROWS}))
    model = onnx.load(str(path))
    moe = [n for n in model.graph.node if n.op_type == "MoE"]
    assert len(moe) == 1 and moe[0].domain == "com.microsoft"
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in moe[0].attribute}
    assert attrs["k"] == 3 and attrs["normalize_routing_weights"] == 0 and attrs["swiglu_fusion"] == 1
    assert attrs["activation_type"] == b"swiglu" and attrs["activation_alpha"] == 1.0 and attrs["activation_beta"] == 0.0
    sess = session(str(path))
    x = torch.randn(19, d)
    idx, weight = _routing(19, E)
    assert ((idx >= 0).sum(1) < 3).any() and (weight.sum(1) < 0.999).any()
    (got,) = _run(sess, x, idx, weight)
    with torch.no_grad():
        ref = module.ref.reference(x, idx, weight)
        torch_side = module(x, idx, weight)
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    torch.testing.assert_close(torch_side, ref, rtol=1e-5, atol=1e-6)
