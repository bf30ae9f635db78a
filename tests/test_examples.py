"""The quickstart example a user copies from runs end to end: find, convert, calibrate,
save/load, generate, and ONNX export verified in onnxruntime."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs_end_to_end(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.count("found glu FFN at model.layers.") == 2
    assert "verified in onnxruntime" in out
    assert (tmp_path / "tiny-xmoe" / "recipe.json").is_file()
    assert (tmp_path / "tiny-xmoe.onnx").is_file()
