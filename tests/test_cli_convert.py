"""`moefx convert`: end to end on a config-only tiny model, summary table, refusals."""
import json
import os

import pytest

from moefx.cli import main


@pytest.fixture()
def tiny_config(tmp_path):
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=16, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=64, max_position_embeddings=32)
    cfg.save_pretrained(tmp_path / "cfg")
    return str(tmp_path / "cfg" / "config.json")


def test_convert_xmoe_with_calibration_writes_a_loadable_model(tiny_config, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["convert", tiny_config, "--to", "xmoe", "--experts", "4", "--shared", "1",
                 "--calibrate-tokens", "64", "--target-ratio", "0.6", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "total: 2 layers converted" in text and "FLOPs/tok moe" in text and "rel err" in text
    recipe = json.load(open(out / "recipe.json"))
    assert recipe["layers"][0]["config"]["router"] == "fitted"
    import moefx

    model = moefx.load(str(out))
    assert type(model.model.layers[1].mlp).__name__ == "XMoE"


def test_convert_refuses_existing_dir_without_force(tiny_config, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    assert main(["convert", tiny_config, "--to", "slicemoe", "--slices", "4", "--out", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert os.listdir(out) == []
    assert main(["convert", tiny_config, "--to", "slicemoe", "--slices", "4", "--out", str(out), "--force"]) == 0
    assert (out / "recipe.json").exists()


def test_slices_not_dividing_d_model_is_a_clear_error(tiny_config, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["convert", tiny_config, "--to", "slicemoe", "--slices", "5", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "num_slices=5 does not divide d_model=16" in err and "model.layers.0.mlp" in err
    assert not out.exists()


def test_threshold_out_of_range_is_refused(tiny_config, tmp_path, capsys):
    assert main(["convert", tiny_config, "--to", "xmoe", "--threshold", "1.5", "--out", str(tmp_path / "o")]) == 2
    assert "threshold must be a number in [0, 1]" in capsys.readouterr().err


def test_model_without_ffn_writes_nothing(tmp_path, capsys, monkeypatch):
    mod = tmp_path / "noffn_models.py"
    mod.write_text("import torch\ndef build():\n    return torch.nn.Sequential(torch.nn.Linear(8, 3)), (torch.randn(2, 8),)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    assert main(["convert", "noffn_models:build", "--to", "xmoe", "--out", str(out)]) == 1
    assert "no dense FFN block found" in capsys.readouterr().err
    assert not out.exists()


def test_convert_with_distillation_reports_it_and_needs_calibration(tiny_config, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["convert", tiny_config, "--to", "xmoe", "--experts", "4", "--distill-steps", "3",
                 "--out", str(out)]) == 2
    assert "--distill-steps needs --calibrate-tokens" in capsys.readouterr().err
    assert not out.exists()
    code = main(["convert", tiny_config, "--to", "xmoe", "--experts", "4", "--calibrate-tokens", "64",
                 "--target-ratio", "0.6", "--distill-steps", "3", "--out", str(out)])
    assert code == 0
    assert "distillation: 3 steps on" in capsys.readouterr().out
    assert (out / "recipe.json").exists()


def test_convert_passes_distill_train_through(tiny_config, tmp_path, capsys, monkeypatch):
    import sys

    conv = sys.modules["moefx.convert"]  # the package (moefx.convert the attribute is the function)
    seen = []
    real = conv.calibrate
    monkeypatch.setattr(conv, "calibrate", lambda *a, **kw: seen.append((kw.get("distill_train"), kw.get("distill_labels"),
                                                                     kw.get("distill_router_lr"), kw.get("distill_precision")))
                        or real(*a, **kw))
    out = tmp_path / "out"
    assert main(["convert", tiny_config, "--to", "xmoe", "--experts", "4", "--calibrate-tokens", "64",
                 "--distill-steps", "2", "--distill-train", "blocks-down", "--distill-labels", "0.2", "--distill-router-lr", "1e-3",
                 "--distill-precision", "bfloat16", "--out", str(out)]) == 0
    assert seen == [("blocks-down", 0.2, 1e-3, "bfloat16")] and "distillation: 2 steps on" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["convert", tiny_config, "--to", "xmoe", "--distill-labels", "1.5", "--out", str(tmp_path / "o3")])
    assert "'1.5' is not a weight in [0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "o3").exists()
    with pytest.raises(SystemExit):
        main(["convert", tiny_config, "--to", "xmoe", "--distill-router-lr", "-1", "--out", str(tmp_path / "o4")])
    assert "'-1' is not a learning rate" in capsys.readouterr().err
    assert not (tmp_path / "o4").exists()
    with pytest.raises(SystemExit):
        main(["convert", tiny_config, "--to", "xmoe", "--distill-train", "embeddings", "--out", str(tmp_path / "o2")])
    assert "invalid choice: 'embeddings'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["convert", tiny_config, "--to", "xmoe", "--distill-precision", "fp16", "--out", str(tmp_path / "o5")])
    assert "invalid choice: 'fp16'" in capsys.readouterr().err


def test_converting_a_saved_moefx_directory_points_to_its_dense_source(tiny_config, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["convert", tiny_config, "--to", "xmoe", "--experts", "4", "--out", str(out)]) == 0
    capsys.readouterr()
    for command in (["convert", str(out), "--to", "xmoe", "--out", str(tmp_path / "again")], ["inspect", str(out)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "already converted and saved by moefx" in err and "moefx export DIR" in err
        assert os.path.abspath(tiny_config) in err
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("mode", ["inverse", "model"])
def test_convert_spreads_budgets_over_layers_and_caps_time(mode, tiny_config, tmp_path, capsys, monkeypatch):
    """--budgets inverse / model spread --target-ratio over the layers (inverse: different ratios;
    model: its allocation may split evenly on a tiny model, so only the mean is asserted);
    --time-budget reaches calibrate as its budget_seconds."""
    import sys

    conv = sys.modules["moefx.convert"]
    seen = []
    real = conv.calibrate
    monkeypatch.setattr(conv, "calibrate", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    out = tmp_path / "out"
    assert main(["convert", tiny_config, "--to", "xmoe", "--experts", "8", "--calibrate-tokens", "256",
                 "--target-ratio", "0.6", "--budgets", mode, "--time-budget", "120", "--out", str(out)]) == 0
    assert seen[0]["budgets"] == mode and seen[0]["budget_seconds"] == 120
    text = capsys.readouterr().out
    summary = text[text.index("params dense"):].splitlines()
    # summary columns: layer, kind, params dense, params moe, FLOPs dense, FLOPs moe, act, rel err, cos
    acts = [float(line.split()[6]) for line in summary if line.startswith("model.layers.")]
    assert len(acts) == 2 and sum(acts) / 2 == pytest.approx(0.6, abs=0.02)
    assert mode != "inverse" or acts[0] != acts[1]
    assert main(["convert", tiny_config, "--to", "xmoe", "--calibrate-tokens", "64", "--budgets", mode,
                 "--out", str(tmp_path / "o2")]) == 2
    assert "--budgets spreads --target-ratio" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def test_convert_dtype_casts_the_model_before_converting(tiny_config, tmp_path, capsys):
    import torch

    import moefx

    out = tmp_path / "out"
    assert main(["convert", tiny_config, "--to", "xmoe", "--experts", "4", "--calibrate-tokens", "64",
                 "--dtype", "bfloat16", "--out", str(out)]) == 0
    assert "(bfloat16)" in capsys.readouterr().out
    model = moefx.load(str(out))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
