"""Dense -> SliceMoE conversion: layers placed like XMoE ones, initialised from the dense
weights as documented, the dense teacher kept for calibration, bad slice counts refused."""
import copy

import pytest
import torch

import moefx
from moefx.config import ConfigError, SliceMoEConfig
from moefx.convert.dense import DenseFFN
from moefx.convert.init_slicemoe import build_slicemoe

from zoo import ZOO


def test_llama_ffns_become_slicemoe_and_the_model_still_generates():
    model, inputs, kwargs = ZOO["llama"]()
    cfg = SliceMoEConfig(num_slices=4, num_experts=8, top_k=2)
    out = moefx.convert(model, cfg, inputs, kwargs)
    layer = out.model.layers[0].mlp
    assert type(layer).__name__ == "SliceMoE" and layer.config == cfg
    assert isinstance(layer.moefx_teacher, DenseFFN)
    assert out.moefx_recipe["layers"][0]["kind"] == "slicemoe"
    ids = inputs[0]
    assert torch.isfinite(out(input_ids=ids, labels=ids).loss)
    assert out.generate(ids, max_new_tokens=2, do_sample=False).shape[1] == ids.shape[1] + 2


def test_initialisation_copies_the_block_diagonal_of_the_dense_weights():
    g = torch.Generator().manual_seed(0)
    d, d_ff = 8, 24
    dense = DenseFFN(w1=torch.randn(d_ff, d, generator=g), w2=torch.randn(d, d_ff, generator=g), activation="gelu",
                     b1=torch.randn(d_ff, generator=g), b2=torch.randn(d, generator=g))
    cfg = SliceMoEConfig(num_slices=2, num_experts=4, top_k=2, expert_hidden=6)
    layer = build_slicemoe(dense, cfg)
    for e in range(4):
        s, r = e % 2, e // 2
        cols = slice(s * 4, (s + 1) * 4)
        score = dense.w1[:, cols].norm(dim=1) * dense.w2[cols].norm(dim=0)
        neurons = score.argsort(descending=True)[r * 6:(r + 1) * 6]
        torch.testing.assert_close(layer.w1[e], dense.w1[neurons][:, cols] * 2)
        torch.testing.assert_close(layer.w2[e], dense.w2[cols][:, neurons])
        torch.testing.assert_close(layer.b2[e], dense.b2[cols] / 2)


def test_slices_must_divide_d_model_and_nothing_changes():
    model, inputs, kwargs = ZOO["gpt2"]()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=r"num_slices=3 does not divide d_model=16 \(at module 'transformer.h.0.mlp'\)"):
        moefx.convert(model, SliceMoEConfig(num_slices=3), inputs, kwargs)
    assert type(model.transformer.h[0].mlp).__name__ == "GPT2MLP"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_graph_pass_replaces_functional_block():
    from moefx.capture import capture
    from moefx.passes.to_slicemoe import ToSliceMoE

    model, inputs, kwargs = ZOO["functional_mlp"]()
    gm = capture(model, inputs, kwargs)
    p = ToSliceMoE(SliceMoEConfig(num_slices=4, num_experts=4, top_k=2), model=model)
    res = p.call(gm)
    assert res.modified and len(p.converted) == 1
    name = next(iter(p.converted))
    assert [n.target for n in res.graph_module.graph.nodes if n.op == "call_module"] == [name] or \
        name in [n.target for n in res.graph_module.graph.nodes if n.op == "call_module"]
    assert res.graph_module(*inputs).shape == inputs[0].shape
