"""The bundled text (moefx.data): calibration and evaluation come from disjoint standard-library
modules and share no docstring; batches hold what was asked, in order, and bad requests are
clear errors."""
import pytest
import torch

from moefx import data


class CharTokenizer:
    """One id per character: enough to check how text is cut into batches."""

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        return {"input_ids": torch.tensor([[ord(c) % 1000 for c in text]])}


def test_calibration_and_evaluation_modules_are_disjoint_and_share_no_docstring():
    assert not set(data.CALIBRATION_MODULES) & set(data.EVALUATION_MODULES)
    assert len(set(data.CALIBRATION_MODULES)) == len(data.CALIBRATION_MODULES)
    cal = {d for m in data.CALIBRATION_MODULES for d in data.module_docstrings(m)}
    ev = {d for m in data.EVALUATION_MODULES for d in data.module_docstrings(m)}
    assert len(cal) > 1000 and len(ev) > 300
    assert not cal & ev


def test_token_batches_cut_the_text_into_rows_in_order():
    tok = CharTokenizer()
    text = "abcdefghij" * 50
    out = data.token_batches(tok, num_tokens=64, seq_len=8, batch_size=3, text=text)
    assert [tuple(b.shape) for b in out] == [(3, 8), (3, 8), (2, 8)]
    flat = torch.cat([b.flatten() for b in out])
    assert flat.tolist() == [ord(c) for c in text[:64]]
    short = data.token_batches(tok, num_tokens=10_000, seq_len=8, batch_size=4, text="x" * 20)
    assert sum(b.numel() for b in short) == 16  # what the text holds, whole rows only
    with pytest.raises(ValueError, match="split must be"):
        data.token_batches(tok, split="train")
    with pytest.raises(ValueError, match="seq_len=8"):
        data.token_batches(tok, num_tokens=64, seq_len=8, text="abc")
