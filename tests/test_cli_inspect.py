"""``moefx inspect``: the table, --json, --explain, no-FFN and not-a-model exits, --help."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from moefx.cli import main

import zoo


@pytest.fixture(scope="module")
def llama_config(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    zoo.llama()[0].config.to_json_file(str(d / "config.json"))
    return d / "config.json"


@pytest.fixture
def factories(tmp_path, monkeypatch):
    (tmp_path / "h1_cli_factories.py").write_text(textwrap.dedent("""
        import sys, torch, torch.nn as nn
        sys.path.insert(0, %r)
        import zoo
        def no_ffn():
            return nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), (torch.randn(2, 4),)
        def classifier():
            model, args, kwargs = zoo.bert_classifier()
            return model, args, kwargs
    """ % str(Path(__file__).parent)))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "h1_cli_factories"


def test_table_lists_each_ffn_and_the_share(llama_config, capsys):
    assert main(["inspect", str(llama_config)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["path", "kind", "d_model", "d_ff", "activation", "params", "FLOPs/token"]
    rows = [line.split() for line in lines if line.startswith("model.layers.")]
    assert rows == [[f"model.layers.{i}.mlp", "glu", "16", "40", "silu", "1.92k", "3.84k"]
                    for i in range(zoo.LAYERS)]
    assert "2 FFN blocks in LlamaForCausalLM" in out and "%) are FFN weights" in out


def test_json_output(llama_config, capsys):
    assert main(["inspect", str(llama_config), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [f["path"] for f in doc["ffns"]] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    f = doc["ffns"][0]
    assert (f["kind"], f["d_model"], f["d_ff"], f["activation"]) == ("glu", 16, 40, "silu")
    assert f["params"] == 3 * 16 * 40 and f["flops_per_token"] == 2 * 3 * 16 * 40
    assert doc["ffn_params"] == 2 * 3 * 16 * 40 and 0 < doc["ffn_share"] < 1
    assert doc["source"]["kind"] == "config"


def test_model_without_ffn_says_so_and_exits_0(factories, capsys):
    assert main(["inspect", f"{factories}:no_ffn"]) == 0
    assert "no dense FFN block found" in capsys.readouterr().out
    assert main(["inspect", f"{factories}:no_ffn", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ffns"] == []


def test_explain_lists_rejected_near_matches(factories, capsys):
    assert main(["inspect", f"{factories}:classifier", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "near-matches that are not FFNs" in out and "tanh" in out


def test_not_a_model_exits_nonzero_with_what_was_expected(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nothing-here")]) == 2
    err = capsys.readouterr().err
    assert "is not a model" in err and "config.json" in err and "package.module:factory" in err


def test_help_teaches_model_forms(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["inspect", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for form in ("hf_model_dir", ".gguf", "config.json", "package.module:factory", "smollm2", "--json"):
        assert form in out


def test_console_script_subprocess(llama_config):
    script = Path(sys.executable).parent / "moefx"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "moefx.cli"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(cmd + ["inspect", str(llama_config), "--json"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["ffns"]) == zoo.LAYERS
