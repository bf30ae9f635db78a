"""moefx.models.load_model: every MODEL form, JSON-able sources that reload the same model,
clear errors for what is not a model; and the real SmolLM2-135M (loaded once)."""
import json
import textwrap

import pytest
import torch

import moefx
from moefx import models
from moefx.models import LoadedModel, ModelLoadError, load_from_source, load_model

import zoo


def _write_config(tmp_path, builder=zoo.llama):
    model, _, _ = builder()
    d = tmp_path / "cfg"
    d.mkdir()
    model.config.to_json_file(str(d / "config.json"))
    return d / "config.json"


def test_config_json_gives_random_weights_reproducibly(tmp_path):
    path = _write_config(tmp_path)
    a = load_model(str(path))
    assert isinstance(a, LoadedModel) and type(a.model).__name__ == "LlamaForCausalLM"
    assert not a.model.training
    assert a.example_kwargs["input_ids"].shape == (1, 8) and a.example_kwargs["use_cache"] is False
    assert a.source == {"kind": "config", "path": str(path.resolve()), "seed": 0}
    b = load_from_source(json.loads(json.dumps(a.source)))
    for (na, pa), (nb, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert na == nb and torch.equal(pa, pb)
    assert len(moefx.find_ffns(a.model, a.example_inputs, a.example_kwargs)) == zoo.LAYERS


def test_hf_directory_loads_saved_weights(tmp_path):
    model, _, _ = zoo.gpt2()
    model.save_pretrained(str(tmp_path / "gpt2"))
    loaded = load_model(str(tmp_path / "gpt2"))
    assert loaded.source["kind"] == "hf_dir"
    w = loaded.model.transformer.h[0].mlp.c_fc.weight
    assert torch.equal(w, model.transformer.h[0].mlp.c_fc.weight)
    matches = moefx.find_ffns(loaded.model, loaded.example_inputs, loaded.example_kwargs)
    assert [m.layout["w1"] for m in matches] == ["conv1d"] * zoo.LAYERS


def test_vision_and_encoder_decoder_example_inputs(tmp_path):
    vit = load_model(str(_write_config(tmp_path, zoo.vit)))
    assert vit.example_kwargs["pixel_values"].shape == (1, 3, 16, 16)
    t5dir = tmp_path / "t5"
    t5dir.mkdir()
    zoo.t5()[0].config.to_json_file(str(t5dir / "config.json"))
    t5 = load_model(str(t5dir / "config.json"))
    assert {"input_ids", "decoder_input_ids"} <= set(t5.example_kwargs)
    assert len(moefx.find_ffns(t5.model, t5.example_inputs, t5.example_kwargs)) == 2 * zoo.LAYERS


def test_factory_forms(tmp_path, monkeypatch):
    (tmp_path / "h1_factories.py").write_text(textwrap.dedent("""
        import torch, torch.nn as nn
        def bare():
            return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
        def with_inputs():
            return bare(), (torch.randn(2, 4),)
        def with_kwargs():
            return bare(), (), {"input": torch.randn(2, 4)}
        NOT_CALLABLE = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = load_model("h1_factories:with_inputs")
    assert loaded.source == {"kind": "factory", "factory": "h1_factories:with_inputs"}
    assert loaded.example_inputs[0].shape == (2, 4) and loaded.example_kwargs == {}
    assert "input" in load_model("h1_factories:with_kwargs").example_kwargs
    with pytest.raises(ModelLoadError, match="no example inputs"):
        load_model("h1_factories:bare")
    with pytest.raises(ModelLoadError, match="not callable"):
        load_model("h1_factories:NOT_CALLABLE")
    with pytest.raises(ModelLoadError, match="has no attribute"):
        load_model("h1_factories:missing")
    with pytest.raises(ModelLoadError, match="cannot be imported"):
        load_model("h1_no_such_module:build")


def test_what_is_not_a_model_says_what_was_expected(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text("{}")
    cases = {
        str(tmp_path / "missing"): "no such file",
        str(tmp_path / "notes.txt"): "neither .gguf nor a config .json",
        str(tmp_path / "empty"): "no config.json",
        str(tmp_path / "noweights"): "no weights",
    }
    for spec, why in cases.items():
        with pytest.raises(ModelLoadError) as exc:
            load_model(spec)
        assert why in str(exc.value) and "package.module:factory" in str(exc.value)


def test_gguf_path_form_dispatches_to_gguf_loader(tmp_path, monkeypatch):
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    seen = {}
    monkeypatch.setattr(models, "_load_gguf", lambda path, source: seen.update(path=path, source=source))
    load_model(str(gguf))
    assert seen["path"] == gguf and seen["source"] == {"kind": "gguf", "path": str(gguf.resolve())}


def test_bad_gguf_file_is_a_clear_error(tmp_path):
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"not a gguf")
    with pytest.raises(ModelLoadError, match="could not load the GGUF file"):
        load_model(str(gguf))


@pytest.fixture(scope="module")
def smollm2():
    loaded = load_model("smollm2")
    report = moefx.find_ffns(loaded.model, loaded.example_inputs, loaded.example_kwargs, explain=True)
    return loaded, report


@pytest.mark.slow
def test_smollm2_has_30_swiglu_ffns(smollm2):
    loaded, report = smollm2
    assert loaded.source["alias"] == "smollm2" and json.dumps(loaded.source)
    matches = report.matches
    assert len(matches) == 30
    assert {(m.kind, m.d_model, m.d_ff, m.activation, m.bias1, m.bias2, m.module_exact) for m in matches} == {
        ("glu", 576, 1536, "silu", False, False, True)}
    assert [m.path for m in matches] == [f"model.layers.{i}.mlp" for i in range(30)]
    mlp = loaded.model.model.layers[7].mlp
    x = torch.randn(2, 3, 576)
    with torch.no_grad():
        torch.testing.assert_close(matches[7].dense_reference(x), mlp(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_smollm2_inspect_summary(smollm2):
    from moefx.cli_inspect import render_table, summarize

    loaded, report = smollm2
    doc = summarize(loaded.model, report)
    assert doc["num_ffns"] == 30 and doc["ffn_params"] == 30 * 3 * 576 * 1536
    assert 0.5 < doc["ffn_share"] < 0.7
    text = render_table(doc)
    assert "model.layers.29.mlp" in text and "FFN weights" in text
