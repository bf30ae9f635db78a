"""moefx.layers.XMoE, point by point of SPEC.md §1 and the layout of docs/ARCHITECTURE.md."""
import math

import pytest
import torch
import torch.nn.functional as F

from moefx.config import ConfigError, XMoEConfig
from moefx.kernels import reference as R
from moefx.layers import XMoE


def make(seed=0, d=16, d_ff=48, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    layer_kw = {k: kw.pop(k) for k in ("activation", "glu", "bias", "converted") if k in kw}
    return XMoE(XMoEConfig(**kw), d, d_ff, **layer_kw).to(dtype).eval()


def test_parameter_layout():
    layer = XMoE(XMoEConfig(num_experts=6, num_shared=2), 16, 50, glu=True)
    h = math.ceil(50 / 8)
    assert layer.expert_hidden == h
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    assert shapes == {
        "router.weight": (6, 16), "w1": (6, h, 16), "b1": (6, h), "w3": (6, h, 16), "b3": (6, h),
        "w2": (6, 16, h), "bias": (16,), "shared_w1": (2 * h, 16), "shared_b1": (2 * h,),
        "shared_w3": (2 * h, 16), "shared_b3": (2 * h,), "shared_w2": (16, 2 * h),
    }
    plain = XMoE(XMoEConfig(num_experts=4), 16, 32, bias=False)
    assert {n for n, _ in plain.named_parameters()} == {"router.weight", "w1", "w2"}
    assert plain.b1 is None and plain.w3 is None and plain.bias is None
    assert (plain.d_model, plain.d_ff, plain.activation, plain.glu, plain.converted) == (16, 32, "gelu", False, False)


def test_combine_default_depends_on_converted():
    assert XMoE(XMoEConfig(num_experts=4), 8, 16).combine == "prob"
    assert XMoE(XMoEConfig(num_experts=4), 8, 16, converted=True).combine == "unit"
    assert XMoE(XMoEConfig(num_experts=4, combine="prob"), 8, 16, converted=True).combine == "prob"


def test_router_runs_in_float32_for_low_precision_models():
    layer = make(dtype=torch.bfloat16, num_experts=4, threshold=0.8)
    x = torch.randn(10, 16, dtype=torch.bfloat16)
    idx, weight, probs = layer.route(x)
    assert probs.dtype == torch.float32
    want = torch.softmax(x.float() @ layer.router.weight.float().t(), -1)
    torch.testing.assert_close(probs, want)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = R.xmoe_reference(make(dtype=torch.float64, num_experts=4, threshold=0.8), x.double())
    torch.testing.assert_close(y.double(), ref, rtol=1e-2, atol=2e-2)


@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.9, 1.0])
def test_threshold_keeps_smallest_prefix(threshold):
    layer = make(num_experts=8, threshold=threshold)
    idx, weight, probs = layer.route(torch.randn(50, 16, dtype=torch.float64) * 3)
    for t in range(50):
        kept = [int(e) for e in idx[t] if e >= 0]
        ranked = probs[t].argsort(descending=True).tolist()
        assert kept == ranked[: len(kept)]
        mass = probs[t, kept].sum()
        assert mass >= threshold or len(kept) == 8
        assert len(kept) == 1 or probs[t, kept[:-1]].sum() < threshold
        torch.testing.assert_close(weight[t, : len(kept)], probs[t, kept])


def test_top_k_and_max_experts():
    layer = make(num_experts=8, top_k=3)
    idx, _, _ = layer.route(torch.randn(20, 16, dtype=torch.float64))
    assert idx.shape == (20, 3) and (idx >= 0).all()
    capped = make(num_experts=8, threshold=1.0, max_experts=2)
    idx, _, _ = capped.route(torch.randn(20, 16, dtype=torch.float64))
    assert idx.shape == (20, 2) and (idx >= 0).all()


def test_capacity_priority_and_drop():
    layer = make(num_experts=4, threshold=0.9, capacity_factor=1.0)
    x = torch.randn(40, 16, dtype=torch.float64) * 3
    idx, weight, probs = layer.route(x)
    C = max(math.ceil(40 / 4 * 1.0), 4)
    assert layer.capacity(40) == C == 10
    pre = R.xmoe_select_reference(probs, 0.9, 0, 0)
    want = R.capacity_drop_reference(*pre, 4, C)
    assert torch.equal(idx, want[0]) and torch.equal(weight, want[1])
    assert (torch.bincount(idx[idx >= 0], minlength=4) <= C).all()
    assert (idx < 0).sum() > (pre[0] < 0).sum()  # something was dropped
    # a dropped assignment just loses that expert's output: compare with the reference layer
    torch.testing.assert_close(layer(x), R.xmoe_reference(layer, x))


@pytest.mark.parametrize(
    "kw",
    [
        dict(num_experts=8, threshold=0.7),
        dict(num_experts=8, threshold=0.7, converted=True),
        dict(num_experts=6, top_k=2, glu=True, activation="silu", num_shared=1),
        dict(num_experts=6, threshold=0.5, capacity_factor=0.8, bias=False, activation="relu"),
        dict(num_experts=5, threshold=0.95, max_experts=3, activation="gelu_tanh", combine="unit"),
    ],
)
def test_forward_matches_reference(kw):
    layer = make(**kw)
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    torch.testing.assert_close(layer(x), R.xmoe_reference(layer, x), rtol=1e-12, atol=1e-12)
    l32 = layer.float()
    torch.testing.assert_close(l32(x.float()).double(), R.xmoe_reference(layer.double(), x), rtol=1e-5, atol=1e-5)


def test_prob_combine_uses_raw_probabilities_and_unit_uses_ones():
    prob = make(seed=3, num_experts=4, threshold=0.9, combine="prob", bias=False)
    unit = make(seed=3, num_experts=4, threshold=0.9, combine="unit", bias=False)
    x = torch.randn(1, 16, dtype=torch.float64)
    idx, weight, probs = prob.route(x)
    kept = [int(e) for e in idx[0] if e >= 0]

    def expert(e):
        return prob.w2[e] @ F.gelu(prob.w1[e] @ x[0] + prob.b1[e]) if prob.b1 is not None else prob.w2[e] @ F.gelu(prob.w1[e] @ x[0])

    torch.testing.assert_close(prob(x)[0], sum(probs[0, e] * expert(e) for e in kept))
    torch.testing.assert_close(unit(x)[0], sum(expert(e) for e in kept))


def _dense_split(layer, W1, B1, W2, B2, W3=None):
    E, h = layer.config.num_experts, layer.expert_hidden
    d_ff = W1.shape[0]
    with torch.no_grad():
        for p in (layer.w1, layer.b1, layer.w2, layer.w3, layer.b3):
            if p is not None:
                p.zero_()
        for e in range(E):
            lo, hi = min(e * h, d_ff), min((e + 1) * h, d_ff)
            layer.w1[e, : hi - lo] = W1[lo:hi]
            layer.b1[e, : hi - lo] = B1[lo:hi]
            if W3 is not None:
                layer.w3[e, : hi - lo] = W3[lo:hi]
            layer.w2[e, :, : hi - lo] = W2[:, lo:hi]
        layer.bias.copy_(B2)


@pytest.mark.parametrize("glu", [False, True])
def test_converted_unit_all_experts_equals_dense_fp32(glu):
    """SPEC §3: every expert kept, unit combine, no capacity = the dense FFN to fp32 rounding
    (h = ceil(100/16) = 7: the last experts are zero-padded, one is all padding)."""
    torch.manual_seed(4)
    d, d_ff = 24, 100
    W1, B1, W2, B2, W3 = torch.randn(d_ff, d), torch.randn(d_ff), torch.randn(d, d_ff) / 10, torch.randn(d), torch.randn(d_ff, d)
    layer = XMoE(XMoEConfig(num_experts=16, threshold=1.0), d, d_ff, activation="silu", glu=glu, converted=True)
    _dense_split(layer, W1, B1, W2, B2, W3 if glu else None)
    x = torch.randn(5, 9, d)
    hidden = F.silu(F.linear(x, W1, B1))
    if glu:
        hidden = hidden * F.linear(x, W3)
    dense = F.linear(hidden, W2, B2)
    torch.testing.assert_close(layer(x), dense, rtol=1e-5, atol=1e-5)


def test_shared_experts_and_bias_added_once():
    layer = make(num_experts=4, threshold=0.9, num_shared=2, glu=True)
    x = torch.randn(6, 16, dtype=torch.float64)
    with torch.no_grad():
        layer.w2.zero_()
    shared = layer.shared_w2 @ (F.gelu(layer.shared_w1 @ x.t() + layer.shared_b1[:, None]) * (layer.shared_w3 @ x.t() + layer.shared_b3[:, None]))
    torch.testing.assert_close(layer(x), shared.t() + layer.bias)
    with torch.no_grad():
        layer.shared_w2.zero_()
    torch.testing.assert_close(layer(x), layer.bias.expand(6, 16))


def test_aux_loss_switch_style_on_top1():
    layer = make(num_experts=4, threshold=0.8, aux_loss_coef=0.05).train()
    x = torch.randn(30, 16, dtype=torch.float64)
    layer(x)
    probs = torch.softmax(x @ layer.router.weight.t(), -1)
    frac = torch.bincount(probs.argmax(-1), minlength=4).double() / 30
    want = 0.05 * 4 * (probs.mean(0) * frac).sum()
    torch.testing.assert_close(layer.aux_loss, want)
    layer.aux_loss.backward()
    assert layer.router.weight.grad.abs().sum() > 0
    layer.eval()(x)
    assert layer.aux_loss is None


@pytest.mark.parametrize("shape", [(16,), (5, 16), (2, 3, 16), (2, 1, 3, 16), (0, 16), (2, 0, 16)])
def test_any_leading_shape_and_empty(shape):
    layer = make(num_experts=4, threshold=0.9, capacity_factor=2.0)
    x = torch.randn(*shape, dtype=torch.float64)
    y = layer(x)
    assert y.shape == x.shape
    if x.numel():
        torch.testing.assert_close(y.reshape(-1, 16), layer(x.reshape(-1, 16)))
    layer.train()(x)
    assert layer.aux_loss is not None and torch.isfinite(layer.aux_loss)


@pytest.mark.parametrize("combine, glu", [("prob", False), ("unit", True)])
def test_layer_gradcheck_float64(combine, glu):
    layer = make(d=8, d_ff=12, num_experts=4, threshold=0.8, num_shared=1, combine=combine, glu=glu).train()
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    params = [p for p in layer.parameters()]
    names = [n for n, _ in layer.named_parameters()]

    def f(x, *ps):
        out = torch.func.functional_call(layer, dict(zip(names, ps)), (x,))
        return out, layer.aux_loss

    assert torch.autograd.gradcheck(f, (x, *params), fast_mode=True)


def test_errors_name_the_problem():
    layer = make(num_experts=4)
    with pytest.raises(ValueError, match=r"XMoE expects inputs \[\.\.\., 16\]"):
        layer(torch.randn(3, 15, dtype=torch.float64))
    with pytest.raises(ConfigError, match="activation='swish'"):
        XMoE(XMoEConfig(num_experts=4), 8, 16, activation="swish")
    with pytest.raises(ConfigError, match="needs an XMoEConfig"):
        XMoE({"num_experts": 4}, 8, 16)
    with pytest.raises(ConfigError, match="d_ff"):
        XMoE(XMoEConfig(num_experts=16), 8, 8)


@pytest.mark.parametrize(
    "kw",
    [
        dict(num_experts=8, threshold=0.9),  # prob combine: the router gets gradients too
        dict(num_experts=8, threshold=0.9, converted=True, glu=True, activation="silu", num_shared=2),
        dict(num_experts=6, top_k=4, activation="relu2", bias=True),
        dict(num_experts=5, threshold=0.95, max_experts=3, activation="gelu_tanh", combine="unit", glu=True),
    ],
)
def test_dense_masked_training_path_matches_the_op_in_values_and_gradients(kw, monkeypatch):
    """With gradients flowing and most experts kept, the layer trains through dense masked GEMMs
    instead of the grouped op; outputs and every gradient must be the op's (float64)."""
    torch.manual_seed(0)
    layer = make(**kw).double().train()
    x = torch.randn(4, 9, 16, dtype=torch.float64, requires_grad=True)
    results = {}
    for path, share in (("op", 2.0), ("dense", 0.0)):
        monkeypatch.setattr(XMoE, "DENSE_TRAIN_SHARE", share)
        layer.zero_grad(set_to_none=True)
        x.grad = None
        idx, weight, _ = layer.route(x.reshape(-1, 16))
        assert layer.use_dense_training(x.reshape(-1, 16), idx, weight) == (path == "dense")
        y = layer(x)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)).sum().backward()
        grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
        results[path] = (y.detach(), x.grad.clone(), grads)
    (y0, gx0, g0), (y1, gx1, g1) = results["op"], results["dense"]
    torch.testing.assert_close(y1, y0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gx1, gx0, rtol=1e-10, atol=1e-10)
    assert g1.keys() == g0.keys() and "w1" in g0
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-10, atol=1e-10, msg=name)


def test_dense_masked_path_only_when_training_a_high_share(monkeypatch):
    layer = make(num_experts=8, threshold=0.99).train()
    x = torch.randn(20, 16)
    idx, weight, _ = layer.route(x)
    assert (idx >= 0).float().mean() * idx.shape[1] / 8 >= 0.5
    assert layer.use_dense_training(x, idx, weight)
    with torch.no_grad():
        assert not layer.use_dense_training(x, idx, weight)
    assert not layer.eval().use_dense_training(x, idx, weight)  # inference keeps the op, bit for bit
    layer.train()
    for p in layer.parameters():
        p.requires_grad_(False)
    idx, weight, _ = layer.route(x)
    assert not layer.use_dense_training(x, idx, weight)  # nothing to differentiate
    assert layer.use_dense_training(x.requires_grad_(), idx, weight)  # the input's gradient still flows
    x = x.detach()
    sparse = make(num_experts=8, top_k=1).train()
    idx, weight, _ = sparse.route(x)
    assert not sparse.use_dense_training(x, idx, weight)  # 1 of 8 kept: the grouped op


def test_flat_w2_layout_round_trips_and_is_what_the_masked_experts_multiply_by():
    layer = make(num_experts=4, threshold=0.8)
    E, d, h = layer.w2.shape
    flat = layer.flat_w2()
    assert flat.shape == (d, E * h) and torch.equal(flat[:, h:2 * h], layer.w2[1])
    x = torch.randn(5, d, dtype=torch.float64)
    gate = (torch.rand(5, E) > 0.5).double()
    torch.testing.assert_close(layer.dense_masked_experts(x, gate, 2 * flat), 2 * layer.dense_masked_experts(x, gate))
    before = layer.w2.detach().clone()
    layer.set_flat_w2(3 * flat.detach())
    torch.testing.assert_close(layer.w2, 3 * before)
