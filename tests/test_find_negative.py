"""What is not an FFN is not matched, and each near-match is reported with its reason."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import moefx

import zoo

D, FF = 12, 20


def _report(model, *inputs):
    return moefx.find_ffns(model.eval(), inputs, explain=True)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x):
        att = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / D ** 0.5, dim=-1)
        return self.o(att @ self.v(x))


def test_attention_projections_are_not_ffns():
    report = _report(Attention(), torch.randn(2, 5, D))
    assert report.matches == []


class HiddenReused(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, FF), nn.Linear(FF, D)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc2(h) + h.mean(-1, keepdim=True)


def test_hidden_activation_used_outside_is_rejected_with_reason():
    report = _report(HiddenReused(), torch.randn(3, D))
    assert report.matches == []
    (rej,) = report.rejected
    assert "relu" in rej.reason and "also used" in rej.reason and "outside" in rej.reason
    assert "relu" in rej.nodes


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, FF), nn.Linear(FF, D)

    def forward(self, x):
        return self.fc2(F.dropout(self.fc1(x), 0.1, training=False))


def test_two_linears_without_nonlinearity_are_rejected():
    report = _report(TwoLinears(), torch.randn(3, D))
    assert report.matches == []
    (rej,) = report.rejected
    assert "no nonlinearity" in rej.reason


def test_classifier_head_is_rejected_for_its_widths():
    head = nn.Sequential(nn.Linear(D, FF), nn.ReLU(), nn.Linear(FF, 3))
    report = _report(head, torch.randn(3, D))
    assert report.matches == []
    (rej,) = report.rejected
    assert "width 3" in rej.reason and f"input width {D}" in rej.reason and "classifier" in rej.reason


def test_bert_pooler_and_classifier_are_rejected_but_ffn_found():
    model, args, kwargs = zoo.bert_classifier()
    report = moefx.find_ffns(model, args, kwargs, explain=True)
    assert len(report.matches) == 1
    reasons = " | ".join(r.reason for r in report.rejected)
    assert "tanh is not an FFN activation" in reasons
    text = str(report)
    assert "1 FFN block(s) found" in text and "rejected" in text and "tanh" in text


def test_sigmoid_gated_unit_is_rejected():
    class SigmoidGLU(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.out = nn.Linear(D, FF), nn.Linear(D, FF), nn.Linear(FF, D)

        def forward(self, x):
            return self.out(torch.sigmoid(self.a(x)) * self.b(x))

    report = _report(SigmoidGLU(), torch.randn(3, D))
    assert report.matches == []
    assert "sigmoid" in report.rejected[0].reason


def test_weight_passed_as_input_is_rejected():
    class External(nn.Module):
        def forward(self, x, w1, w2):
            return F.linear(F.relu(F.linear(x, w1)), w2)

    report = _report(External(), torch.randn(3, D), torch.randn(FF, D), torch.randn(D, FF))
    assert report.matches == []
    assert "graph input" in report.rejected[0].reason and "nn.Parameter" in report.rejected[0].reason


def test_stacked_mlps_are_not_double_counted():
    """Linear-act-Linear-act-Linear: the first block in graph order wins, the overlapping second
    is reported."""
    model = nn.Sequential(nn.Linear(D, FF), nn.ReLU(), nn.Linear(FF, D), nn.ReLU(), nn.Linear(D, FF),
                          nn.ReLU(), nn.Linear(FF, D))
    report = _report(model, torch.randn(3, D))
    assert len(report.matches) == 2
    assert report.matches[0].weights["w1"] == "0.weight" and report.matches[1].weights["w1"] == "4.weight"
    assert any("overlaps FFN" in r.reason for r in report.rejected)


def test_unrecognised_activation_formula_is_a_near_match_naming_its_ops():
    """An FFN whose activation is a formula moefx does not know (mish spelled out; a GLU gate
    scaled by a constant) is not converted, and --explain says which ops it saw and what moefx
    converts, instead of staying silent."""
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(D, FF), nn.Linear(FF, D)
            self.g, self.u, self.d2 = nn.Linear(D, FF), nn.Linear(D, FF), nn.Linear(FF, D)

        def forward(self, x):
            h = self.up(x)
            x = x + self.down(h * torch.tanh(F.softplus(h)))
            return x + self.d2(F.silu(self.g(x)) * 1.5 * self.u(x))

    report = _report(Odd(), torch.randn(3, D))
    assert report.matches == []
    by_module = {r.name.split(" ")[0]: r.reason for r in report.rejected}
    assert set(by_module) == {"down", "d2"}
    assert "softplus" in by_module["down"] and "tanh" in by_module["down"] and "relu2" in by_module["down"]
    assert "elementwise function" in by_module["d2"] and "silu" in by_module["d2"]


def test_shared_experts_of_a_converted_model_are_not_ffns_to_convert_again():
    """convert() swaps layers in the model it is given; converting that model again must not
    turn the shared experts inside each XMoE layer into a flattened GraphModule of nested MoEs."""
    model, inputs, kwargs = zoo.llama()
    model = moefx.convert(model, moefx.XMoEConfig(num_experts=4, num_shared=1), inputs, kwargs)
    report = moefx.find_ffns(model, inputs, kwargs, explain=True)
    assert report.matches == []
    assert len(report.rejected) == zoo.LAYERS
    assert all("already converted" in r.reason for r in report.rejected)
    with pytest.raises(moefx.ConversionError, match=r"already holds 2 moefx MoE layer\(s\) \(model\.layers\.0\.mlp"):
        moefx.convert(model, moefx.XMoEConfig(num_experts=4), inputs, kwargs)


def test_dense_ffns_left_beside_converted_ones_still_convert():
    model, inputs, kwargs = zoo.llama()
    model = moefx.convert(model, moefx.XMoEConfig(num_experts=4, num_shared=1), inputs, kwargs,
                          filter_fn=lambda m, fqn: fqn.startswith("model.layers.0."))
    found = moefx.find_ffns(model, inputs, kwargs)
    assert [m.path for m in found] == ["model.layers.1.mlp"]
    again = moefx.convert(model, moefx.XMoEConfig(num_experts=4), inputs, kwargs)
    assert again is model
    assert all(type(layer.mlp).__name__ == "XMoE" for layer in model.model.layers)
