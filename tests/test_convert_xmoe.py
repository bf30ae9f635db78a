"""Dense -> XMoE conversion: exact with every expert kept (SPEC §3), on every FFN of the zoo,
and the user's model kept where the FFN sits in whole submodules."""
import copy

import pytest
import torch
import torch.fx as fx

import moefx
from moefx.capture import prepare_kwargs
from moefx.config import XMOE_SPLITS, ConfigError, XMoEConfig
from moefx.convert.rewrite import ConversionError

import zoo
from zoo import EXPECTED, ZOO


def first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        if hasattr(out, key) and getattr(out, key) is not None:
            return getattr(out, key)
    if isinstance(out, (tuple, list)):
        return first_tensor(out[0])
    if hasattr(out, "to_tuple"):
        return first_tensor(out.to_tuple()[0])
    raise TypeError(type(out))


def run(model, inputs, kwargs, like=None):
    kw = prepare_kwargs(like if like is not None else model, kwargs)
    with torch.no_grad():
        return first_tensor(model(*inputs, **kw))


def moe_layers(model):
    return [m for m in model.modules() if type(m).__name__ == "XMoE"]


@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_expert_kept_equals_dense(name):
    model, inputs, kwargs = ZOO[name]()
    dense = copy.deepcopy(model)
    cfg = XMoEConfig(num_experts=4, threshold=1.0, combine="unit", split="kmeans")
    out = moefx.convert(model, cfg, inputs, kwargs)
    count = EXPECTED[name][0]
    assert len(moe_layers(out)) == count
    ref = run(dense, inputs, kwargs)
    got = run(out, inputs, kwargs, like=dense)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("split", XMOE_SPLITS)
def test_every_split_and_shared_is_exact(split):
    model, inputs, kwargs = ZOO["llama"]()
    dense = copy.deepcopy(model)
    cfg = XMoEConfig(num_experts=3, num_shared=1, threshold=1.0, split=split)
    out = moefx.convert(model, cfg, inputs, kwargs)
    layer = moe_layers(out)[0]
    assert layer.shared_w1.shape == (layer.expert_hidden, 16)
    torch.testing.assert_close(run(out, inputs, kwargs), run(dense, inputs, kwargs), rtol=1e-5, atol=1e-5)


def test_hf_model_stays_hf_with_labels_and_generate():
    model, inputs, kwargs = ZOO["llama"]()
    cls = type(model)
    out = moefx.convert(model, XMoEConfig(num_experts=4, threshold=0.5), inputs, kwargs)
    assert type(out) is cls and type(out.model.layers[0].mlp).__name__ == "XMoE"
    ids = inputs[0]
    loss = out(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
    gen = out.generate(ids, max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, ids.shape[1] + 3)


def test_bert_split_block_is_a_chain_swap():
    model, inputs, kwargs = ZOO["bert"]()
    dense = copy.deepcopy(model)
    out = moefx.convert(model, XMoEConfig(num_experts=4, threshold=1.0), inputs, kwargs)
    assert out is model and not isinstance(out, fx.GraphModule)
    layer0 = out.encoder.layer[0]
    assert type(layer0.intermediate).__name__ == "XMoE"
    assert isinstance(layer0.output.dense, torch.nn.Identity)
    torch.testing.assert_close(run(out, inputs, kwargs), run(dense, inputs, kwargs), rtol=1e-5, atol=1e-5)


def test_functional_block_gives_a_graph_module():
    model, inputs, kwargs = ZOO["functional_mlp"]()
    out = moefx.convert(model, XMoEConfig(num_experts=4, threshold=0.5), inputs, kwargs)
    assert isinstance(out, fx.GraphModule)
    calls = [n for n in out.graph.nodes if n.op == "call_module" and type(out.get_submodule(n.target)).__name__ == "XMoE"]
    assert len(calls) == 1
    assert run(out, inputs, kwargs).shape == inputs[0].shape


def test_graph_module_result_runs_on_other_batch_and_sequence_sizes():
    """The capture keeps batch and sequence dynamic, so the GraphModule conversion returns is a
    model, not a trace of one input shape."""
    model, inputs, kwargs = ZOO["functional_mlp"]()
    out = moefx.convert(model, XMoEConfig(num_experts=4, threshold=1.0), inputs, kwargs)
    assert isinstance(out, fx.GraphModule) and inputs[0].shape[:2] == (2, 5)
    for shape in [(3, 11, zoo.D), (1, 1, zoo.D), (7, 2, zoo.D)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            torch.testing.assert_close(out(x), model(x), rtol=1e-5, atol=1e-5)


def test_ffn_called_at_several_places_stays_one_shared_layer():
    torch.manual_seed(0)
    model, (x,), _ = zoo.shared_ffn()
    dense_params = sum(p.numel() for p in model.parameters())
    assert len(moefx.find_ffns(model, (x,))) == 3
    out = moefx.convert(model, XMoEConfig(num_experts=4, threshold=1.0, num_shared=1), (x,))
    layers = {id(m): m for m in out.modules() if type(m).__name__ == "XMoE"}
    assert len(layers) == 1
    (layer,) = layers.values()
    assert sum(p.numel() for p in out.parameters()) == dense_params + layer.router.weight.numel()
    with torch.no_grad():
        torch.testing.assert_close(out(x), model(x), rtol=1e-5, atol=1e-5)
    report = moefx.calibrate(out, [torch.randn(2, 8, zoo.D) for _ in range(2)], target_ratio=0.6,
                             verbose=False, progress=False)
    assert [r.tokens for r in report.layers] == [3 * 2 * 2 * 8]  # every call site's inputs


def test_selection_by_filter_and_by_map():
    model, inputs, kwargs = ZOO["llama"]()
    out = moefx.convert(model, XMoEConfig(num_experts=4), inputs, kwargs,
                        filter_fn=lambda mod, fqn: fqn.endswith("layers.1.mlp"))
    assert type(out.model.layers[0].mlp).__name__ != "XMoE"
    assert type(out.model.layers[1].mlp).__name__ == "XMoE"
    model, inputs, kwargs = ZOO["llama"]()
    out = moefx.convert(model, {"model.layers.0.mlp": XMoEConfig(num_experts=5)}, inputs, kwargs)
    assert out.model.layers[0].mlp.config.num_experts == 5
    assert type(out.model.layers[1].mlp).__name__ != "XMoE"


def test_filter_selecting_nothing_is_a_clear_error():
    model, inputs, kwargs = ZOO["llama"]()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConversionError, match="selected none of the 2 FFN blocks.*model.layers.0.mlp"):
        moefx.convert(model, XMoEConfig(), inputs, kwargs, filter_fn=lambda m, f: False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_model_without_ffn_is_a_clear_error():
    model = torch.nn.Sequential(torch.nn.Linear(8, 3))
    with pytest.raises(ConversionError, match="no dense FFN block found in Sequential"):
        moefx.convert(model, XMoEConfig(), (torch.randn(2, 8),))


def test_more_experts_than_neurons_fails_before_changing_the_model():
    model, inputs, kwargs = ZOO["llama"]()
    with pytest.raises(ConfigError, match="more than the d_ff = 40 hidden neurons.*model.layers.0.mlp"):
        moefx.convert(model, XMoEConfig(num_experts=41), inputs, kwargs)
    assert type(model.model.layers[0].mlp).__name__ == "LlamaMLP"


def test_threshold_outside_unit_interval_is_rejected():
    with pytest.raises(ConfigError, match=r"threshold must be a number in \[0, 1\]"):
        XMoEConfig(threshold=1.5)
    with pytest.raises(ConfigError, match=r"threshold must be a number in \[0, 1\]"):
        XMoEConfig(threshold=-0.1)


def test_partition_and_recipe_are_recorded():
    model, inputs, kwargs = ZOO["gpt2"]()
    out = moefx.convert(model, XMoEConfig(num_experts=4, num_shared=1), inputs, kwargs)
    recipe = out.moefx_recipe
    assert [e["target"] for e in recipe["layers"]] == ["transformer.h.0.mlp", "transformer.h.1.mlp"]
    layer = out.transformer.h[0].mlp
    groups = layer.moefx_partition
    assert groups.shape == (5, layer.expert_hidden)
    assert sorted(groups[groups >= 0].tolist()) == list(range(40))


def test_to_xmoe_pass_runs_in_the_pass_manager_and_is_exact():
    from moefx.capture import capture
    from moefx.passes.manager import PassManager
    from moefx.passes.to_xmoe import ToXMoE

    model, inputs, kwargs = ZOO["functional_mlp"]()
    gm = capture(model, inputs, kwargs)
    with torch.no_grad():
        ref = gm(*inputs)
    p = ToXMoE(XMoEConfig(num_experts=4, threshold=1.0), model=model)
    res = PassManager([p]).run(gm)
    assert res.modified and len(p.converted) == 1
    targets = [n.target for n in res.graph_module.graph.nodes if n.op == "call_module"]
    assert next(iter(p.converted)) in targets
    with torch.no_grad():
        torch.testing.assert_close(res.graph_module(*inputs), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm_first", [False, True])
def test_torch_transformer_encoder_converts_exactly(norm_first):
    """PyTorch's own nn.TransformerEncoder: its FFN is code inside the layer's forward
    (linear1 -> activation -> dropout -> linear2), so the result is a GraphModule; it equals the
    dense encoder, runs on other shapes, and carries no copy of the replaced dense weights."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, 80, batch_first=True, norm_first=norm_first)
    enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 7, 32)
    dense_params = sum(p.numel() for p in enc.parameters())
    out = moefx.convert(enc, XMoEConfig(num_experts=4, threshold=1.0), (x,))
    assert isinstance(out, fx.GraphModule)
    routers = [m.router.weight.numel() for m in out.modules() if type(m).__name__ == "XMoE"]
    assert len(routers) == 2
    assert sum(p.numel() for p in out.parameters()) == dense_params + sum(routers)
    for shape in [(2, 7, 32), (3, 5, 32)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            torch.testing.assert_close(out(x), enc(x), rtol=1e-5, atol=1e-5)


def test_graph_result_falls_back_to_the_static_graph_with_a_warning(monkeypatch):
    """When the dynamic re-capture fails, conversion still succeeds on the static graph and says
    that the result only takes inputs shaped like the example."""
    import moefx.passes.find_ffn as find_mod

    model, inputs, kwargs = ZOO["functional_mlp"]()
    real = find_mod.find_ffns

    def static_only(*args, dynamic=False, **kw):
        if dynamic:
            raise RuntimeError("symbolic shapes not supported here")
        return real(*args, **kw)

    monkeypatch.setattr(find_mod, "find_ffns", static_only)
    with pytest.warns(UserWarning, match="runs only on inputs shaped like the example.*symbolic shapes"):
        out = moefx.convert(model, XMoEConfig(num_experts=4, threshold=1.0), inputs, kwargs)
    with torch.no_grad():
        torch.testing.assert_close(out(*inputs), model(*inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("training", [False, True])
def test_new_layers_take_the_models_mode(training):
    model, inputs, kwargs = ZOO["llama"]()
    model.train(training)
    out = moefx.convert(model, XMoEConfig(num_experts=4), inputs, kwargs)
    layers = [m for m in out.modules() if type(m).__name__ == "XMoE"]
    assert len(layers) == 2 and all(m.training == training for m in layers)
    fn_model, fn_inputs, fn_kwargs = ZOO["functional_mlp"]()
    graph = moefx.convert(fn_model.train(training), XMoEConfig(num_experts=4), fn_inputs, fn_kwargs)
    assert all(m.training == training for m in graph.modules() if type(m).__name__ == "XMoE")
