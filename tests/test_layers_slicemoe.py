"""moefx.layers.SliceMoE, point by point of SPEC.md §2 and the layout of docs/ARCHITECTURE.md."""
import copy

import pytest
import torch

from moefx.config import ConfigError, SliceMoEConfig
from moefx.kernels import reference as R
from moefx.layers import SliceMoE


def make(seed=0, d=16, d_ff=24, dtype=torch.float64, activation="gelu", glu=False, **kw):
    torch.manual_seed(seed)
    kw.setdefault("num_slices", 4)
    kw.setdefault("num_experts", 6)
    kw.setdefault("router_hidden", 12)
    return SliceMoE(SliceMoEConfig(**kw), d, d_ff, activation=activation, glu=glu).to(dtype).eval()


def test_parameter_layout_and_default_expert_width():
    layer = SliceMoE(SliceMoEConfig(), 576, 1536, glu=True)
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    assert shapes == {
        "router.0.weight": (256, 72), "router.0.bias": (256,), "router.2.weight": (16, 256), "router.2.bias": (16,),
        "w1": (16, 768, 72), "b1": (16, 768), "w3": (16, 768, 72), "b3": (16, 768), "w2": (16, 72, 768), "b2": (16, 72),
    }
    assert isinstance(layer.router[1], torch.nn.ReLU)
    assert layer.expert_hidden == 1536 // 2 and layer.slice_dim == 72


def test_matches_dense_parameter_count_when_e_is_s_times_k():
    layer = SliceMoE(SliceMoEConfig(num_slices=8, num_experts=16, top_k=2), 576, 1536)
    experts = sum(getattr(layer, n).numel() for n in ("w1", "w2"))
    assert experts == 2 * 576 * 1536


def test_num_slices_must_divide_d():
    with pytest.raises(ConfigError, match=r"num_slices=5 does not divide d_model=16.*\[1, 2, 4, 8, 16\]"):
        SliceMoE(SliceMoEConfig(num_slices=5), 16, 32)


def test_route_top_k_per_slice_renormalised():
    layer = make(top_k=2)
    x = torch.randn(7, 16, dtype=torch.float64)
    idx, weight, probs = layer.route(x)
    assert idx.shape == (28, 2) and probs.shape == (28, 6)
    want_probs = torch.softmax(layer.router(x.reshape(28, 4)), -1)
    torch.testing.assert_close(probs, want_probs)
    top = probs.topk(2, -1)
    assert torch.equal(idx, top.indices)
    torch.testing.assert_close(weight, top.values / top.values.sum(-1, keepdim=True))


@pytest.mark.parametrize(
    "kw",
    [
        dict(gate="input"),
        dict(gate="output"),
        dict(gate="input", top_k=3, glu=True, activation="silu"),
        dict(gate="output", num_slices=2, num_experts=4, top_k=1, activation="relu", expert_hidden=5),
    ],
)
def test_forward_matches_reference(kw):
    layer = make(**kw)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    torch.testing.assert_close(layer(x), R.slicemoe_reference(layer, x), rtol=1e-12, atol=1e-12)
    l32 = layer.float()
    torch.testing.assert_close(l32(x.float()).double(), R.slicemoe_reference(layer.double(), x), rtol=1e-5, atol=1e-5)


def test_input_gating_is_not_output_gating():
    """With a nonlinear expert and b1 != 0, FFN(p·x) differs from p·FFN(x); with the identity
    activation and zero biases both are p·W2·W1·x."""
    a = make(seed=1, gate="input")
    b = make(seed=1, gate="output")
    x = torch.randn(3, 16, dtype=torch.float64)
    assert (a(x) - b(x)).abs().max() > 1e-3
    lin_a = make(seed=1, gate="input", activation="identity")
    lin_b = make(seed=1, gate="output", activation="identity")
    for layer in (lin_a, lin_b):
        with torch.no_grad():
            layer.b1.zero_()
            layer.b2.zero_()
    torch.testing.assert_close(lin_a(x), lin_b(x))


def test_slices_keep_their_order():
    layer = make()
    x = torch.randn(3, 16, dtype=torch.float64)
    y = layer(x)
    for s in range(4):
        x2 = x.clone()
        x2[:, s * 4:(s + 1) * 4] += 0.5
        # > 1e-9: regrouping rows by expert may change float64 rounding, never more
        changed = ((layer(x2) - y).abs().reshape(3, 4, 4).amax(-1) > 1e-9).any(0)
        assert changed.tolist() == [i == s for i in range(4)]


def test_cross_slice_dropout_never_drops_all_and_renormalises():
    torch.manual_seed(5)
    layer = make(top_k=3, slice_dropout=0.6).train()
    x = torch.randn(400, 16, dtype=torch.float64)
    idx, weight, probs = layer.route(x)
    kept = idx >= 0
    assert kept.any(1).all()
    torch.testing.assert_close(weight.sum(1), torch.ones(1600, dtype=torch.float64))
    assert (weight[~kept] == 0).all()
    # dropped independently with p=0.6, except that a lone survivor is forced when all would go
    frac_dropped = 1 - kept.double().mean()
    expected = (3 * 0.6 - 0.6**3) / 3  # all three drop w.p. 0.6^3 and then one comes back
    assert abs(frac_dropped - expected) < 0.03
    only_one = kept.sum(1) == 1
    lone = idx[only_one]
    # when all three would drop the top-1 survives, so slot 0 is over-represented among lone rows
    assert (lone[:, 0] >= 0).double().mean() > 0.5
    top = probs.topk(3, -1)
    surv = torch.where(kept, top.values, torch.zeros_like(top.values))
    torch.testing.assert_close(weight, surv / surv.sum(1, keepdim=True))
    layer.eval()
    assert (layer.route(x)[0] >= 0).all()


def test_capacity_loss_is_cv_squared_of_soft_load():
    layer = make(capacity_loss_coef=0.3).train()
    x = torch.randn(20, 16, dtype=torch.float64)
    layer(x)
    probs = torch.softmax(layer.router(x.reshape(80, 4)), -1)
    load = probs.sum(0)
    want = 0.3 * (load.std(unbiased=False) / load.mean()) ** 2
    torch.testing.assert_close(layer.aux_loss, want)
    layer.aux_loss.backward()
    assert layer.router[0].weight.grad.abs().sum() > 0
    layer.eval()(x)
    assert layer.aux_loss is None


@pytest.mark.parametrize("shape", [(16,), (5, 16), (2, 3, 16), (0, 16), (3, 0, 16)])
def test_any_leading_shape_and_empty(shape):
    layer = make()
    x = torch.randn(*shape, dtype=torch.float64)
    y = layer(x)
    assert y.shape == x.shape
    layer.train()(x)
    assert torch.isfinite(layer.aux_loss)


@pytest.mark.parametrize("gate, glu", [("input", False), ("output", True)])
def test_layer_gradcheck_float64(gate, glu):
    layer = make(d=8, d_ff=6, num_slices=2, num_experts=3, router_hidden=4, gate=gate, glu=glu).train()
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in layer.named_parameters()]
    params = list(layer.parameters())

    def f(x, *ps):
        out = torch.func.functional_call(layer, dict(zip(names, ps)), (x,))
        return out, layer.aux_loss

    assert torch.autograd.gradcheck(f, (x, *params), fast_mode=True)


def test_bfloat16_runs_with_float32_router():
    layer = make(dtype=torch.bfloat16)
    x = torch.randn(4, 16)
    _, weight, probs = layer.route(x.bfloat16())
    assert probs.dtype == torch.float32 and weight.dtype == torch.float32
    y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16
    ref = R.slicemoe_reference(make(dtype=torch.float64), x.double())
    torch.testing.assert_close(y.double(), ref, rtol=1e-2, atol=3e-2)


def test_errors_name_the_problem():
    layer = make()
    with pytest.raises(ValueError, match=r"SliceMoE expects inputs \[\.\.\., 16\]"):
        layer(torch.randn(2, 12, dtype=torch.float64))
    with pytest.raises(ConfigError, match="needs a SliceMoEConfig"):
        SliceMoE(None, 16, 32)
    with pytest.raises(ConfigError, match="activation='tanh'"):
        SliceMoE(SliceMoEConfig(num_slices=2), 16, 32, activation="tanh")


@pytest.mark.parametrize("tokens", [1, 400])
def test_inference_fast_path_equals_op_path_and_reference(tokens, monkeypatch):
    """Eval + no_grad on CPU runs the ops' kernels directly (one token: 4 slices x 2 = 8 pairs
    <= 8 experts, the per-pair GEMVs on cached expert views; 400 tokens: the narrow grouped path,
    oneDNN GEMMs); it must agree with the op path (gradients enabled) and the reference."""
    layer = make(dtype=torch.float32, top_k=2, num_experts=8)
    x = torch.randn(tokens, 16)
    used = []
    real = SliceMoE._forward_inference
    monkeypatch.setattr(SliceMoE, "_forward_inference", lambda self, x2d: used.append(1) or real(self, x2d))
    via_ops = layer(x)
    assert not used and via_ops.requires_grad
    with torch.no_grad():
        fast = layer(x)
    assert used == [1]
    torch.testing.assert_close(fast, via_ops.detach(), rtol=1e-5, atol=1e-6)
    ref = R.slicemoe_reference(layer.double(), x.double())
    torch.testing.assert_close(fast.double(), ref, rtol=1e-5, atol=1e-5)


class _Passthrough(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_fast_path_only_in_plain_eval_inference(monkeypatch):
    layer = make()
    monkeypatch.setattr(SliceMoE, "_forward_inference", lambda self, x2d: (_ for _ in ()).throw(AssertionError("fast path")))
    x = torch.randn(3, 16, dtype=torch.float64)
    layer(x)  # gradients enabled: the ops, so autograd sees them
    with torch.no_grad():
        layer.train()(x)  # training: dropout and the capacity loss
        layer.eval()
        with _Passthrough():  # something intercepts the calls: it must see the ops
            layer(x)
        with pytest.raises(AssertionError, match="fast path"):
            layer(x)


def test_expert_views_follow_parameter_changes():
    layer = make(dtype=torch.float32, num_experts=8)  # one token = 8 pairs: the decode path
    x = torch.randn(1, 16)
    with torch.no_grad():
        y0 = layer(x)
        assert layer._expert_views is not None
        layer.w2.mul_(2)  # in place: the cached views see it
        layer.b2.mul_(2)
        torch.testing.assert_close(layer(x), 2 * y0)
        layer.w1 = torch.nn.Parameter(torch.randn_like(layer.w1))  # replaced: views rebuilt
        torch.testing.assert_close(layer(x).double(), R.slicemoe_reference(layer.double(), x.double()), rtol=1e-5, atol=1e-5)
        assert layer._expert_views is None  # .double() (_apply) dropped them
        layer(x.double())
        assert layer._expert_views is not None and copy.deepcopy(layer)._expert_views is None
