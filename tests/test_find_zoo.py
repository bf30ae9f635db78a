"""find_ffns on the model zoo: exact count and fields per model, and the weights it reports
reproduce each block (dense_reference equals the block's value in the captured graph, and the
real submodule's output where the block is a whole module)."""
import pytest
import torch

import moefx
from moefx.passes.find_ffn import find_ffns_in_graph

import zoo

_CACHE = {}


def _found(name):
    if name not in _CACHE:
        model, args, kwargs = zoo.ZOO[name]()
        gm = moefx.capture(model, args, kwargs)
        report = find_ffns_in_graph(gm, model, explain=True)
        _CACHE[name] = (model, args, kwargs, gm, report)
    return _CACHE[name]


@pytest.mark.parametrize("name", sorted(zoo.EXPECTED))
def test_zoo_counts_and_fields(name):
    model, _, _, _, report = _found(name)
    count, kind, act, bias1, bias2, first_path, first_exact = zoo.EXPECTED[name]
    matches = report.matches
    assert len(matches) == count, str(report)
    for m in matches:
        assert (m.kind, m.activation, m.bias1, m.bias2) == (kind, act, bias1, bias2)
        assert (m.d_model, m.d_ff) == (zoo.D, zoo.FF)
        assert m.module_exact == first_exact
    assert matches[0].path == first_path
    params = dict(model.named_parameters())
    for m in matches:
        for role, fqn in m.weights.items():
            assert fqn in params, f"{name}: {role} -> {fqn} is not a parameter"
        for role, mod in m.modules.items():
            assert isinstance(model.get_submodule(mod), torch.nn.Module)
        assert m.output_node in m.nodes and all(n.meta["moefx"]["ffn"] == m.name for n in m.nodes)


@pytest.mark.parametrize("name", sorted(zoo.EXPECTED))
def test_zoo_dense_reference_reproduces_block_in_graph(name):
    model, args, kwargs, gm, report = _found(name)
    io = zoo.block_io(model, gm, args, kwargs, report.matches)
    for m, (x, y) in zip(report.matches, io):
        torch.testing.assert_close(m.dense_reference(x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(n for n, e in zoo.EXPECTED.items() if e[6]))
def test_zoo_dense_weights_reproduce_whole_module(name):
    """For module_exact blocks the real submodule (HF's own activation code, Conv1D layout...)
    is the judge, on fresh random input."""
    model, _, _, _, report = _found(name)
    for m in report.matches:
        module = model.get_submodule(m.path) if m.path else model
        x = torch.randn(3, 4, m.d_model)
        with torch.no_grad():
            torch.testing.assert_close(m.dense_reference(x), module(x), rtol=1e-5, atol=1e-6)
        w = m.dense_weights()
        assert w["w1"].shape == (m.d_ff, m.d_model) and w["w2"].shape == (m.d_model, m.d_ff)
        assert (w["w3"] is not None) == (m.kind == "glu")


def test_gpt2_conv1d_layout_is_reported_and_undone():
    model, _, _, _, report = _found("gpt2")
    m = report.matches[0]
    assert m.layout["w1"] == "conv1d" and m.modules["w1"] == "transformer.h.0.mlp.c_fc"
    conv = model.get_submodule("transformer.h.0.mlp.c_fc").weight
    assert conv.shape == (zoo.D, zoo.FF)
    assert torch.equal(m.dense_weights()["w1"], conv.t())


def test_functional_mlp_spans_code_and_has_functional_layout():
    _, _, _, _, report = _found("functional_mlp")
    (m,) = report.matches
    assert m.path is None and not m.module_exact and m.modules == {}
    assert m.layout == {"w1": "functional_t", "b1": "functional_t", "w2": "functional_t", "b2": "functional_t"}
    assert m.weights == {"w1": "w_in", "b1": "b_in", "w2": "w_out", "b2": "b_out"}


def test_fused_gate_up_is_split_in_the_right_order():
    model, _, _, _, report = _found("fused_glu")
    (m,) = report.matches
    assert m.layout["w13"] == "fused_gate_first" and set(m.weights) == {"w13", "w2"}
    w = m.dense_weights()
    torch.testing.assert_close(w["w1"], model.gate_up_proj.weight[: zoo.FF])
    torch.testing.assert_close(w["w3"], model.gate_up_proj.weight[zoo.FF:])


def test_bert_block_spans_two_modules():
    _, _, _, _, report = _found("bert")
    m = report.matches[0]
    assert m.path == "encoder.layer.0" and not m.module_exact
    assert m.modules["w1"] == "encoder.layer.0.intermediate.dense"
    assert m.modules["w2"] == "encoder.layer.0.output.dense"


def test_find_ffns_public_api_returns_list_in_graph_order():
    model, args, kwargs = zoo.t5()
    matches = moefx.find_ffns(model, args, kwargs)
    assert isinstance(matches, list) and all(isinstance(m, moefx.FFNMatch) for m in matches)
    assert [m.path for m in matches] == [
        "encoder.block.0.layer.1.DenseReluDense", "encoder.block.1.layer.1.DenseReluDense",
        "decoder.block.0.layer.2.DenseReluDense", "decoder.block.1.layer.2.DenseReluDense",
    ]
