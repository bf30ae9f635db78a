"""Save/load round trips (safetensors + JSON recipe) and atomic, non-clobbering saves."""
import json
import os

import pytest
import torch
import torch.fx as fx

import moefx
from moefx.config import SliceMoEConfig, XMoEConfig

from test_convert_xmoe import run
import zoo
from zoo import ZOO


def test_hf_round_trip_is_bitwise(tmp_path):
    model, inputs, kwargs = ZOO["gpt2"]()
    out = moefx.convert(model, XMoEConfig(num_experts=4, threshold=0.5, num_shared=1), inputs, kwargs)
    with torch.no_grad():
        out.transformer.h[0].mlp.router.weight.mul_(3.0)  # a change only the weights file knows
    path = moefx.save(out, str(tmp_path / "m"))
    recipe = json.load(open(os.path.join(path, "recipe.json")))
    assert recipe["base"]["kind"] == "hf" and recipe["layers"][0]["partition"]
    back = moefx.load(path)
    assert type(back) is type(out)
    assert torch.equal(back.transformer.h[0].mlp.router.weight, out.transformer.h[0].mlp.router.weight)
    assert torch.equal(back.transformer.h[0].mlp.moefx_partition, out.transformer.h[0].mlp.moefx_partition)
    assert torch.equal(run(back, inputs, kwargs), run(out, inputs, kwargs))


def test_slicemoe_and_chain_round_trip(tmp_path):
    model, inputs, kwargs = ZOO["bert"]()
    out = moefx.convert(model, SliceMoEConfig(num_slices=4, num_experts=4, top_k=2), inputs, kwargs)
    back = moefx.load(moefx.save(out, str(tmp_path / "b")))
    assert isinstance(back.encoder.layer[0].output.dense, torch.nn.Identity)
    assert torch.equal(run(back, inputs, kwargs), run(out, inputs, kwargs))


def test_graph_module_round_trip_through_source(tmp_path):
    model, inputs, kwargs = ZOO["functional_mlp"]()
    out = moefx.convert(model, XMoEConfig(num_experts=4, threshold=0.5), inputs, kwargs)
    assert isinstance(out, fx.GraphModule)
    with pytest.raises(ValueError, match="no source is known"):
        moefx.save(out, str(tmp_path / "g0"))
    assert not (tmp_path / "g0").exists()
    path = moefx.save(out, str(tmp_path / "g"), source={"kind": "factory", "factory": "zoo:functional_mlp"})
    back = moefx.load(path)
    assert isinstance(back, fx.GraphModule)
    assert torch.equal(back(*inputs), out(*inputs))


@pytest.mark.parametrize("factory", ["shared_ffn", "albert"])
def test_shared_layer_round_trip_stays_shared(tmp_path, factory):
    """A block called at several places (one name per call for ALBERT) comes back rewritten at
    every call, as one shared layer."""
    model, inputs, kwargs = getattr(zoo, factory)()
    out = moefx.convert(model, XMoEConfig(num_experts=4, threshold=0.7), inputs, kwargs)
    path = moefx.save(out, str(tmp_path / "s"), source={"kind": "factory", "factory": f"zoo:{factory}"})
    back = moefx.load(path)
    assert len({id(m) for m in back.modules() if type(m).__name__ == "XMoE"}) == 1
    assert sum(n.op == "call_module" for n in back.graph.nodes if "xmoe" in str(n.target)) == 3
    assert sum(p.numel() for p in back.parameters()) == sum(p.numel() for p in out.parameters())
    x = torch.randn(3, 4, zoo.D) if factory == "shared_ffn" else torch.randint(0, zoo.VOCAB, (3, 4))
    got, want = back(x), out(x)
    if factory == "albert":
        got, want = got.last_hidden_state, want.last_hidden_state
    assert torch.equal(got, want)


def test_existing_directory_is_not_overwritten_without_flag(tmp_path):
    model, inputs, kwargs = ZOO["llama"]()
    out = moefx.convert(model, XMoEConfig(num_experts=4), inputs, kwargs)
    dest = tmp_path / "m"
    dest.mkdir()
    (dest / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="--force"):
        moefx.save(out, str(dest))
    assert (dest / "keep.txt").read_text() == "user data"
    moefx.save(out, str(dest), overwrite=True)
    assert not (dest / "keep.txt").exists() and (dest / "recipe.json").exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


def test_crash_mid_save_leaves_nothing_loadable(tmp_path, monkeypatch):
    import safetensors.torch

    model, inputs, kwargs = ZOO["llama"]()
    out = moefx.convert(model, XMoEConfig(num_experts=4), inputs, kwargs)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_model", boom)
    with pytest.raises(OSError, match="disk full"):
        moefx.save(out, str(tmp_path / "m"))
    assert os.listdir(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="not a saved moefx model"):
        moefx.load(str(tmp_path / "m"))


def test_save_refuses_an_unconverted_model(tmp_path):
    with pytest.raises(ValueError, match="carries no moefx recipe"):
        moefx.save(torch.nn.Linear(2, 2), str(tmp_path / "x"))


def test_a_threshold_lifted_by_calibration_is_what_load_rebuilds(tmp_path):
    """A budget above what t can keep lifts that layer's threshold (calibrate); save writes the
    layer's own config, so the loaded model routes exactly as the saved one."""
    model, inputs, kwargs = ZOO["llama"]()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 64, (2, 16), generator=g) for _ in range(3)]
    out = moefx.convert(model, XMoEConfig(num_experts=16, threshold=0.9), inputs, kwargs, calibration_batches=batches[:2])
    rep = moefx.calibrate(out, batches, target_ratio=0.97, verbose=False, progress=False)
    from moefx.convert.calibrate import moe_layers

    lifted = [l.config.threshold for l in moe_layers(out).values()]
    assert all(t > 0.97 for t in lifted), lifted
    assert all(r.ratio_after > 0.95 for r in rep.layers), [r.ratio_after for r in rep.layers]
    back = moefx.load(moefx.save(out, str(tmp_path / "t")))
    assert [l.config.threshold for l in moe_layers(back).values()] == lifted
    assert torch.equal(run(back, inputs, kwargs), run(out, inputs, kwargs))
