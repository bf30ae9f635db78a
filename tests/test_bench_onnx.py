"""bench/onnx.py's report: each block of single-layer rows is compared with its own dense rows,
and the target verdict covers every expert count and every ort variant benchmarked."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_onnx", ROOT / "bench" / "onnx.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def row(experts, name, target, latency_ms, shape="1x128"):
    tokens = 128
    return dict(part="layer", d=576, d_ff=1536, experts=experts, name=name, target=target,
                active=1.0 if name.startswith("dense") else 0.25, shape=shape, tokens=tokens,
                latency_ms=latency_ms, tok_s=tokens / latency_ms * 1e3, runs=3, contrib=0)


def test_each_expert_count_is_compared_with_its_own_dense_rows(tmp_path):
    bench = load_bench()
    rows = [row(4, "dense FFN", "portable", 4.0), row(4, "XMoE top-1/4 [ort]", "ort", 1.6),
            row(8, "dense FFN", "portable", 5.0), row(8, "XMoE top-2/8 [ort]", "ort", 2.0)]
    out = tmp_path / "r.md"
    bench.write_markdown(out, rows, [], dict(date="d", machine="m", ort="1", onnx="1", load_start="0", load_end="0"))
    text = out.read_text()
    assert "## Single layer, d=576, d_ff=1536 (SwiGLU), 4 experts x 384" in text
    assert "## Single layer, d=576, d_ff=1536 (SwiGLU), 8 experts x 192" in text
    # 4.0 / 1.6 and 5.0 / 2.0: each against its own block's dense row, not the last one seen
    assert "| XMoE top-1/4 [ort] | 25% | 1x128 | 1.60 | 80000 | 2.50x |" in text
    assert "| XMoE top-2/8 [ort] | 25% | 1x128 | 2.00 | 64000 | 2.50x |" in text
    assert "met (E=4 top-1/4 [ort] 1x128: 2.50x, E=8 top-2/8 [ort] 1x128: 2.50x)" in text and "NOT met" not in text
    rows[3] = row(8, "XMoE top-2/8 [ort]", "ort", 3.0)  # 5.0 / 3.0 = 1.67x: one miss fails the target
    bench.write_markdown(out, rows, [], dict(date="d", machine="m", ort="1", onnx="1", load_start="0", load_end="0"))
    assert "NOT met (E=4 top-1/4 [ort] 1x128: 2.50x, E=8 top-2/8 [ort] 1x128: 1.67x)" in out.read_text()
    # threshold rows of the ort form count too; portable rows never do
    rows[3] = row(8, "XMoE top-2/8 [ort]", "ort", 2.0)
    rows += [row(8, "XMoE threshold t=0.7 [ort]", "ort", 2.6), row(8, "XMoE threshold t=0.7 [portable]", "portable", 9.0)]
    bench.write_markdown(out, rows, [], dict(date="d", machine="m", ort="1", onnx="1", load_start="0", load_end="0"))
    text = out.read_text()
    assert "NOT met (" in text and "E=8 threshold t=0.7 [ort] 1x128: 1.92x" in text and "[portable] 1x128" not in text
    assert not list(tmp_path.glob("*.tmp"))  # written through a temporary file, renamed
