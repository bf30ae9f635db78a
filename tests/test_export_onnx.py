"""Whole-layer and whole-model round trips: moefx.export_onnx → onnxruntime, both targets,
parity against the SPEC §3 layer references on fresh inputs of a new shape; the report; the
file-writing guarantees; the error for an op with no translation."""
import os

import numpy as np
import onnx
import pytest
import torch

import moefx
from moefx import SliceMoEConfig, XMoEConfig
from moefx.export import ExportError, VerificationError, export_onnx
from moefx.export.verify import session
from moefx.kernels.reference import slicemoe_reference, xmoe_reference
from moefx.layers import SliceMoE, XMoE
from mystery_op import mystery

D, DFF = 16, 48


class Only(torch.nn.Module):
    """A model whose one submodule is the layer (the usual case: an MoE layer inside a model)."""

    def __init__(self, layer):
        super().__init__()
        self.moe = layer

    def forward(self, x):
        return self.moe(x)


LAYERS = {
    "xmoe-threshold-relu": lambda: XMoE(XMoEConfig(num_experts=8, threshold=0.6), D, DFF, activation="relu"),
    "xmoe-top2-swiglu-shared-unit": lambda: XMoE(
        XMoEConfig(num_experts=8, threshold=None, top_k=2, num_shared=1), D, DFF, activation="silu",
        glu=True, bias=False, converted=True),
    "xmoe-threshold-cap-gelu_tanh-shared": lambda: XMoE(
        XMoEConfig(num_experts=6, threshold=0.8, max_experts=3, num_shared=2), D, DFF, activation="gelu_tanh"),
    "xmoe-top3-quick_gelu-glu-bias": lambda: XMoE(
        XMoEConfig(num_experts=8, threshold=None, top_k=3), D, DFF, activation="quick_gelu", glu=True),
    "xmoe-threshold-gelu-erf": lambda: XMoE(XMoEConfig(num_experts=8, threshold=0.7), D, DFF, activation="gelu"),
    "slicemoe-input-gate": lambda: SliceMoE(
        SliceMoEConfig(num_slices=4, num_experts=6, top_k=2, router_hidden=8), D, DFF, activation="relu"),
    "slicemoe-output-gate-swiglu": lambda: SliceMoE(
        SliceMoEConfig(num_slices=2, num_experts=6, top_k=2, router_hidden=8, gate="output"), D, DFF,
        activation="silu", glu=True),
}
CONTRIB_EXPECTED = {  # what the ort target must emit for each layer
    "xmoe-threshold-relu": True,
    "xmoe-top2-swiglu-shared-unit": True,
    "xmoe-threshold-cap-gelu_tanh-shared": True,
    "xmoe-top3-quick_gelu-glu-bias": True,
    "xmoe-threshold-gelu-erf": False,
    "slicemoe-input-gate": False,
    "slicemoe-output-gate-swiglu": True,
}
#: layers whose routing is the contrib op's own (softmax, top-k, raw or renormalised weights):
#: their router logits feed the node directly, with no TopK or log-weight scatter in the graph
DIRECT_EXPECTED = {"xmoe-top3-quick_gelu-glu-bias", "slicemoe-output-gate-swiglu"}


def _reference(layer, x):
    return xmoe_reference(layer, x) if isinstance(layer, XMoE) else slicemoe_reference(layer, x)


def _contrib_nodes(path):
    return [n for n in onnx.load(str(path)).graph.node if n.domain == "com.microsoft"]


@pytest.mark.parametrize("target", ["portable", "ort"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_round_trip(tmp_path, name, target):
    layer = LAYERS[name]().eval()
    model = Only(layer)
    path = tmp_path / "m.onnx"
    report = export_onnx(model, (torch.randn(2, 5, D),), str(path), target=target)
    contrib = target == "ort" and CONTRIB_EXPECTED[name]
    (plan,) = report.layers
    assert plan.path == "moe" and plan.emitted == ("com.microsoft.MoE" if contrib else "portable")
    nodes = _contrib_nodes(path)
    assert [n.op_type for n in nodes] == (["MoE"] if contrib else [])
    direct = contrib and name in DIRECT_EXPECTED
    assert plan.direct == direct and ("routing inside the node" in plan.reason) == direct
    if contrib:
        ops = {n.op_type for n in onnx.load(str(path)).graph.node}
        assert ("TopK" in ops or "ScatterElements" in ops) != direct
    assert report.verification and all(r.ok for r in report.verification)
    assert {r.shapes for r in report.verification} == {"2x5x16", "1x1x16"}

    x = torch.randn(3, 7, D)
    (got,) = session(str(path)).run(None, {"x": x.numpy()})
    ref = _reference(layer, x)
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    assert isinstance(model.moe, type(layer)), "the user's model must come back unchanged"


def test_fallback_reasons_are_reported(tmp_path):
    model = torch.nn.Sequential(LAYERS["slicemoe-input-gate"](), LAYERS["xmoe-threshold-gelu-erf"](),
                                LAYERS["xmoe-threshold-relu"]())
    report = export_onnx(model, (torch.randn(2, 3, D),), str(tmp_path / "m.onnx"), target="ort")
    reasons = {p.path: (p.emitted, p.reason) for p in report.layers}
    assert reasons["0"][0] == "portable" and "gate='input'" in reasons["0"][1]
    assert reasons["1"][0] == "portable" and "accept_gelu_tanh" in reasons["1"][1]
    assert reasons["2"][0] == "com.microsoft.MoE"
    text = str(report)
    assert "MoE layers: 3 (1 as com.microsoft.MoE)" in text and "com.microsoft::MoE x1" in text
    assert "gate='input'" in text and "verified in onnxruntime" in text


def test_accept_gelu_tanh_uses_contrib_op_and_says_so(tmp_path):
    layer = LAYERS["xmoe-threshold-gelu-erf"]()
    path = tmp_path / "m.onnx"
    report = export_onnx(Only(layer), (torch.randn(2, 4, D),), str(path), accept_gelu_tanh=True)
    assert report.layers[0].emitted == "com.microsoft.MoE" and report.layers[0].approximated
    assert [n.op_type for n in _contrib_nodes(path)] == ["MoE"]
    assert "tanh" in str(report)


def test_capacity_routing_exports(tmp_path):
    """Capacity depends on the token count: the exported graph computes it from the shape."""
    layer = XMoE(XMoEConfig(num_experts=4, threshold=0.9, max_experts=3, capacity_factor=0.5), D, DFF,
                 activation="relu").eval()
    path = tmp_path / "m.onnx"
    export_onnx(Only(layer), (torch.randn(2, 6, D),), str(path), target="ort")
    x = torch.randn(4, 9, D)
    (got,) = session(str(path)).run(None, {"x": x.numpy()})
    ref = xmoe_reference(layer, x)
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_bare_layer_and_dense_model_export(tmp_path):
    layer = LAYERS["xmoe-threshold-relu"]().eval()
    report = export_onnx(layer, (torch.randn(2, 3, D),), str(tmp_path / "layer.onnx"))
    assert report.layers[0].path == "<root>" and report.layers[0].emitted == "com.microsoft.MoE"
    assert isinstance(layer, XMoE)
    dense = torch.nn.Sequential(torch.nn.Linear(D, DFF), torch.nn.GELU(), torch.nn.Linear(DFF, D))
    report = export_onnx(dense, (torch.randn(2, 3, D),), str(tmp_path / "dense.onnx"))
    assert report.layers == [] and "dense model" in str(report)


def test_tiny_llama_with_xmoe_layers_round_trips(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=48, hidden_size=D, intermediate_size=DFF, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    for block in model.model.layers:
        block.mlp = XMoE(XMoEConfig(num_experts=8, threshold=0.8), D, DFF, activation="silu", glu=True,
                         bias=False, converted=True)
    ids = torch.randint(0, 48, (2, 6))
    path = tmp_path / "llama.onnx"
    report = export_onnx(model, (ids,), str(path), example_kwargs={"use_cache": False})
    assert [p.emitted for p in report.layers] == ["com.microsoft.MoE"] * 2
    assert len(_contrib_nodes(path)) == 2
    sess = session(str(path))
    new_ids = torch.randint(0, 48, (3, 11))
    (logits,) = sess.run(None, {sess.get_inputs()[0].name: new_ids.numpy()})
    with torch.no_grad():
        ref = model(new_ids, use_cache=False).logits
    np.testing.assert_allclose(logits, ref.numpy(), rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


# ------------------------------------------------------------------ errors and file safety


class Mystery(torch.nn.Module):
    def forward(self, x):
        return mystery(x) + 1


class HoldsMystery(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.odd = Mystery()

    def forward(self, x):
        return self.odd(x)


def test_op_without_translation_names_the_node(tmp_path):
    path = tmp_path / "m.onnx"
    with pytest.raises(ExportError) as info:
        export_onnx(HoldsMystery(), (torch.randn(2, 3, 4),), str(path))
    message = str(info.value)
    assert "moefx_test::mystery" in message and "node 'mystery'" in message
    assert "odd (Mystery)" in message and "register_translation" in message
    assert not path.exists()


def test_failed_verification_writes_nothing(tmp_path, monkeypatch):
    """A wrong translation (moe_ffn returning zeros) must be caught, and neither the existing
    destination nor any temporary file may change."""
    from onnxscript import opset18 as op

    from moefx.export import translations

    def wrong(x, idx, weight, w1, b1, w3, b3, w2, b2, activation, gate_input):
        return op.Mul(x, op.CastLike(op.Constant(value_float=0.0), x))

    monkeypatch.setitem(translations._EXTRA, "moefx::moe_ffn", wrong)
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous file")
    with pytest.raises(VerificationError) as info:
        export_onnx(Only(LAYERS["xmoe-threshold-relu"]()), (torch.randn(2, 3, D),), str(path), target="portable")
    assert "relative error" in str(info.value) and "not written" in str(info.value)
    assert path.read_bytes() == b"previous file"
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_external_data_round_trip(tmp_path):
    layer = LAYERS["xmoe-top2-swiglu-shared-unit"]().eval()
    path = tmp_path / "ext.onnx"
    report = export_onnx(Only(layer), (torch.randn(2, 3, D),), str(path), external_data=True)
    assert report.external_data and (tmp_path / "ext.onnx.data").exists()
    assert sorted(os.listdir(tmp_path)) == ["ext.onnx", "ext.onnx.data"]
    x = torch.randn(1, 4, D)
    (got,) = session(str(path)).run(None, {"x": x.numpy()})
    np.testing.assert_allclose(got, xmoe_reference(layer, x).numpy(), rtol=1e-5, atol=1e-6)


def test_bad_arguments_are_explained(tmp_path):
    model = Only(LAYERS["xmoe-threshold-relu"]())
    with pytest.raises(ExportError, match="target must be one of"):
        export_onnx(model, (torch.randn(2, 3, D),), str(tmp_path / "m.onnx"), target="tensorrt")
    with pytest.raises(ExportError, match="must end in .onnx"):
        export_onnx(model, (torch.randn(2, 3, D),), str(tmp_path / "m.bin"))
    with pytest.raises(ExportError, match="does not exist"):
        export_onnx(model, (torch.randn(2, 3, D),), str(tmp_path / "nope" / "m.onnx"))
    assert moefx.export_onnx is export_onnx


def test_float16_layers_export_and_run_on_cpu(tmp_path):
    """A float16 model exports and runs in onnxruntime's CPU provider: the experts' rows are
    summed in float32 (the CPU ScatterND has no float16 add), within SPEC §3's half tolerance."""
    layer = XMoE(XMoEConfig(num_experts=6, threshold=0.7, num_shared=1), D, DFF, activation="silu", glu=True).eval()
    model = Only(layer).half()
    path = tmp_path / "m.onnx"
    report = export_onnx(model, (torch.randn(2, 5, D).half(),), str(path), target="ort")
    assert report.layers[0].emitted == "portable" and "float16" in report.layers[0].reason
    assert report.verification and all(r.ok for r in report.verification)
    x = torch.randn(3, 7, D)
    (got,) = session(str(path)).run(None, {"x": x.half().numpy()})
    with torch.no_grad():
        ref = layer.float()(x).numpy()
    np.testing.assert_allclose(got.astype(np.float32), ref, rtol=1e-2, atol=1e-2 * float(np.abs(ref).max()))


def test_bfloat16_model_fails_verification_with_what_to_do(tmp_path):
    model = Only(LAYERS["xmoe-threshold-relu"]().eval()).to(torch.bfloat16)
    path = tmp_path / "m.onnx"
    with pytest.raises(VerificationError, match=r"no bfloat16 kernels.*model\.float\(\)"):
        export_onnx(model, (torch.randn(2, 5, D).to(torch.bfloat16),), str(path))
    assert not path.exists() and os.listdir(tmp_path) == []
