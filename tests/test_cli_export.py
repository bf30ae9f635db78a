"""``moefx export``: a model holding XMoE layers, a dense baseline (config.json form), a model
saved by ``moefx convert``, and the error paths; run in-process through ``moefx.cli.main``."""
import json
import os

import onnx
import pytest
import torch

from moefx import XMoEConfig
from moefx.cli import main
from moefx.layers import XMoE

transformers = pytest.importorskip("transformers")

HIDDEN, FF = 16, 48


def _llama_config():
    return transformers.LlamaConfig(vocab_size=40, hidden_size=HIDDEN, intermediate_size=FF, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)


def tiny_xmoe_llama():
    """Factory used as MODEL ``test_cli_export:tiny_xmoe_llama``: a one-block Llama whose MLP
    is an XMoE layer (SwiGLU, threshold routing)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_llama_config()).eval()
    model.model.layers[0].mlp = XMoE(XMoEConfig(num_experts=8, threshold=0.8), HIDDEN, FF, activation="silu",
                                     glu=True, bias=False, converted=True)
    return model


def _nodes(path):
    return onnx.load(str(path)).graph.node


def test_cli_exports_model_with_xmoe_layers(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    code = main(["export", "test_cli_export:tiny_xmoe_llama", "--onnx", str(out), "--seq", "5"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert [n.op_type for n in _nodes(out) if n.domain == "com.microsoft"] == ["MoE"]
    assert "model.layers.0.mlp" in printed and "com.microsoft.MoE" in printed
    assert "verified in onnxruntime" in printed and "1x1" in printed


def test_cli_exports_dense_baseline_portable(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(_llama_config().to_dict()))
    out = tmp_path / "dense.onnx"
    code = main(["export", str(config), "--onnx", str(out), "--target", "portable", "--no-verify"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert all(n.domain in ("", "ai.onnx") for n in _nodes(out))
    assert "dense model" in printed and "not verified" in printed


def test_cli_reports_bad_model_without_writing(tmp_path, capsys):
    out = tmp_path / "x.onnx"
    code = main(["export", str(tmp_path / "missing"), "--onnx", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "cannot load" in err and "missing" in err
    assert not out.exists()


def test_cli_exports_directory_saved_by_convert(tmp_path, capsys):
    import moefx

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_llama_config()).eval()
    ids = torch.randint(0, 40, (1, 6))
    converted = moefx.convert(model, XMoEConfig(num_experts=8, threshold=0.9), (ids,))
    saved = tmp_path / "conv"
    moefx.save(converted, str(saved))
    out = tmp_path / "conv.onnx"
    code = main(["export", str(saved), "--onnx", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert sum(n.domain == "com.microsoft" for n in _nodes(out)) >= 1
    assert os.path.exists(out)


def test_bfloat16_directory_exports_with_dtype_float32(tmp_path, capsys):
    """A converted model saved in bfloat16 (a HF checkpoint loads in its own dtype) fails
    onnxruntime's CPU check with what to do; --dtype float32 exports and verifies it."""
    import moefx

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_llama_config()).eval().to(torch.bfloat16)
    converted = moefx.convert(model, XMoEConfig(num_experts=8, threshold=0.9), (torch.randint(0, 40, (1, 6)),))
    saved = tmp_path / "conv"
    moefx.save(converted, str(saved))
    out = tmp_path / "conv.onnx"
    assert main(["export", str(saved), "--onnx", str(out)]) == 1
    assert "--dtype float32" in capsys.readouterr().err and not out.exists()
    assert main(["export", str(saved), "--onnx", str(out), "--dtype", "float32"]) == 0
    printed = capsys.readouterr().out
    assert "verified in onnxruntime" in printed and sum(n.domain == "com.microsoft" for n in _nodes(out)) == 1
