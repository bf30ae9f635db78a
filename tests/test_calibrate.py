"""Layer-wise calibration: routing arithmetic matches the layer, target ratios are hit, fitted
routers and expert refits lower the error, activations spill to disk without changing results."""
import copy

import pytest
import torch

import moefx
from moefx.config import SliceMoEConfig, XMoEConfig
from moefx.convert.calibrate import Inputs, moe_layers
from moefx.convert.functional import layer_mask, masked_forward, select_mask

from zoo import ZOO


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny shapes: on a shared 2-core machine, thread wake-ups cost more than the math."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def batches(n=4, seq=16, vocab=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (2, seq), generator=g) for _ in range(n)]


def converted(cfg, name="llama"):
    model, inputs, kwargs = ZOO[name]()
    return moefx.convert(model, cfg, inputs, kwargs, calibration_batches=batches(2)), inputs


def test_select_mask_matches_the_layer_routing():
    model, _ = converted(XMoEConfig(num_experts=6, threshold=0.7))
    layer = model.model.layers[0].mlp
    with torch.no_grad():
        layer.router.weight.normal_()
    x = torch.randn(50, 16)
    idx, _, _ = layer.route(x)
    ref = torch.zeros(50, 6, dtype=torch.bool)
    for t in range(50):
        for e in idx[t].tolist():
            if e >= 0:
                ref[t, e] = True
    assert torch.equal(layer_mask(layer, x), ref)
    with torch.no_grad():
        torch.testing.assert_close(masked_forward(layer, x, ref), layer(x), rtol=1e-5, atol=1e-6)


def test_select_mask_rule_examples():
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.9, 0.05, 0.03, 0.02]])
    assert select_mask(p, 0.75).tolist() == [[True, True, False, False], [True, False, False, False]]
    assert select_mask(p, 0.0).sum(1).tolist() == [1, 1]
    assert select_mask(p, 1.0).all()
    assert select_mask(p, None, top_k=3).sum(1).tolist() == [3, 3]


def test_expert_output_norms_equal_each_experts_output_norm():
    from moefx.convert.functional import expert_hidden, expert_output_norms

    model, _ = converted(XMoEConfig(num_experts=6, num_shared=1, threshold=0.7))
    layer = model.model.layers[0].mlp
    x = torch.randn(37, 16)
    with torch.no_grad():
        h = expert_hidden(layer, x).double()
        ref = torch.stack([(h[:, e] @ layer.w2[e].double().t()).norm(dim=-1) for e in range(h.shape[1])], 1)
        got = expert_output_norms(layer, x)
    assert got.shape == (37, 6)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-6)
    a = torch.randn(16, 16, dtype=torch.float64)
    metric = a @ a.t()  # norms in a metric: sqrt(y^T M y) of each expert's output y
    with torch.no_grad():
        ys = torch.stack([h[:, e] @ layer.w2[e].double().t() for e in range(h.shape[1])], 1)
        got = expert_output_norms(layer, x, metric.float())
    torch.testing.assert_close(got.double(), torch.einsum("ted,df,tef->te", ys, metric, ys).sqrt(), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("max_experts", [None, 3])
def test_scale_bisection_counts_what_select_mask_keeps(max_experts):
    from types import SimpleNamespace

    from moefx.convert.router import scale_for

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(200, 12, generator=g) * 2
    for t in (0.3, 0.6, 0.9):
        cfg = SimpleNamespace(top_k=None, threshold=t, max_experts=max_experts)
        for target in (0.12, 0.2):  # reachable: t=0.3 keeps at most 4 of 12, max_experts 3
            scale = scale_for(logits, cfg, target)
            kept = float(select_mask(torch.softmax(logits * scale, -1), t, None, max_experts).float().mean())
            assert kept == pytest.approx(target, abs=0.01)


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_target_ratio_is_reached_and_fitting_beats_centroid(ratio, capsys):
    cfg = XMoEConfig(num_experts=6, num_shared=1, threshold=0.9, router="fitted")
    base, _ = converted(cfg)
    centroid = copy.deepcopy(base)
    ref = moefx.calibrate(centroid, batches(), target_ratio=ratio, fit_router=False, fit_experts=False, verbose=False,
                          budgets="uniform")
    rep = moefx.calibrate(base, batches(), target_ratio=ratio, budgets="uniform")
    captured = capsys.readouterr()
    assert "relerr before" in captured.out and "mean" in captured.out
    assert "calibrating layers" in captured.err
    for r, c in zip(rep.layers, ref.layers):
        assert abs(r.ratio_after - ratio) < 0.12
        assert r.rel_err_after < c.rel_err_after


def test_allocate_budgets_meets_the_mean_and_favours_the_sensitive_layer():
    from moefx.convert.calibrate import allocate_budgets

    grid = [0.25, 0.5, 0.75, 1.0]
    curves = {"flat": (grid, [0.10, 0.05, 0.02, 0.0]), "steep": (grid, [0.90, 0.40, 0.10, 0.0]),
              "mid": (grid, [0.30, 0.15, 0.05, 0.0])}
    for target in (0.5, 0.6, 0.75):
        out = allocate_budgets(curves, target)
        assert abs(sum(out.values()) / 3 - target) < 1e-9
        assert out["steep"] >= out["mid"] >= out["flat"]
        assert all(0.25 <= r <= 1.0 for r in out.values())
    assert allocate_budgets(curves, 0.1) == {"flat": 0.25, "steep": 0.25, "mid": 0.25}
    assert allocate_budgets(curves, 0.75)["steep"] == 1.0
    bounded = allocate_budgets(curves, 0.75, spread=0.1)
    assert all(abs(r - 0.75) <= 0.1 for r in bounded.values())


@pytest.mark.parametrize("mode", ["model", "relative", "absolute", "inverse"])
def test_sensitivity_budgets_hit_the_mean_target_not_each_layer(mode):
    cfg = XMoEConfig(num_experts=6, num_shared=1, threshold=0.9, router="fitted")
    model, _ = converted(cfg)
    rep = moefx.calibrate(model, batches(), target_ratio=0.6, verbose=False, progress=False, budgets=mode)
    assert set(rep.budgets) == {r.name for r in rep.layers}
    assert abs(sum(rep.budgets.values()) / len(rep.budgets) - 0.6) < 1e-6
    assert abs(rep.mean("ratio_after") - 0.6) < 0.06
    for r in rep.layers:
        assert abs(r.ratio_after - rep.budgets[r.name]) < 0.1
    with pytest.raises(ValueError, match="budgets="):
        moefx.calibrate(model, batches(1), target_ratio=0.6, budgets="even", verbose=False, progress=False)


class _Head(torch.nn.Module):
    """x -> layer(x) -> W: the Fisher at the layer's output has a closed form."""

    def __init__(self, d=6, out=5, logits=True):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.ffn = torch.nn.Linear(d, d)
        self.ffn.weight.data = torch.randn(d, d, generator=g) / d ** 0.5
        self.w = torch.randn(out, d, generator=g)
        self.logits = logits

    def forward(self, x):
        z = self.ffn(x) @ self.w.t()
        if self.logits:
            from types import SimpleNamespace
            return SimpleNamespace(logits=z)
        return z


@pytest.mark.parametrize("logits", [True, False])
def test_output_fisher_matches_the_closed_form(logits):
    """z = W y: with logits, the Fisher at y is W^T (diag(p) - p p^T) W averaged over tokens
    (labels sampled from the model); for a plain output it is W^T W."""
    from moefx.convert.calibrate import output_fisher

    model = _Head(logits=logits)
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(4, 2048, 6, generator=g) for _ in range(2)]
    G = output_fisher(model, {"ffn": model.ffn}, xs, max_tokens=16384)["ffn"]
    W = model.w
    if logits:
        with torch.no_grad():
            p = torch.softmax(model.ffn(torch.cat(xs).reshape(-1, 6)) @ W.t(), -1)
        F_out = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
        want = W.t() @ F_out.mean(0) @ W
    else:
        want = W.t() @ W
    assert torch.allclose(G, want, rtol=0, atol=0.06 * float(want.abs().max()))
    assert all(p.requires_grad and p.grad is None for p in model.parameters())  # flags restored, no grads left


class _DictOutput(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return {"scores": self.model(ids).logits}


def test_a_model_without_logits_or_tensor_output_falls_back_to_plain_norms():
    cfg = XMoEConfig(num_experts=6, num_shared=1, threshold=0.9, router="fitted")
    model, _ = converted(cfg)
    wrapped, other = _DictOutput(model), _DictOutput(copy.deepcopy(model))
    with pytest.warns(UserWarning, match="router_target='fisher'.*plain output norms"):
        moefx.calibrate(wrapped, batches(), target_ratio=0.6, verbose=False, progress=False)
    moefx.calibrate(other, batches(), target_ratio=0.6, verbose=False, progress=False, router_target="norm")
    for a, b in zip(moe_layers(wrapped).values(), moe_layers(other).values()):
        torch.testing.assert_close(a.router.weight, b.router.weight)


def test_fisher_pass_cuts_large_batches_to_its_token_limit():
    from moefx.convert.calibrate import _pieces

    ids = torch.arange(8 * 256).reshape(8, 256)
    pieces = _pieces({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, 1024)
    assert [p.kwargs["input_ids"].shape for p in pieces] == [(4, 256), (4, 256)]
    assert torch.equal(torch.cat([p.kwargs["input_ids"] for p in pieces]), ids)
    floats = _pieces(torch.randn(8, 16, 6), 32)  # a float input's last dimension is its width
    assert [p.args[0].shape for p in floats] == [(2, 16, 6)] * 4
    assert len(_pieces(ids, 4096)) == 1


def test_a_router_fit_in_a_metric_learns_the_norms_in_that_metric():
    """With a metric that only counts some output directions, the fitted router's logits follow
    the experts' (log) output norms *in that metric* on held-out tokens, closer than a router fit
    on plain output norms does."""
    from moefx.convert.calibrate import calibrate_layer
    from moefx.convert.functional import expert_output_norms

    model, _ = converted(XMoEConfig(num_experts=6, num_shared=1, threshold=0.9, router="fitted"))
    layer = model.model.layers[0].mlp
    g = torch.Generator().manual_seed(3)
    mu = 2 * torch.randn(16, generator=g)  # off-centre inputs: norms of a GLU of centred ones are even in x
    x, held = torch.randn(4096, 16, generator=g) + mu, torch.randn(2048, 16, generator=g) + mu
    metric = torch.diag(torch.tensor([1.0] * 4 + [1e-3] * 12))
    centred = lambda t: t - t.mean(-1, keepdim=True)
    with torch.no_grad():
        want = centred(torch.log(expert_output_norms(layer, held, metric) + 1e-6))
    err = {}
    for name, m in (("metric", metric), ("plain", None)):
        fitted = copy.deepcopy(layer)
        with torch.no_grad():
            target = masked_forward(fitted, x)
        calibrate_layer(fitted, x, target, fit_experts=False, metric=m)
        with torch.no_grad():
            err[name] = float((centred(fitted.router(held)) - want).pow(2).mean())
    assert err["metric"] < 0.8 * err["plain"], err


def test_router_target_fisher_and_norm_both_calibrate():
    cfg = XMoEConfig(num_experts=6, num_shared=1, threshold=0.9, router="fitted")
    model, _ = converted(cfg)
    other = copy.deepcopy(model)
    rep = moefx.calibrate(model, batches(), target_ratio=0.6, verbose=False, progress=False)  # fisher: the default
    ref = moefx.calibrate(other, batches(), target_ratio=0.6, verbose=False, progress=False, router_target="norm")
    for a, b in zip(rep.layers, ref.layers):
        assert abs(a.ratio_after - 0.6) < 0.1 and abs(b.ratio_after - 0.6) < 0.1
    w = [l.router.weight for l in moe_layers(model).values()]
    w_ref = [l.router.weight for l in moe_layers(other).values()]
    assert not all(torch.allclose(a, b) for a, b in zip(w, w_ref))
    with pytest.raises(ValueError, match="router_target="):
        moefx.calibrate(model, batches(1), target_ratio=0.6, router_target="oracle", verbose=False, progress=False)


def test_explicit_per_layer_ratios_are_each_hit():
    cfg = XMoEConfig(num_experts=6, num_shared=1, threshold=0.9, router="fitted")
    model, _ = converted(cfg)
    names = list(moe_layers(model))
    want = {names[0]: 0.45, names[1]: 0.8}
    rep = moefx.calibrate(model, batches(), target_ratio=want, verbose=False, progress=False)
    for r in rep.layers:
        assert abs(r.ratio_after - want[r.name]) < 0.1
    with pytest.raises(ValueError, match="no converted layer named.*nope"):
        moefx.calibrate(model, batches(1), target_ratio={"nope": 0.5}, verbose=False, progress=False)


def test_unit_threshold_one_keeps_dense_before_calibration():
    model, _ = converted(XMoEConfig(num_experts=4, threshold=1.0))
    rep = moefx.calibrate(model, batches(2), fit_router=False, fit_experts=False, verbose=False, progress=False)
    for r in rep.layers:
        assert r.rel_err_before < 1e-6 and r.ratio_before == 1.0


def test_spilling_to_disk_gives_the_same_result():
    cfg = XMoEConfig(num_experts=4, threshold=0.9, router="fitted")
    a, _ = converted(cfg)
    b = copy.deepcopy(a)
    moefx.calibrate(a, batches(), target_ratio=0.5, verbose=False, progress=False)
    moefx.calibrate(b, batches(), target_ratio=0.5, verbose=False, progress=False, spill_bytes=1)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), na


def test_slicemoe_calibration_lowers_the_error():
    model, _ = converted(SliceMoEConfig(num_slices=4, num_experts=8, top_k=2))
    rep = moefx.calibrate(model, batches(), steps=60, verbose=False, progress=False)
    for r in rep.layers:
        assert r.rel_err_after < 0.97 * r.rel_err_before
    assert all(getattr(m, "moefx_teacher", None) is None for m in moe_layers(model).values())


def test_calibrate_without_moe_layers_is_a_clear_error():
    model, _, _ = ZOO["llama"]()
    with pytest.raises(ValueError, match="no converted MoE layer.*moefx.convert"):
        moefx.calibrate(model, batches(1))


def test_inputs_forms():
    t = torch.zeros(1, 2, dtype=torch.long)
    assert Inputs.of(t).args == (t,)
    assert Inputs.of({"input_ids": t}).kwargs == {"input_ids": t}
    assert Inputs.of((t, t)).args == (t, t)


def test_training_forward_of_slicemoe_matches_the_layer():
    from moefx.convert.calibrate import slicemoe_forward

    model, _ = converted(SliceMoEConfig(num_slices=4, num_experts=8, top_k=2))
    layer = model.model.layers[0].mlp
    x = torch.randn(20, 16)
    with torch.no_grad():
        torch.testing.assert_close(slicemoe_forward(layer, x), layer(x), rtol=1e-5, atol=1e-5)


def test_routed_share_is_the_inverse_of_activation_ratio():
    from moefx.convert.functional import activation_ratio, routed_share

    g = torch.Generator().manual_seed(5)
    for E, S in ((16, 0), (64, 16), (256, 64)):
        mask = torch.rand(50, E, generator=g) < torch.rand(1, generator=g)
        share = float(mask.float().mean())
        assert routed_share(activation_ratio(mask, S), E, S) == pytest.approx(share, abs=1e-6)


def test_spaced_keeps_inputs_and_targets_paired():
    from moefx.convert.functional import spaced

    x = torch.arange(100).float().unsqueeze(1)
    assert torch.equal(spaced(x, 100), x) and torch.equal(spaced(x, 200), x)
    rows = spaced(x, 10)
    assert rows.shape == (10, 1) and rows[0, 0] == 0 and rows[-1, 0] == 99
    assert torch.equal(spaced(2 * x, 10), 2 * rows)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_calibrates_in_float32_and_comes_back_in_its_dtypes(dtype):
    """A model loaded in bf16/fp16 (the usual way to load a HF checkpoint) calibrates: the fit
    runs in float32, reaching the errors of the same model calibrated in float32, and every
    tensor returns to its own dtype, a float32 buffer staying float32, ties kept."""
    reports = {}
    for dt in (torch.float32, dtype):
        torch.manual_seed(0)
        model, inputs, kwargs = ZOO["llama"]()
        model = model.to(dt)
        model.register_buffer("kept_fp32", torch.linspace(0, 1, 5))
        model = moefx.convert(model, XMoEConfig(num_experts=6, num_shared=1), inputs, kwargs,
                              calibration_batches=batches(2))
        before = {n: p.dtype for n, p in model.named_parameters()}
        tied = model.lm_head.weight is model.model.embed_tokens.weight
        reports[dt] = moefx.calibrate(model, batches(4), target_ratio=0.6, distill_steps=2, verbose=False,
                                      progress=False)
        assert {n: p.dtype for n, p in model.named_parameters()} == before == {n: dt for n in before}
        assert model.kept_fp32.dtype == torch.float32
        assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
        with torch.no_grad():
            out = model(batches(1)[0], use_cache=False).logits
        assert out.dtype == dt and torch.isfinite(out).all()
    half, full = reports[dtype], reports[torch.float32]
    assert half.mean("rel_err_after") == pytest.approx(full.mean("rel_err_after"), rel=0.05)
    assert half.mean("ratio_after") == pytest.approx(full.mean("ratio_after"), abs=0.02)


def test_model_budgets_measure_each_layer_in_the_model_and_favour_the_one_that_matters():
    """budgets="model": a layer whose output the model barely uses (its down projection
    scaled by 1e-3) costs next to nothing end to end at any ratio, so the other layer gets the
    budget; each curve falls with the ratio, and the routers come back as they were."""
    from moefx.convert.calibrate import Inputs, dense_mode, model_curves, run_batch

    cfg = XMoEConfig(num_experts=6, num_shared=1, threshold=0.9, router="fitted")
    model, _ = converted(cfg)
    layers = moe_layers(model)
    names = list(layers)
    assert len(names) >= 2
    quiet, loud = names[-1], names[0]
    with torch.no_grad():
        layers[quiet].w2.mul_(1e-3)
        if getattr(layers[quiet], "shared_w2", None) is not None:
            layers[quiet].shared_w2.mul_(1e-3)
        for layer in layers.values():
            layer.router.weight.normal_()
    seen = {n: [] for n in names}
    hooks = [layers[n].register_forward_pre_hook((lambda nm: lambda m, a: seen[nm].append(a[0].reshape(-1, a[0].shape[-1])))(n))
             for n in names]
    with torch.no_grad(), dense_mode(layers):
        for b in batches():
            run_batch(model, Inputs.of(b))
    for h in hooks:
        h.remove()
    before = {n: layers[n].router.weight.detach().clone() for n in names}
    curves = model_curves(model, layers, [Inputs.of(b) for b in batches(2, seed=5)], {n: torch.cat(seen[n]) for n in names},
                          target=0.6, spread=0.2)
    for n in names:
        assert torch.equal(layers[n].router.weight, before[n])
        rs, costs = curves[n]
        assert rs == sorted(rs) and rs[0] < 0.55 and rs[-1] > 0.65
        assert all(a >= b for a, b in zip(costs, costs[1:]))
    assert curves[loud][1][0] > curves[loud][1][-1]  # more experts, less loss
    assert max(curves[quiet][1]) < 1e-3 * min(curves[loud][1])
    from moefx.convert.calibrate import allocate_budgets
    alloc = allocate_budgets(curves, 0.6)
    assert alloc[loud] > alloc[quiet] and abs(sum(alloc.values()) / len(alloc) - 0.6) < 1e-6


def test_probe_loss_is_the_summed_kl_from_the_dense_output_and_leaves_the_reference_alone():
    from moefx.convert.calibrate import _reference, probe_loss

    g = torch.Generator().manual_seed(4)
    dense = torch.randn(2, 7, 300, generator=g) * 3
    near = dense + 0.05 * torch.randn(dense.shape, generator=g)
    Out = type("Out", (), {})
    ref, tokens = _reference(type("Out", (), {"logits": dense})())
    assert tokens == 14
    kept = [r.clone() for r in ref]
    for student in (near, torch.randn(dense.shape, generator=g)):
        out = Out()
        out.logits = student
        lt, ls = torch.log_softmax(dense.double(), -1), torch.log_softmax(student.double(), -1)
        want = float((lt.exp() * (lt - ls)).sum())
        assert probe_loss(out, ref) == pytest.approx(want, rel=1e-4)
    for r, k in zip(ref, kept):
        assert torch.equal(r, k)  # the next probe compares with the same reference
    plain, norm = _reference(dense)
    assert probe_loss(near, plain) == pytest.approx(float((near - dense).pow(2).sum()), rel=1e-5)
    assert norm == pytest.approx(float(dense.pow(2).sum()), rel=1e-6)


def test_model_curves_replay_the_blocks_before_each_probed_layer_and_change_nothing():
    """The probes answer every transformer layer before the probed one from the all-dense
    reference run instead of recomputing it: the curves are bit for bit those of full forwards,
    and the attention modules of those layers run fewer times."""
    from moefx.convert.calibrate import Inputs, model_curves

    cfg = XMoEConfig(num_experts=6, num_shared=1, threshold=0.9, router="fitted")
    model, _ = converted(cfg)
    layers = moe_layers(model)
    with torch.no_grad():
        for layer in layers.values():
            layer.router.weight.normal_()
    attn = [m for n, m in model.named_modules() if n.endswith("self_attn")]
    assert len(attn) == len(layers) >= 2
    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in attn]
    probe = [Inputs.of(b) for b in batches(2, seed=5)]
    inputs = {n: torch.randn(64, layers[n].d_model) for n in layers}
    runs = {}
    for replay in (False, True):
        calls.clear()
        runs[replay] = (model_curves(model, layers, probe, inputs, target=0.6, spread=0.2, replay=replay), len(calls))
    for h in hooks:
        h.remove()
    assert runs[True][0] == runs[False][0]
    n, probes = len(layers), 2 * len(probe)  # two ratios per layer, each on every probe row
    assert runs[False][1] == len(probe) * n + n * probes * n
    assert runs[True][1] == len(probe) * n + probes * sum(n - i for i in range(n))  # layer i replays i blocks


def test_block_replay_answers_only_identical_inputs_and_hands_out_copies():
    """A block is answered from the record only when every tensor it receives equals the
    recorded one; otherwise it computes. A replayed output can be changed in place without
    touching the record; a block run twice in one forward (shared weights) or changing its input
    in place is never replayed; a block's own hooks run once either way."""
    from moefx.convert.replay import BlockReplay, block_names

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    assert block_names(model, ["0", "2", "3"]) == {"0": "0", "2": "2", "3": "3"}
    replay = BlockReplay(model, ["0", "2", "3"])
    x = torch.randn(3, 4)
    with torch.no_grad():
        with replay.recording(0):
            ref = model(x)
        assert replay.before("3") == ["0", "2"] and replay.before("0") == []
        with replay.replaying(0, "3"):
            got = model(x)
            assert torch.equal(got, ref) and (replay.hits, replay.misses) == (2, 0)
            got.add_(1.0)
            assert torch.equal(model(x), ref)  # the record was not changed through the copy
            y = torch.randn(3, 4)
            assert torch.equal(model(y), model[3](model[2](model[1](model[0](y)))))  # block 0 computes
            assert replay.misses >= 1
        assert "forward" not in model[0].__dict__  # the blocks' own forwards are back

    shared = torch.nn.Linear(4, 4)
    twice = torch.nn.ModuleList([shared, torch.nn.Linear(4, 4)])

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = twice

        def forward(self, v):
            return self.blocks[1](self.blocks[0](self.blocks[0](v)))

    m = Twice()
    replay = BlockReplay(m, ["blocks.0", "blocks.1"])
    with torch.no_grad(), replay.recording(0):
        m(x)
    assert replay.before("blocks.1") == []

    class AddInPlace(torch.nn.Module):  # a block that changes its input: replaying it would not
        def forward(self, v):
            return v.add_(1.0)

    inplace = torch.nn.Sequential(AddInPlace(), torch.nn.Linear(4, 4))
    replay = BlockReplay(inplace, ["0", "1"])
    with torch.no_grad(), replay.recording(0):
        inplace(x.clone())
    assert replay.before("1") == []

    # a hook on a block runs once whether the block computes or is replayed
    hooked = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    hooked[0].register_forward_hook(lambda mod, args, out: out * 2.0)
    replay = BlockReplay(hooked, ["0", "1"])
    with torch.no_grad():
        with replay.recording(0):
            ref = hooked(x)
        with replay.replaying(0, "1"):
            assert torch.equal(hooked(x), ref) and replay.hits == 1


def test_probe_rows_spread_over_all_batches():
    """The probe of budgets="model" takes whole rows from across the calibration batches, not the
    first ones (the start of a text can be unlike the rest of it)."""
    from moefx.convert.calibrate import probe_rows

    data = [torch.full((4, 8), i) for i in range(6)]  # batch i holds token id i; 4 rows of 8 tokens each
    rows = probe_rows(data, max_tokens=32)
    assert len(rows) == 4 and all(r.tensors()[0].shape == (1, 8) for r in rows)
    assert [int(r.tensors()[0][0, 0]) for r in rows] == [0, 2, 3, 5]  # rows 0, 8, 15, 23 of 24: first, last, evenly between
    assert len(probe_rows(data, max_tokens=10_000)) == 24
    kw = [{"input_ids": torch.full((2, 8), i)} for i in range(3)]
    assert [int(r.kwargs["input_ids"][0, 0]) for r in probe_rows(kw, max_tokens=24)] == [0, 1, 2]


def test_model_budgets_fit_routers_without_the_probe_batch_then_on_every_token(monkeypatch):
    """budgets="model" probes the last calibration batch with routers fit without it (a router
    looks better on its own fitting tokens), then refits every router on all the tokens, adding
    only the held batch to the least-squares sums of the first fit."""
    import importlib

    cal = importlib.import_module("moefx.convert.calibrate")
    seen = []
    real = cal._fit

    def spy(layer, x, norms, steps, sums=None):
        real(layer, x, norms, steps, sums)
        seen.append((x.shape[0], sums.tokens if sums is not None else None))

    monkeypatch.setattr(cal, "_fit", spy)
    cfg = XMoEConfig(num_experts=6, num_shared=1, threshold=0.9, router="fitted")
    model, _ = converted(cfg)
    n_layers = len(moe_layers(model))
    rep = moefx.calibrate(model, batches(4), target_ratio=0.6, verbose=False, progress=False, budgets="model")
    total, held = 4 * 2 * 16, 2 * 16  # 4 batches of 2 x 16 tokens; the last one is the probe
    assert seen == [(total - held, total - held)] * n_layers + [(held, total)] * n_layers
    assert all(r.tokens == total for r in rep.layers)


def test_a_router_fit_in_two_parts_equals_one_fit_on_all_tokens():
    """fit_router's least-squares sums carried from one call to the next give the same router
    as one fit on both token sets (what budgets="model"'s refit relies on)."""
    from moefx.convert.router import LeastSquares, fit_router

    cfg = XMoEConfig(num_experts=6, num_shared=1, threshold=0.9, router="fitted")
    model, _ = converted(cfg)
    layer = next(iter(moe_layers(model).values()))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(96, layer.d_model, generator=g)
    norms = torch.rand(96, 6, generator=g) + 0.01
    fit_router(layer, x, norms, steps=0)
    whole = layer.router.weight.detach().clone()
    sums = LeastSquares()
    fit_router(layer, x[:60], norms[:60], steps=0, sums=sums)
    part = layer.router.weight.detach().clone()
    fit_router(layer, x[60:], norms[60:], steps=0, sums=sums)
    assert sums.tokens == 96 and not torch.allclose(part, whole, atol=1e-4)
    torch.testing.assert_close(layer.router.weight, whole, rtol=1e-5, atol=1e-6)


def test_threshold_for_lifts_t_only_where_it_cannot_keep_the_share():
    from moefx.convert.functional import THRESHOLD_HEADROOM, threshold_for

    cfg = XMoEConfig(num_experts=16, threshold=0.9)
    assert threshold_for(cfg, 0.5) == 0.9
    assert threshold_for(cfg, 0.9 - THRESHOLD_HEADROOM) == 0.9
    assert abs(threshold_for(cfg, 0.94) - 0.97) < 1e-12  # halfway to 1
    assert threshold_for(cfg, 1.0) == 0.99
    assert threshold_for(XMoEConfig(num_experts=16, threshold=None, top_k=4), 0.95) is None
    assert threshold_for(XMoEConfig(num_experts=16, threshold=1.0), 0.95) == 1.0



@pytest.mark.parametrize("shape,blocks", [((50, 300), 4), ((7, 257), 3), ((40, 513), 5), ((30, 64), 4), ((9, 300), 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gram_matrix_is_xtx_from_its_upper_block_triangle(shape, blocks, dtype):
    from moefx.convert.functional import gram_matrix

    x = torch.randn(shape, generator=torch.Generator().manual_seed(shape[1]), dtype=dtype)
    g = gram_matrix(x, blocks)
    want = x.t() @ x
    torch.testing.assert_close(g, want)
    n = shape[1]
    if blocks > 1 and n >= 256:  # the blocks below the diagonal are the mirrored ones above it
        cut = round(n / blocks)
        assert torch.equal(g[cut:, :cut], g[:cut, cut:].t())


def test_sample_rows_draws_each_index_with_its_own_rows_probability():
    """The Fisher pass's sampler: each row's index drawn with that row's probabilities, never
    one of probability 0, always in range (rows that sum a little off 1 included)."""
    from moefx.convert.calibrate import sample_rows

    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.0, 0.2, 0.3, 0.0])
    n = 40000
    words = sample_rows(p.repeat(n, 1), g)
    freq = torch.bincount(words, minlength=5).double() / n
    assert freq[1] == 0 and freq[4] == 0
    torch.testing.assert_close(freq, p.double(), atol=0.01, rtol=0)
    one_hot = torch.eye(7)[torch.randperm(7, generator=g)]  # row i certain of one index
    assert torch.equal(sample_rows(one_hot.clone() * 0.97, g), one_hot.argmax(-1))
    probs = torch.softmax(torch.randn(64, 1000, generator=g) * 5, -1) * 1.001
    words = sample_rows(probs.clone(), g)
    assert words.shape == (64,) and int(words.min()) >= 0 and int(words.max()) < 1000
    assert bool((probs.gather(1, words[:, None]) > 0).all())


def test_activation_store_peek_leaves_what_take_then_returns():
    """peek (the routers' pass) gives the recorded rows, spilled and in memory alike, without
    writing anything back; take (the layer-wise fit) then gives the same and clears them."""
    import os

    from moefx.convert.calibrate import ActivationStore

    st = ActivationStore(["a", "b"], spill_bytes=600)  # 160 bytes a tensor: spills every 4 adds
    xs = [torch.randn(10, 4) for _ in range(5)]
    try:
        for x in xs:
            st.add("a", x)
            st.add("b", -x)
        files = list(st.files["a"])
        assert files and st.mem["a"]  # some on disk, some in memory
        for _ in range(2):
            assert torch.equal(st.peek("a"), torch.cat(xs))
        assert st.files["a"] == files and all(os.path.exists(f) for f in files)
        assert torch.equal(st.take("a"), torch.cat(xs))
        assert not st.files["a"] and not any(os.path.exists(f) for f in files)
        assert st.peek("a").numel() == 0
        assert torch.equal(st.take("b"), -torch.cat(xs))
    finally:
        st.close()


def test_spd_solve_matches_a_general_solve_and_falls_back_where_not_positive_definite():
    from moefx.convert.functional import spd_solve

    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=g, dtype=torch.float64)
    a = x.t() @ x + 0.1 * torch.eye(8, dtype=torch.float64)
    b = torch.randn(8, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(spd_solve(a, b), torch.linalg.solve(a, b))
    indefinite = torch.diag(torch.tensor([2.0, -1.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(spd_solve(indefinite, b[:3]), torch.linalg.solve(indefinite, b[:3]))


def test_least_squares_sums_in_float32_chunks_equal_float64_sums():
    from moefx.convert.router import CHUNK, LeastSquares

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2 * CHUNK + 300, 12, generator=g) + 0.5
    y = torch.randn(2 * CHUNK + 300, 5, generator=g)
    sums = LeastSquares()
    sums.add(x[:1000], y[:1000])
    sums.add(x[1000:], y[1000:])  # more than one chunk
    xd, yd = x.double(), y.double()
    assert sums.tokens == x.shape[0] and sums.gram.dtype == torch.float64
    # float32 rounding is relative to the sums of |products|, not to the (cancelling) sums
    torch.testing.assert_close(sums.gram, xd.t() @ xd, rtol=0, atol=1e-6 * float((xd.abs().t() @ xd.abs()).max()))
    torch.testing.assert_close(sums.xty, xd.t() @ yd, rtol=0, atol=1e-6 * float((xd.abs().t() @ yd.abs()).max()))
