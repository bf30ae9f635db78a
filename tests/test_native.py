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
from test_ops import expert_weights, routing

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
    """Where the fused expert MLP declines, PyTorch's path runs the native GELU."""
    torch.manual_seed(0)
    layer = SliceMoE(SliceMoEConfig(num_slices=4, num_experts=4, top_k=2), d_model=64, d_ff=256).eval()
    x = torch.randn(300, 64)
    used = []
    real = native.gelu_
    monkeypatch.setattr(native, "expert_mlp", lambda *args: None)
    monkeypatch.setattr(native, "gelu_", lambda z: used.append(real(z)) or used[-1])
    with torch.no_grad():
        fast = layer(x)
        monkeypatch.setenv("MOEFX_NATIVE", "0")
        slow = layer(x)
    if native._state.get("lib") is not None:
        assert any(used[: len(used) // 2])  # the first call took the native kernel
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- the fused expert MLP


def _expert_case(N, d, E, h, K, glu, bias, seed):
    """test_ops' weights and routing (float64), with more holes: every fifth row's last slot is
    unused, and the last expert is reached by second choices only."""
    p = expert_weights(E, h, d, glu, bias, seed=seed)
    idx, weight = routing(N, E, K, seed=seed)
    idx[::5, -1] = -1
    weight[::5, -1] = 0
    idx[:, 0][idx[:, 0] == E - 1] = 0
    return torch.randn(N, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), idx, weight, p


def _spy_expert_mlp(monkeypatch):
    taken = []
    real = native.expert_mlp

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(native, "expert_mlp", spy)
    return taken


@needs_native
@pytest.mark.parametrize("activation", ["gelu", "silu", "relu", "gelu_tanh", "quick_gelu", "relu2", "identity"])
@pytest.mark.parametrize("glu, bias, gate_input", [(False, True, True), (True, True, False), (False, False, False),
                                                   (True, False, True)])
def test_expert_mlp_matches_float64_reference(activation, glu, bias, gate_input, monkeypatch):
    """The fused kernel through moe_ffn, on shapes with partial tiles everywhere (rows per expert
    not a multiple of 16 or 48, h not a multiple of 6, an odd d), against SPEC §3's float64
    reference on fresh inputs."""
    from moefx.kernels import reference as R

    taken = _spy_expert_mlp(monkeypatch)
    x, idx, weight, p = _expert_case(N=203, d=13, E=5, h=29, K=2, glu=glu, bias=bias,
                                     seed=int.from_bytes(os.urandom(4), "little"))
    f32 = {k: None if v is None else v.float() for k, v in p.items()}
    got = cpu.moe_ffn(x.float(), idx, weight.float(), f32["w1"], f32["b1"], f32["w3"], f32["b3"], f32["w2"],
                      f32["b2"], activation, gate_input)
    want = R.moe_ffn_reference(x, idx, weight, p["w1"], p["b1"], p["w3"], p["b3"], p["w2"], p["b2"], activation,
                               gate_input)
    assert taken == [True]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@needs_native
def test_expert_mlp_reads_strided_rows_and_threads_agree_bitwise():
    """x may be a view whose rows are further apart than d (SliceMoE's slices of a wider
    tensor); one thread and two give the same bits (each block is computed the same way
    whichever thread takes it)."""
    x, idx, weight, p = _expert_case(N=700, d=24, E=4, h=40, K=2, glu=False, bias=True, seed=3)
    wide = torch.randn(700, 40)
    wide[:, 8:32] = x.float()
    view = wide[:, 8:32]
    assert not view.is_contiguous()
    f32 = {k: None if v is None else v.float() for k, v in p.items()}
    args = (idx, weight.float(), f32["w1"], f32["b1"], None, None, f32["w2"], f32["b2"], "gelu", False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu.moe_ffn(view, *args)
        torch.set_num_threads(2)
        two = cpu.moe_ffn(view, *args)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    torch.testing.assert_close(one, cpu.moe_ffn(view.contiguous().double(), idx, weight, p["w1"], p["b1"], None, None,
                                                p["w2"], p["b2"], "gelu", False).float(), rtol=1e-5, atol=1e-5)


def test_expert_mlp_declines_what_it_cannot_read(monkeypatch):
    x, idx, weight, p = _expert_case(N=64, d=8, E=3, h=10, K=2, glu=False, bias=True, seed=4)
    f32 = {k: None if v is None else v.float() for k, v in p.items()}
    groups = cpu.group_by_expert(idx, 3)

    def attempt(x=x.float(), w1=f32["w1"], activation="gelu", gate=None):
        return native.expert_mlp(x, groups.rows, groups.counts, gate, False, w1, f32["b1"], None, None, f32["w2"],
                                 f32["b2"], activation)

    assert attempt(x=x) is None  # float64
    assert attempt(w1=f32["w1"].transpose(1, 2).contiguous().transpose(1, 2)) is None  # non-contiguous weights
    assert attempt(x=x.float().t().contiguous().t()) is None  # columns not adjacent
    assert attempt(activation="tanh") is None  # not one of moefx's
    assert attempt(gate=torch.ones(groups.rows.numel(), dtype=torch.float64)) is None
    monkeypatch.setenv("MOEFX_NATIVE", "0")
    assert attempt() is None


@needs_native
def test_slicemoe_layer_same_with_and_without_native_kernels(monkeypatch):
    """A SliceMoE layer on the native kernels and on PyTorch's ops alone agree, and both match
    the layer's float64 reference."""
    from moefx.kernels.reference import slicemoe_reference

    torch.manual_seed(int.from_bytes(os.urandom(4), "little") % 2**31)
    layer = SliceMoE(SliceMoEConfig(num_slices=4, num_experts=6, top_k=2, router_hidden=16), d_model=32, d_ff=96,
                     activation="silu", glu=True).eval()
    x = torch.randn(3, 90, 32)
    taken = _spy_expert_mlp(monkeypatch)
    with torch.no_grad():
        fast = layer(x)
        monkeypatch.setenv("MOEFX_NATIVE", "0")
        plain = layer(x)
        want = slicemoe_reference(layer.double(), x.double())
    assert taken == [True, False]
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.double(), want, rtol=1e-5, atol=1e-5)
