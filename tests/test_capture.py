"""moefx.capture: torch.export first, moefx's fx tracer as fallback, a clear error otherwise."""
import pytest
import torch
import torch.nn as nn

import moefx
from moefx.capture import CaptureError, MoefxTracer, capture, prepare_kwargs

import zoo


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x + 1
        return x - 1


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = DataDependent()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(self.gate(x))


def _params_by_fqn(gm):
    return {n.target for n in gm.graph.nodes if n.op == "get_attr"}


def test_export_is_first_and_keeps_fqns_and_module_stack():
    model, args, kwargs = zoo.llama()
    gm = capture(model, args, kwargs)
    assert gm.meta["moefx_capture"] == "torch.export"
    assert "model.layers.0.mlp.gate_proj.weight" in _params_by_fqn(gm)
    stacks = [n.meta.get("nn_module_stack") for n in gm.graph.nodes if n.op == "call_function"]
    assert any(s and any(v[0] == "model.layers.0.mlp" for v in s.values()) for s in stacks)
    with torch.no_grad():
        torch.testing.assert_close(gm(*args, **prepare_kwargs(model, kwargs)).logits,
                                   model(*args, **kwargs).logits)


def test_use_cache_false_is_added_for_hf_decoders():
    model, args, _ = zoo.gpt2()
    assert prepare_kwargs(model, None) == {"use_cache": False}
    assert prepare_kwargs(model, {"use_cache": True}) == {"use_cache": True}
    assert prepare_kwargs(nn.Linear(2, 2), None) == {}
    gm = capture(model, args)  # no kwargs given: would fail on DynamicCache without use_cache=False
    assert gm.meta["moefx_capture"] == "torch.export"


def test_fallback_to_fx_tracer_with_user_leaf():
    model = Outer().eval()
    x = torch.randn(2, 4)
    gm = capture(model, (x,), leaf_modules=(DataDependent,))
    assert gm.meta["moefx_capture"] == "fx"
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["gate", "fc"]
    torch.testing.assert_close(gm(x), model(x))
    assert all("tensor_meta" in n.meta for n in gm.graph.nodes if n.op == "call_module")


def test_leaf_by_path():
    model = Outer().eval()
    gm = capture(model, (torch.randn(2, 4),), leaf_modules=("gate",), methods=("fx",))
    assert "gate" in [n.target for n in gm.graph.nodes if n.op == "call_module"]


def test_every_way_failing_lists_each_reason():
    with pytest.raises(CaptureError) as exc:
        capture(Outer().eval(), (torch.randn(2, 4),))
    msg = str(exc.value)
    assert "torch.export.export(strict=False)" in msg and "MoefxTracer" in msg
    assert "leaf_modules" in msg  # says what to do
    assert set(exc.value.failures) == {"torch.export.export(strict=False)", "moefx fx tracer (MoefxTracer)"}
    assert moefx.CaptureError is CaptureError


def test_not_a_module_is_a_type_error():
    with pytest.raises(TypeError, match="nn.Module"):
        capture(lambda x: x, (torch.randn(2),))


def test_tracer_leaves_include_linear_conv1d_and_activations():
    from transformers.activations import NewGELUActivation
    from transformers.pytorch_utils import Conv1D

    tracer = MoefxTracer()
    for mod in (nn.Linear(2, 2), Conv1D(2, 2), NewGELUActivation(), nn.GELU()):
        assert tracer.is_leaf_module(mod, "m")
    assert not tracer.is_leaf_module(nn.Sequential(nn.Linear(2, 2)), "m")


def test_public_functions_stay_functions_after_importing_their_modules():
    """``moefx.capture`` and ``moefx.convert`` name both a submodule and a function; importing
    the submodules (as other code does) must not rebind the public names to modules."""
    import importlib
    import types

    for name in ("moefx.capture", "moefx.convert", "moefx.convert.calibrate", "moefx.convert.io"):
        importlib.import_module(name)
    for fn in (moefx.capture, moefx.convert, moefx.calibrate):
        assert isinstance(fn, types.FunctionType)
    gm = moefx.capture(nn.Linear(3, 3), (torch.randn(2, 3),))
    assert isinstance(gm, torch.fx.GraphModule)


def test_mapping_inputs_are_keyword_arguments():
    model, args, _ = zoo.llama()
    gm = capture(model, {"input_ids": args[0]})
    placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    assert "input_ids" in placeholders and "use_cache" in placeholders


def test_dynamic_capture_runs_on_other_shapes_and_static_is_the_default():
    model, inputs, kwargs = zoo.functional_mlp()
    static = capture(model, inputs, kwargs)
    assert static.meta["moefx_dynamic"] is False
    with pytest.raises(Exception):
        static(torch.randn(3, 7, zoo.D))  # the default graph is the example's shape only
    gm = capture(model, inputs, kwargs, dynamic=True)
    assert gm.meta["moefx_dynamic"] is True
    for shape in [(3, 7, zoo.D), (1, 1, zoo.D)]:
        x = torch.randn(*shape)
        torch.testing.assert_close(gm(x), model(x))
