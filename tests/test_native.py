"""The native CPU GELU (moefx.kernels.native): accuracy against the float64 GELU, when it applies
and when it must not, its build cache, and the fallback when it cannot be built."""
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import moefx.kernels  # noqa: F401
from moefx.config import SliceMoEConfig
from moefx.kernels import cpu, native
from moefx.layers import SliceMoE

needs_native = pytest.mark.skipif(
    not sys.platform.startswith("linux") or native._compiler() is None or os.environ.get("MOEFX_NATIVE") == "0",
    reason="the native kernels need Linux and a C compiler",
)


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """A private cache directory and a forgotten library, restored afterwards."""
    saved = dict(native._state)
    native._state.clear()
    monkeypatch.setenv("MOEFX_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("MOEFX_NATIVE", raising=False)
    yield tmp_path
    native._state.clear()
    native._state.update(saved)


@needs_native
def test_gelu_matches_float64_gelu_on_fresh_inputs():
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    x = torch.randn(257, 301, generator=g) * torch.tensor([0.1, 1.0, 4.0, 30.0]).repeat_interleave(76)[:301]
    want = F.gelu(x.double())
    got = x.clone()
    assert native.gelu_(got)
    # |erf error| <= 4e-7 in float32, so |error| <= 0.5 |x| 4e-7 plus float32 rounding of the result
    bound = 2.5e-7 * x.double().abs() + 1e-7 * want.abs() + 1e-30
    assert ((got.double() - want).abs() <= bound).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@needs_native
def test_gelu_special_values_and_threads_agree():
    x = torch.randn(70000)
    x[:6] = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, -0.0, 1e-30])
    one, two = x.clone(), x.clone()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert native.gelu_(one)
        torch.set_num_threads(2)
        assert native.gelu_(two)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[2:].isnan(), two[2:].isnan())
    torch.testing.assert_close(one, two, rtol=0, atol=0, equal_nan=True)
    assert one[0] == float("inf") and one[2].isnan() and one[3] == 0 and abs(one[5].item()) < 1e-29
    assert one[1].isnan() == F.gelu(torch.tensor(float("-inf"))).isnan()  # same as ATen


def test_gelu_declines_what_it_must_not_touch(monkeypatch):
    base = torch.randn(64, 128)
    cases = {
        "float64": base.double(),
        "non-contiguous": base.t(),
        "small": torch.randn(8, 8),
        "grad": base.clone().requires_grad_(),
    }
    for name, z in cases.items():
        before = z.detach().clone()
        assert not native.gelu_(z), name
        assert torch.equal(z.detach(), before), name
    monkeypatch.setenv("MOEFX_NATIVE", "0")
    z = base.clone()
    assert not native.gelu_(z) and torch.equal(z, base)
    assert "off" in native.status()


@needs_native
def test_build_is_cached_and_atomic(fresh_native):
    assert native.gelu_(torch.randn(64, 128))
    built = sorted(p.name for p in (fresh_native / "native").iterdir())
    assert len(built) == 1 and built[0].startswith("moefx_cpu-") and built[0].endswith(".so")
    mtime = (fresh_native / "native" / built[0]).stat().st_mtime_ns
    native._state.clear()
    assert native.gelu_(torch.randn(64, 128))
    assert sorted(p.name for p in (fresh_native / "native").iterdir()) == built  # no temporary left behind
    assert (fresh_native / "native" / built[0]).stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert built[0] in native.status()


def test_without_a_compiler_the_ops_fall_back_to_aten(fresh_native, monkeypatch):
    monkeypatch.setattr(native, "_compiler", lambda: None)
    z = torch.randn(64, 128)
    assert not native.gelu_(z)
    assert "no C compiler" in native.status()
    want = F.gelu(z.double())
    got = cpu.activation_("gelu", z.clone())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_a_failing_compiler_falls_back(fresh_native, monkeypatch, tmp_path):
    bad = tmp_path / "cc"
    bad.write_text("#!/bin/sh\necho 'cc: broken' >&2\nexit 1\n")
    bad.chmod(0o755)
    monkeypatch.setattr(native, "_compiler", lambda: str(bad))
    assert not native.gelu_(torch.randn(64, 128))
    assert "broken" in native.status()
    assert not any(p.name.endswith(".so") for p in (fresh_native / "native").iterdir())


def test_slicemoe_with_and_without_native_gelu_agree(monkeypatch):
    torch.manual_seed(0)
    layer = SliceMoE(SliceMoEConfig(num_slices=4, num_experts=4, top_k=2), d_model=64, d_ff=256).eval()
    x = torch.randn(300, 64)
    used = []
    real = native.gelu_
    monkeypatch.setattr(native, "gelu_", lambda z: used.append(real(z)) or used[-1])
    with torch.no_grad():
        fast = layer(x)
        monkeypatch.setenv("MOEFX_NATIVE", "0")
        slow = layer(x)
    if native._state.get("lib") is not None:
        assert any(used[: len(used) // 2])  # the first call took the native kernel
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
