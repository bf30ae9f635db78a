"""Every spelling of an FFN the issue lists is found, with the right fields, and its reported
weights reproduce the block on fresh random input."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import moefx
from moefx.capture import capture
from moefx.passes.find_ffn import find_ffns_in_graph

D, FF = 12, 20


def _check_exact(model, m, x=None):
    x = torch.randn(2, 3, D) if x is None else x
    with torch.no_grad():
        torch.testing.assert_close(m.dense_reference(x), model(x), rtol=1e-5, atol=1e-6)


class Block(nn.Module):
    def __init__(self, act, bias1=True, bias2=True, drops=()):
        super().__init__()
        self.fc1 = nn.Linear(D, FF, bias=bias1)
        self.fc2 = nn.Linear(FF, D, bias=bias2)
        self.act = act
        self.drop = nn.Dropout(0.2)
        self.drops = set(drops)

    def forward(self, x):
        h = self.fc1(x)
        if "pre" in self.drops:
            h = self.drop(h)
        h = self.act(h)
        if "mid" in self.drops:
            h = self.drop(h)
        y = self.fc2(h)
        if "post" in self.drops:
            y = self.drop(y)
        return y


def _erf_gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _tanh_gelu(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTS = [
    ("module nn.ReLU", nn.ReLU(), "relu"),
    ("function torch.relu", torch.relu, "relu"),
    ("method .relu()", lambda h: h.relu(), "relu"),
    ("clamp_min(0)", lambda h: h.clamp_min(0.0), "relu"),
    ("nn.GELU", nn.GELU(), "gelu"),
    ("F.gelu tanh", lambda h: F.gelu(h, approximate="tanh"), "gelu_tanh"),
    ("erf formula", _erf_gelu, "gelu"),
    ("tanh formula", _tanh_gelu, "gelu_tanh"),
    ("nn.SiLU", nn.SiLU(), "silu"),
    ("x*sigmoid(x)", lambda h: h * torch.sigmoid(h), "silu"),
    ("quick_gelu formula", lambda h: h * torch.sigmoid(1.702 * h), "quick_gelu"),
]


@pytest.mark.parametrize("label,act,canonical", ACTS, ids=[a[0] for a in ACTS])
def test_activation_spellings_are_canonical(label, act, canonical):
    model = Block(act).eval()
    (m,) = moefx.find_ffns(model, (torch.randn(2, 3, D),))
    assert (m.activation, m.kind, m.path, m.module_exact) == (canonical, "mlp", "", True)
    _check_exact(model, m)


def test_hf_activation_modules_are_canonical():
    from transformers.activations import ACT2FN

    expect = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
              "gelu_fast": "gelu_tanh", "quick_gelu": "quick_gelu", "silu": "silu", "relu": "relu"}
    for hf_name, canonical in expect.items():
        model = Block(ACT2FN[hf_name]).eval()
        (m,) = moefx.find_ffns(model, (torch.randn(2, D),))
        assert m.activation == canonical, hf_name
        _check_exact(model, m, torch.randn(5, D))


@pytest.mark.parametrize("bias1,bias2", [(False, False), (True, False), (False, True)])
def test_bias_flags(bias1, bias2):
    model = Block(nn.ReLU(), bias1, bias2).eval()
    (m,) = moefx.find_ffns(model, (torch.randn(4, D),))
    assert (m.bias1, m.bias2) == (bias1, bias2)
    assert ("b1" in m.weights, "b2" in m.weights) == (bias1, bias2)
    w = m.dense_weights()
    assert (w["b1"] is not None, w["b2"] is not None) == (bias1, bias2)
    _check_exact(model, m)


@pytest.mark.parametrize("where", [("pre",), ("mid",), ("post",), ("pre", "mid", "post")])
def test_dropout_anywhere_in_training_mode(where):
    """In training mode dropout stays in the graph and is walked through; a trailing dropout in
    the same module keeps the block module_exact."""
    model = Block(nn.GELU(), drops=where).train()
    (m,) = moefx.find_ffns(model, (torch.randn(4, D),))
    assert m.module_exact and m.path == "" and m.activation == "gelu"
    dropouts = [n for n in m.nodes if "dropout" in str(n.target)]
    assert len(dropouts) == len(where)
    model.eval()
    _check_exact(model, m)


class GLU(nn.Module):
    def __init__(self, act=F.silu, up_first=False):
        super().__init__()
        self.gate = nn.Linear(D, FF, bias=False)
        self.up = nn.Linear(D, FF, bias=False)
        self.down = nn.Linear(FF, D, bias=False)
        self.act, self.up_first = act, up_first

    def forward(self, x):
        if self.up_first:
            return self.down(self.up(x) * self.act(self.gate(x)))
        return self.down(self.act(self.gate(x)) * self.up(x))


@pytest.mark.parametrize("up_first", [False, True])
@pytest.mark.parametrize("act,canonical", [(F.silu, "silu"), (F.gelu, "gelu"),
                                           (lambda h: F.gelu(h, approximate="tanh"), "gelu_tanh")])
def test_glu_either_operand_order(up_first, act, canonical):
    model = GLU(act, up_first).eval()
    (m,) = moefx.find_ffns(model, (torch.randn(2, 3, D),))
    assert (m.kind, m.activation) == ("glu", canonical)
    assert m.weights == {"w1": "gate.weight", "w3": "up.weight", "w2": "down.weight"}
    _check_exact(model, m)


class FusedSplit(nn.Module):
    def __init__(self, gate_first, use_split):
        super().__init__()
        self.gate_up = nn.Linear(D, 2 * FF, bias=True)
        self.down = nn.Linear(FF, D)
        self.gate_first, self.use_split = gate_first, use_split

    def forward(self, x):
        h = self.gate_up(x)
        a, b = torch.split(h, FF, dim=-1) if self.use_split else h.chunk(2, dim=-1)
        gate, up = (a, b) if self.gate_first else (b, a)
        return self.down(F.silu(gate) * up)


@pytest.mark.parametrize("gate_first", [True, False])
@pytest.mark.parametrize("use_split", [True, False])
def test_fused_gate_up(gate_first, use_split):
    model = FusedSplit(gate_first, use_split).eval()
    (m,) = moefx.find_ffns(model, (torch.randn(2, 3, D),))
    assert m.kind == "glu" and m.d_ff == FF and m.bias1
    assert m.layout["w13"] == ("fused_gate_first" if gate_first else "fused_up_first")
    assert set(m.weights) == {"w13", "b13", "w2", "b2"}
    _check_exact(model, m)


class MatmulMLP(nn.Module):
    """``x @ W`` with W stored [in, out] (layout "functional")."""

    def __init__(self):
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(D, FF) / D ** 0.5)
        self.w_out = nn.Parameter(torch.randn(FF, D) / FF ** 0.5)
        self.b_out = nn.Parameter(torch.randn(D))

    def forward(self, x):
        return torch.relu(x @ self.w_in) @ self.w_out + self.b_out


def test_functional_x_at_w_layout():
    model = MatmulMLP().eval()
    (m,) = moefx.find_ffns(model, (torch.randn(2, 3, D),))
    assert m.layout == {"w1": "functional", "w2": "functional", "b2": "functional"}
    assert m.path == "" and m.module_exact and not m.bias1 and m.bias2
    _check_exact(model, m)


def test_decomposed_graph_addmm_mm_forms():
    """After ``run_decompositions`` Linear is t/permute + addmm/mm (+ views): still found."""
    model = nn.Sequential(nn.Linear(D, FF), nn.ReLU(), nn.Linear(FF, D, bias=False),
                          nn.LayerNorm(D), nn.Linear(D, FF, bias=False), nn.SiLU(), nn.Linear(FF, D)).eval()
    x = torch.randn(2, 3, D)
    gm = torch.export.export(model, (x,), strict=False).run_decompositions().module()
    targets = {str(n.target) for n in gm.graph.nodes}
    assert "aten.linear.default" not in targets and {"aten.addmm.default", "aten.mm.default"} & targets
    matches = find_ffns_in_graph(gm, model)
    assert [(m.activation, m.bias1, m.bias2) for m in matches] == [("relu", True, False), ("silu", False, True)]
    for m, sl in zip(matches, (slice(0, 3), slice(4, 7))):
        _check_exact(model[sl], m, x)


class Untraceable(nn.Module):
    """Data-dependent Python control flow: torch.export refuses it, fx can treat it as a leaf."""

    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


class NeedsFallback(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = Untraceable()
        self.mlp = nn.Sequential(nn.Linear(D, FF), nn.GELU(approximate="tanh"), nn.Linear(FF, D))

    def forward(self, x):
        return self.mlp(self.pre(x))


def test_fallback_tracer_graph_is_matched_the_same_way():
    model = NeedsFallback().eval()
    x = torch.randn(2, D)
    gm = capture(model, (x,), leaf_modules=(Untraceable,))
    assert gm.meta["moefx_capture"] == "fx"
    (m,) = find_ffns_in_graph(gm, model)
    assert (m.path, m.module_exact, m.activation) == ("mlp", True, "gelu_tanh")
    assert m.weights == {"w1": "mlp.0.weight", "b1": "mlp.0.bias", "w2": "mlp.2.weight", "b2": "mlp.2.bias"}
    assert m.modules["w1"] == "mlp.0" and m.layout["w1"] == "linear"
    _check_exact(model.mlp, m)


def test_fallback_tracer_handles_hf_conv1d_and_functional_calls():
    from transformers.pytorch_utils import Conv1D

    class Conv1DMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc, self.c_proj = Conv1D(FF, D), Conv1D(D, FF)

        def forward(self, x):
            return self.c_proj(F.gelu(self.c_fc(x)))

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre, self.mlp = Untraceable(), Conv1DMLP()

        def forward(self, x):
            return self.mlp(self.pre(x))

    model = Outer().eval()
    gm = capture(model, (torch.randn(2, 3, D),), leaf_modules=("pre",), methods=("fx",))
    (m,) = find_ffns_in_graph(gm, model)
    assert m.path == "mlp" and m.module_exact and m.layout["w1"] == "conv1d"
    _check_exact(model.mlp, m)


def test_linear_weight_used_transposed_is_functional_not_a_module():
    """``x @ lin.weight`` reads a Linear's parameter outside its forward: no module to swap."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(D, FF, bias=False)
            self.down = nn.Parameter(torch.randn(D, FF))

        def forward(self, x):
            return F.relu(x @ self.down) @ self.up.weight

    model = Tied().eval()
    (m,) = moefx.find_ffns(model, (torch.randn(3, D),))
    assert m.layout == {"w1": "functional", "w2": "functional"} and m.modules == {}
    assert m.weights == {"w1": "down", "w2": "up.weight"}
    _check_exact(model, m, torch.randn(3, D))
