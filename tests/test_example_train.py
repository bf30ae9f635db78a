"""Smoke run of examples/train_slicemoe.py: a few steps, the log it promises, a falling loss."""
import importlib.util
import math
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_slicemoe.py"


def load_example():
    spec = importlib.util.spec_from_file_location("train_slicemoe_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docstring_corpus_is_deterministic_text():
    example = load_example()
    text = example.stdlib_docstrings(("json", "textwrap"))
    assert len(text) > 2000 and "JSON" in text
    assert text == example.stdlib_docstrings(("json", "textwrap"))


def test_smoke_run_logs_loss_ele_capacity_and_learns(capsys):
    example = load_example()
    threads = torch.get_num_threads()
    try:
        result = example.main(["--steps", "8", "--log-every", "4", "--batch", "8", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert [h[0] for h in result["history"]] == [1, 4, 8]
    assert "loss" in out and "ELE" in out and "capacity loss" in out and "experts balanced (ELE > 0.9)" in out
    first, last = result["history"][0][1], result["history"][-1][1]
    assert first > last and abs(first - math.log(256)) < 0.5  # starts near a uniform guess over bytes
    assert 0 < result["ele"] <= 1 and result["val_loss"] < first
