"""Canonicalisation passes: each preserves what the graph computes, makes the FFN spellings
look one way, is idempotent; and the shared PassManager lints and logs."""
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from moefx.capture import capture, prepare_kwargs
from moefx.passes import PassManager
from moefx.passes.canonicalize import (
    CanonicalizeActivations,
    CanonicalizeLinear,
    NormalizeTorchOps,
    RemoveEvalDropout,
    canonicalize,
)
from moefx.passes.manager import PassError
from moefx.patterns.activations import quick_gelu, relu_squared

import zoo

aten = torch.ops.aten


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _run(gm, model, args, kwargs):
    with torch.no_grad():
        out = gm(*args, **prepare_kwargs(model, kwargs))
    return out.logits if hasattr(out, "logits") else out


def test_gpt2_conv1d_becomes_linear_and_new_gelu_becomes_gelu_tanh():
    model, args, kwargs = zoo.gpt2()
    gm = capture(model, args, kwargs)
    before = _run(gm, model, args, kwargs)
    assert _targets(gm).count(aten.addmm.default) == 4 * zoo.LAYERS
    result = canonicalize(gm)
    assert result.modified
    t = _targets(gm)
    assert aten.addmm.default not in t and aten.tanh.default not in t and aten.pow.Tensor_Scalar not in t
    assert t.count(aten.linear.default) == 4 * zoo.LAYERS + 1
    gelus = [n for n in gm.graph.nodes if n.target is aten.gelu.default]
    assert len(gelus) == zoo.LAYERS and all(n.kwargs == {"approximate": "tanh"} for n in gelus)
    torch.testing.assert_close(_run(gm, model, args, kwargs), before, rtol=1e-5, atol=1e-5)


def test_clip_quick_gelu_formula_becomes_one_node():
    model, args, kwargs = zoo.clip()
    gm = capture(model, args, kwargs)
    before = gm(*args, **kwargs)
    canonicalize(gm)
    assert _targets(gm).count(quick_gelu) == 2 * zoo.LAYERS
    after = gm(*args, **kwargs)
    torch.testing.assert_close(after.logits_per_text, before.logits_per_text, rtol=1e-5, atol=1e-5)


def test_canonicalize_is_idempotent():
    model, args, kwargs = zoo.functional_mlp()
    gm = capture(model, args, kwargs)
    assert canonicalize(gm).modified
    code = gm.code
    assert not canonicalize(gm).modified
    assert gm.code == code


def test_functional_forms_become_linear_with_folded_bias():
    model, args, kwargs = zoo.functional_mlp()
    gm = capture(model, args, kwargs)
    before = gm(*args)
    canonicalize(gm)
    lins = [n for n in gm.graph.nodes if n.target is aten.linear.default]
    assert len(lins) == 2 and all(len(n.args) == 3 for n in lins)
    assert aten.matmul.default not in _targets(gm) and aten.add.Tensor in _targets(gm)  # residual stays
    torch.testing.assert_close(gm(*args), before)


def test_argument_normalisation_of_gelu_spellings():
    class Two(nn.Module):
        def forward(self, x):
            return F.gelu(x, approximate="none") + F.gelu(x) + F.gelu(x, approximate="tanh")

    x = torch.randn(5)
    gm = capture(Two(), (x,))
    canonicalize(gm)
    gelus = [n for n in gm.graph.nodes if n.target is aten.gelu.default]
    assert sorted(str(n.kwargs) for n in gelus) == ["{'approximate': 'tanh'}", "{}", "{}"]
    torch.testing.assert_close(gm(x), Two()(x))


def test_eval_dropout_is_removed_train_dropout_kept():
    x = torch.randn(3, 4)
    for train, count in ((False, 0), (True, 1)):
        model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).train(train)
        gm = capture(model, (x,))
        RemoveEvalDropout()(gm)
        assert _targets(gm).count(aten.dropout.default) == count


def test_activation_cone_with_outside_users_is_left_alone():
    class Leaky(nn.Module):
        def forward(self, x):
            s = torch.sigmoid(x)
            return x * s, s

    x = torch.randn(6)
    gm = capture(Leaky(), (x,))
    CanonicalizeActivations()(gm)
    assert aten.silu.default not in _targets(gm) and aten.sigmoid.default in _targets(gm)


def test_near_activation_formula_is_not_renamed():
    """0.5 x (1 + tanh(0.8 (x + 0.05 x^3))) is close to gelu_tanh but not it."""
    class Fake(nn.Module):
        def forward(self, x):
            return 0.5 * x * (1.0 + torch.tanh(0.8 * (x + 0.05 * x ** 3)))

    gm = capture(Fake(), (torch.randn(4),))
    CanonicalizeActivations()(gm)
    assert aten.gelu.default not in _targets(gm)


def test_fx_traced_graph_is_lowered_to_aten():
    from transformers.pytorch_utils import Conv1D

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.c, self.act = nn.Linear(4, 6), Conv1D(4, 6), nn.GELU(approximate="tanh")

        def forward(self, x):
            return self.c(self.act(self.a(x))).relu() * torch.sigmoid(x)

    model = M().eval()
    x = torch.randn(2, 4)
    gm = capture(model, (x,), methods=("fx",))
    NormalizeTorchOps()(gm)
    gm.recompile()
    assert not [n for n in gm.graph.nodes if n.op in ("call_module", "call_method")]
    assert _targets(gm).count(aten.linear.default) == 2
    torch.testing.assert_close(gm(x), model(x))
    canonicalize(gm)
    torch.testing.assert_close(gm(x), model(x))


def test_decomposed_linear_forms_are_recovered():
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 4, bias=False)).eval()
    x = torch.randn(2, 3, 4)
    gm = torch.export.export(model, (x,), strict=False).run_decompositions().module()
    CanonicalizeLinear()(gm)
    gm.recompile()
    lins = [n for n in gm.graph.nodes if n.target is aten.linear.default]
    assert [n.args[1].target for n in lins] == ["0.weight", "1.weight"]
    torch.testing.assert_close(gm(x), model(x))


class _Breaks(PassBase):
    def call(self, gm):
        nodes = list(gm.graph.nodes)
        with gm.graph.inserting_before(nodes[1]):
            gm.graph.call_function(torch.relu, (nodes[-2],))  # uses a value not yet defined
        return PassResult(gm, True)


class _Counts(PassBase):
    def __init__(self):
        self.calls = 0

    def call(self, gm):
        self.calls += 1
        return PassResult(gm, False)


def test_pass_manager_runs_in_order_logs_and_lints(capsys):
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))
    counter = _Counts()
    pm = PassManager([counter, NormalizeTorchOps()], verbose=True)
    result = pm.run(gm)
    assert isinstance(result, PassResult) and result.modified and counter.calls == 1
    assert [e.name for e in pm.log] == ["_Counts", "NormalizeTorchOps"]
    assert not pm.log[0].modified and pm.log[1].modified
    assert pm.log[1].removed == {"call_module:Linear": 1, "call_module:ReLU": 1}
    err = capsys.readouterr().err
    assert "NormalizeTorchOps:" in err and "+1 call_function:aten.linear.default" in err
    with pytest.raises(PassError, match="_Breaks left an invalid graph"):
        PassManager([_Breaks()]).run(fx.symbolic_trace(nn.Linear(2, 2)))


@pytest.mark.parametrize("spelling", ["pow", "square", "mul", "module"])
def test_squared_relu_spellings_become_one_relu2_node(spelling):
    """Nemotron's ReLUSquaredActivation, ``relu(x) ** 2``, ``torch.square(relu(x))`` and
    ``r * r`` are all the one canonical ``relu2`` activation, and the graph computes the same."""
    import transformers.activations as hf_acts

    class Sq(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = hf_acts.ReLUSquaredActivation()

        def forward(self, x):
            if spelling == "pow":
                return F.relu(x) ** 2
            if spelling == "square":
                return torch.square(torch.relu(x))
            if spelling == "mul":
                r = x.relu()
                return r * r
            return self.act(x)

    x = torch.randn(3, 7)
    gm = capture(Sq(), (x,))
    CanonicalizeActivations()(gm)
    assert _targets(gm).count(relu_squared) == 1
    assert aten.relu.default not in _targets(gm)
    torch.testing.assert_close(gm(x), F.relu(x).square(), rtol=0, atol=0)
