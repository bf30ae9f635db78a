"""Hypothesis-built random MLP stacks: the matcher finds exactly the FFN blocks that were built
(random widths, activations and their spellings, bias, dropout, GLU or not), and none of the
blocks whose hidden activation also feeds something outside the block."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import moefx

SPELLINGS = {
    "relu": [nn.ReLU(), torch.relu, lambda h: h.relu()],
    "gelu": [nn.GELU(), F.gelu, lambda h: 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))],
    "gelu_tanh": [nn.GELU(approximate="tanh"),
                  lambda h: 0.5 * h * (1.0 + torch.tanh(0.7978845608028654 * (h + 0.044715 * h ** 3)))],
    "silu": [nn.SiLU(), F.silu, lambda h: h * torch.sigmoid(h)],
    "quick_gelu": [lambda h: h * torch.sigmoid(1.702 * h)],
}

block_spec = st.fixed_dictionaries({
    "d_ff": st.integers(3, 24),
    "activation": st.sampled_from(sorted(SPELLINGS)),
    "spelling": st.integers(0, 2),
    "glu": st.booleans(),
    "bias1": st.booleans(),
    "bias2": st.booleans(),
    "dropout": st.sets(st.sampled_from(["pre", "mid", "post"])),
    "extra_use": st.booleans(),
})


class RandomBlock(nn.Module):
    def __init__(self, d, spec):
        super().__init__()
        self.spec = spec
        self.fc1 = nn.Linear(d, spec["d_ff"], bias=spec["bias1"])
        self.fc3 = nn.Linear(d, spec["d_ff"], bias=spec["bias1"]) if spec["glu"] else None
        self.fc2 = nn.Linear(spec["d_ff"], d, bias=spec["bias2"])
        options = SPELLINGS[spec["activation"]]
        self.act = options[spec["spelling"] % len(options)]
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        s = self.spec
        h = self.fc1(x)
        if "pre" in s["dropout"]:
            h = self.drop(h)
        h = self.act(h)
        if self.fc3 is not None:
            h = h * self.fc3(x)
        if "mid" in s["dropout"]:
            h = self.drop(h)
        y = self.fc2(h)
        if "post" in s["dropout"]:
            y = self.drop(y)
        if s["extra_use"]:
            y = y + h.mean(-1, keepdim=True)
        return y


class Stack(nn.Module):
    def __init__(self, d, specs):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.blocks = nn.ModuleList(RandomBlock(d, s) for s in specs)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(self.norm(x))
        return x


@settings(max_examples=12)
@given(d=st.integers(2, 16), specs=st.lists(block_spec, min_size=1, max_size=3))
def test_random_mlp_stacks_find_exactly_the_built_ffns(d, specs):
    model = Stack(d, specs).eval()
    report = moefx.find_ffns(model, (torch.randn(2, 3, d),), explain=True)
    expected = [(f"blocks.{i}", s) for i, s in enumerate(specs) if not s["extra_use"]]
    assert [m.path for m in report.matches] == [p for p, _ in expected], str(report)
    for m, (path, s) in zip(report.matches, expected):
        assert m.module_exact
        assert (m.kind, m.activation, m.d_model, m.d_ff) == (
            "glu" if s["glu"] else "mlp", s["activation"], d, s["d_ff"])
        assert (m.bias1, m.bias2) == (s["bias1"], s["bias2"])
        x = torch.randn(4, d)
        with torch.no_grad():
            torch.testing.assert_close(m.dense_reference(x), model.get_submodule(path)(x),
                                       rtol=1e-5, atol=1e-6)
    n_reused = sum(s["extra_use"] for s in specs)
    reused = [r for r in report.rejected if "also used" in r.reason]
    assert len(reused) == n_reused
