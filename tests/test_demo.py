"""`moefx demo` in its fast smoke form: a tiny config-only model through the whole pipeline."""

from moefx.cli import main


def test_demo_smoke_prints_perplexities_and_summary(tmp_path, capsys):
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=16, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=64, max_position_embeddings=64)
    cfg.save_pretrained(tmp_path)
    code = main(["demo", "--model", str(tmp_path / "config.json"), "--experts", "4", "--shared", "1",
                 "--calib-tokens", "128", "--eval-tokens", "64", "--seq-len", "32", "--ratio", "0.6"])
    assert code == 0
    out = capsys.readouterr().out
    assert "dense perplexity:" in out and "total: 2 layers converted" in out
    assert "distillation: 32 steps" in out
    line = [l for l in out.splitlines() if l.startswith("XMoE (activation")][0]
    act = float(line.split("activation ")[1].split(")")[0])
    assert 0.4 < act < 0.8
