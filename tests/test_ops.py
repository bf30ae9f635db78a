"""The torch.library ops against the loop references (SPEC §3), opcheck, gradcheck, edge cases."""
import pytest
import torch

import moefx.kernels  # noqa: F401
from moefx.config import ACTIVATIONS
from moefx.kernels import cpu
from moefx.kernels import reference as R

ops = torch.ops.moefx
SMOKE = ("test_schema", "test_autograd_registration", "test_faketensor")


def random_probs(T, E, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(T, E, generator=g, dtype=torch.float64) * 2, -1).to(dtype)


def expert_weights(E, h, d, glu, bias, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) / shape[-1] ** 0.5).to(dtype)

    return dict(
        w1=rnd(E, h, d), b1=rnd(E, h) if bias else None, w3=rnd(E, h, d) if glu else None,
        b3=rnd(E, h) if glu and bias else None, w2=rnd(E, d, h), b2=rnd(E, d) if bias else None,
    )


def routing(T, E, K, seed=0, dtype=torch.float64, holes=True):
    probs = random_probs(T, E, dtype, seed)
    idx, weight = R.xmoe_select_reference(probs, 0.0, K, 0)
    if holes and T > 1:
        idx[1, -1] = -1
        weight[1, -1] = 0
        idx[0, :] = -1
        weight[0, :] = 0
    return idx, weight


def call(fn, x, idx, weight, p, activation, gate_input):
    return fn(x, idx, weight, p["w1"], p["b1"], p["w3"], p["b3"], p["w2"], p["b2"], activation, gate_input)


@pytest.mark.parametrize("threshold, top_k, max_experts", [(0.0, 0, 0), (0.6, 0, 0), (0.9, 0, 3), (1.0, 0, 0), (0.0, 2, 0), (0.5, 5, 0)])
def test_xmoe_select_matches_reference(threshold, top_k, max_experts):
    probs = random_probs(37, 5)
    got = ops.xmoe_select(probs, threshold, top_k, max_experts)
    want = R.xmoe_select_reference(probs, threshold, top_k, max_experts)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("capacity", [0, 1, 3, 8, 100])
def test_capacity_drop_matches_reference(capacity):
    idx, weight = R.xmoe_select_reference(random_probs(29, 6, seed=3), 0.8, 0, 4)
    got = ops.capacity_drop(idx, weight, 6, capacity)
    want = R.capacity_drop_reference(idx, weight, 6, capacity)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert (torch.bincount(got[0][got[0] >= 0], minlength=6) <= capacity).all()


REGIMES = {  # name: (rows, slots, ALL_EXPERTS_MAX_ROWS) so that each CPU code path runs
    "pairs": (2, 2, 256),
    "all-experts": (11, 3, 10**9),
    "grouped": (11, 3, 0),
}


@pytest.fixture(params=sorted(REGIMES))
def regime(request, monkeypatch):
    T, K, limit = REGIMES[request.param]
    monkeypatch.setattr(cpu, "ALL_EXPERTS_MAX_ROWS", limit)
    monkeypatch.setattr(cpu, "CHUNK_ROWS", 4)  # several chunks per expert in the grouped path
    return T, K


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("glu, bias, gate_input", [(False, True, False), (True, False, True), (True, True, False), (False, False, True)])
def test_moe_ffn_matches_reference_float64(activation, glu, bias, gate_input, regime):
    T, K = regime
    E, h, d = 5, 6, 8
    p = expert_weights(E, h, d, glu, bias)
    idx, weight = routing(T, E, K)
    x = torch.randn(T, d, dtype=torch.float64)
    got = call(ops.moe_ffn, x, idx, weight, p, activation, gate_input)
    want = call(R.moe_ffn_reference, x, idx, weight, p, activation, gate_input)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert (got[0] == 0).all()
    unit = (idx >= 0).to(torch.float64)
    got = call(ops.moe_ffn, x, idx, unit, p, activation, gate_input)
    torch.testing.assert_close(got, call(R.moe_ffn_reference, x, idx, unit, p, activation, gate_input), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gate_input", [False, True])
def test_unused_slots_do_not_mask_expert_zero(gate_input, regime):
    """A -1 slot must not cancel a real choice of expert 0 in the same row (all paths)."""
    T, K = regime
    E, h, d = 5, 6, 8
    p = expert_weights(E, h, d, False, True)
    idx = torch.full((T, K), -1)
    idx[:, 0] = 0
    idx[-1, -1] = 3 if K > 1 else 0
    weight = torch.where(idx >= 0, torch.rand(T, K, dtype=torch.float64) + 0.1, torch.zeros(T, K, dtype=torch.float64))
    x = torch.randn(T, d, dtype=torch.float64)
    got = call(ops.moe_ffn, x, idx, weight, p, "gelu", gate_input)
    torch.testing.assert_close(got, call(R.moe_ffn_reference, x, idx, weight, p, "gelu", gate_input))


def test_regime_shapes_pick_the_intended_path(monkeypatch):
    seen = []
    for name in ("_moe_ffn_pairs", "_moe_ffn_all_experts"):
        real = getattr(cpu, name)
        monkeypatch.setattr(cpu, name, lambda *a, _real=real, _name=name: seen.append(_name) or _real(*a))
    p = expert_weights(16, 4, 8, False, True)
    for T, K in [(1, 4), (16, 4), (64, 2)]:
        idx, weight = routing(T, 16, K, holes=False)
        call(ops.moe_ffn, torch.randn(T, 8, dtype=torch.float64), idx, weight, p, "gelu", False)
    assert seen == ["_moe_ffn_pairs", "_moe_ffn_all_experts"]


def assert_float32_within_spec(reference, x, idx, weight, p64, gate_input):
    """``moefx::moe_ffn`` in float32 against ``reference`` in float64, to SPEC §3's tolerance."""
    want = call(reference, x, idx, weight, p64, "gelu", gate_input)
    p32 = {k: v.float() if v is not None else None for k, v in p64.items()}
    got = call(ops.moe_ffn, x.float(), idx, weight.float(), p32, "gelu", gate_input)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gate_input", [False, True])
def test_moe_ffn_float32_within_spec_tolerance(gate_input):
    T, E, h, d, K = 64, 8, 16, 24, 4
    p64 = expert_weights(E, h, d, True, True)
    idx, weight = routing(T, E, K, seed=4)
    assert_float32_within_spec(ops.moe_ffn, torch.randn(T, d, dtype=torch.float64), idx, weight, p64, gate_input)


def test_moe_ffn_unit_weights_and_float32_weights_with_float64_x():
    T, E, h, d, K = 9, 4, 5, 6, 2
    p = expert_weights(E, h, d, False, True)
    idx, _ = routing(T, E, K, seed=5)
    unit = (idx >= 0).to(torch.float32)
    x = torch.randn(T, d, dtype=torch.float64)
    got = call(ops.moe_ffn, x, idx, unit, p, "relu", False)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, call(R.moe_ffn_reference, x, idx, unit, p, "relu", False))


def test_zero_rows_and_all_skipped():
    p = expert_weights(3, 4, 5, True, True)
    x = torch.randn(0, 5, dtype=torch.float64)
    idx = torch.zeros(0, 2, dtype=torch.long)
    assert call(ops.moe_ffn, x, idx, torch.zeros(0, 2, dtype=torch.float64), p, "gelu", False).shape == (0, 5)
    sel = ops.xmoe_select(torch.zeros(0, 3), 0.5, 0, 0)
    assert sel[0].shape == (0, 3)
    assert ops.capacity_drop(sel[0], sel[1], 3, 4)[0].shape == (0, 3)
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    idx = torch.full((4, 2), -1)
    y = call(ops.moe_ffn, x, idx, torch.zeros(4, 2, dtype=torch.float64), p, "gelu", True)
    assert (y == 0).all()
    y.sum().backward()
    assert (x.grad == 0).all()


@pytest.mark.parametrize("gate_input, glu, activation", [(False, True, "gelu"), (True, False, "quick_gelu"), (True, True, "gelu_tanh"), (False, False, "silu"), (False, True, "relu2")])
def test_moe_ffn_gradcheck(gate_input, glu, activation):
    T, E, h, d, K = 6, 3, 4, 5, 2
    p = expert_weights(E, h, d, glu, True)
    idx, weight = routing(T, E, K, seed=6)
    x = torch.randn(T, d, dtype=torch.float64, requires_grad=True)
    weight = weight.clone().requires_grad_()
    leaves = [x, weight] + [p[k].requires_grad_() for k in ("w1", "b1", "w3", "b3", "w2", "b2") if p[k] is not None]

    def f(*args):
        return call(ops.moe_ffn, x, idx, weight, p, activation, gate_input)

    assert torch.autograd.gradcheck(f, tuple(leaves))


def test_routing_ops_gradcheck():
    probs = random_probs(8, 5).requires_grad_()
    assert torch.autograd.gradcheck(lambda q: ops.xmoe_select(q, 0.7, 0, 3)[1], (probs,))
    assert torch.autograd.gradcheck(lambda q: ops.xmoe_select(q, 0.0, 2, 0)[1], (probs,))
    idx, weight = R.xmoe_select_reference(probs.detach(), 0.9, 0, 0)
    weight.requires_grad_()
    assert torch.autograd.gradcheck(lambda w: ops.capacity_drop(idx, w, 5, 2)[1], (weight,))


@pytest.mark.parametrize("gate_input", [False, True])
def test_opcheck_moe_ffn(gate_input):
    T, E, h, d, K = 7, 4, 3, 6, 2
    p = expert_weights(E, h, d, True, True, dtype=torch.float32)
    idx, weight = routing(T, E, K, seed=7, dtype=torch.float32)
    args = (torch.randn(T, d, requires_grad=True), idx, weight.requires_grad_(), *[
        p[k].requires_grad_() for k in ("w1", "b1", "w3", "b3", "w2", "b2")
    ], "silu", gate_input)
    torch.library.opcheck(ops.moe_ffn.default, args)
    grad = torch.randn(T, d)
    torch.library.opcheck(ops.moe_ffn_backward.default, (grad, *[a.detach() if isinstance(a, torch.Tensor) else a for a in args]))


def test_opcheck_routing_ops():
    probs = random_probs(9, 6, dtype=torch.float32)
    for args in [(probs, 0.8, 0, 0), (probs, 0.5, 0, 2), (probs, 0.0, 3, 0)]:
        torch.library.opcheck(ops.xmoe_select.default, args)
        # opcheck's aot test sums all outputs into the first (an int64 idx): autograd only here.
        torch.library.opcheck(ops.xmoe_select.default, (args[0].clone().requires_grad_(), *args[1:]), test_utils=SMOKE)
    idx, weight = ops.xmoe_select(probs, 0.9, 0, 0)
    torch.library.opcheck(ops.capacity_drop.default, (idx, weight, 6, 2))
    torch.library.opcheck(ops.capacity_drop.default, (idx, weight.clone().requires_grad_(), 6, 2), test_utils=SMOKE)


def test_bad_arguments_say_what_is_wrong():
    p = expert_weights(3, 4, 5, False, True, dtype=torch.float32)
    x = torch.randn(2, 5)
    idx = torch.zeros(2, 1, dtype=torch.long)
    w = torch.ones(2, 1)
    with pytest.raises(RuntimeError, match="x must be"):
        call(ops.moe_ffn, x[0], idx, w, p, "gelu", False)
    with pytest.raises(RuntimeError, match="w1 must be"):
        call(ops.moe_ffn, torch.randn(2, 7), idx, w, p, "gelu", False)
    with pytest.raises(RuntimeError, match="activation='tanh'"):
        call(ops.moe_ffn, x, idx, w, p, "tanh", False)
    with pytest.raises(RuntimeError, match="weight must have idx's shape"):
        call(ops.moe_ffn, x, idx, torch.ones(2, 2), p, "gelu", False)
    with pytest.raises(ValueError, match=r"expert ids must lie in \[-1, 2\]"):
        call(ops.moe_ffn, x, torch.full((2, 1), 3), w, p, "gelu", False)
    with pytest.raises(ValueError, match=r"expert ids must lie in \[-1, 2\]"):
        ops.capacity_drop(torch.full((2, 1), -2), w, 3, 4)
    with pytest.raises(RuntimeError, match="exceed the 3 experts"):
        ops.xmoe_select(torch.rand(2, 3), 0.5, 4, 0)


def test_xmoe_select_float32_agrees_with_reference_near_the_threshold():
    probs = random_probs(500, 16, dtype=torch.float32, seed=9)
    for threshold in (0.3, 0.5, 0.9):
        got = ops.xmoe_select(probs, threshold, 0, 0)
        want = R.xmoe_select_reference(probs, threshold, 0, 0)
        assert torch.equal(got[0], want[0])


@pytest.mark.parametrize("gate_input, glu, bias", [(True, False, True), (False, True, True), (True, True, False)])
def test_narrow_rows_take_onednn_and_match_reference(gate_input, glu, bias, monkeypatch):
    """SliceMoE-like narrow rows with >= ONEDNN_MIN_ROWS rows per expert, without the native
    kernel: the grouped path runs its GEMMs on oneDNN (when this torch has it) and stays within
    SPEC §3's fp32 tolerance."""
    monkeypatch.setenv("MOEFX_NATIVE", "0")
    calls = []
    if cpu._ONEDNN_LINEAR is not None:
        real = cpu._ONEDNN_LINEAR
        monkeypatch.setattr(cpu, "_ONEDNN_LINEAR", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    T, E, h, d, K = 700, 4, 16, 8, 2
    p64 = expert_weights(E, h, d, glu, bias)
    idx, weight = routing(T, E, K, seed=11)
    assert_float32_within_spec(R.moe_ffn_reference, torch.randn(T, d, dtype=torch.float64), idx, weight, p64,
                               gate_input)
    if cpu._ONEDNN_LINEAR is not None:
        assert calls and min(calls) >= cpu.ONEDNN_MIN_ROWS


def test_decode_path_accepts_per_expert_views():
    E, h, d = 5, 6, 8
    p = expert_weights(E, h, d, True, True)
    idx, weight = routing(2, E, 2, seed=12)
    x = torch.randn(2, d, dtype=torch.float64)
    views = tuple(p[k].unbind(0) if p[k] is not None else None for k in ("w1", "b1", "w3", "b3", "w2", "b2"))
    for gate_input in (False, True):
        got = cpu.moe_ffn(x, idx, weight, p["w1"], p["b1"], p["w3"], p["b3"], p["w2"], p["b2"], "silu", gate_input,
                          expert_views=views)
        want = call(R.moe_ffn_reference, x, idx, weight, p, "silu", gate_input)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("top_k", [1, 2])
def test_top2_by_max_matches_reference_and_breaks_ties_low_first(top_k):
    """Many rows take the max-based top-1/top-2; equal probabilities keep the lower expert
    first, as the reference's stable sort does."""
    T = cpu.TOP2_MIN_ROWS + 3
    probs = random_probs(T, 6, dtype=torch.float32, seed=13)
    probs[:5] = torch.tensor([0.3, 0.3, 0.2, 0.1, 0.05, 0.05])
    probs[5:10] = torch.tensor([0.1, 0.2, 0.05, 0.3, 0.3, 0.05])
    got = ops.xmoe_select(probs, 0.0, top_k, 0)
    want = R.xmoe_select_reference(probs, 0.0, top_k, 0)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    torch.library.opcheck(ops.xmoe_select.default, (probs, 0.0, top_k, 0))
