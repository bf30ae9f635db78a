"""End-to-end distillation after layer-wise calibration (moefx.convert.distill): the sparse KL
is the KL it claims to be, distillation brings the converted model's outputs closer to the
dense model's, trains only the experts (or, when asked, every block parameter outside the
embeddings), and leaves the model as it found it otherwise."""
import copy

import pytest
import torch

import moefx
from moefx.config import SliceMoEConfig, XMoEConfig
from moefx.convert.calibrate import Inputs, moe_layers
from moefx.convert.distill import Target, distill, sparse_kl, teacher_target

from zoo import ZOO


def batches(n, seq=16, vocab=64, seed=0, rows=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (rows, seq), generator=g) for _ in range(n)]


def calibrated_llama(rescale: bool = True):
    """The zoo's Llama (eval mode) and a copy converted to XMoE (6 routed + 1 shared experts,
    fitted routers) and calibrated layer-wise to a ratio of 0.5."""
    dense, inputs, kwargs = ZOO["llama"]()
    dense.eval()
    cfg = XMoEConfig(num_experts=6, num_shared=1, threshold=0.9, router="fitted")
    model = moefx.convert(copy.deepcopy(dense), cfg, inputs, kwargs, calibration_batches=batches(2))
    moefx.calibrate(model, batches(4), target_ratio=0.5, verbose=False, progress=False, rescale=rescale)
    return dense, model


def full_kl(student_logits, teacher_logits):
    lt = torch.log_softmax(teacher_logits.double(), -1)
    ls = torch.log_softmax(student_logits.double(), -1)
    return float((lt.exp() * (lt - ls)).sum(-1).mean())


def mean_kl(model, dense, inputs):
    with torch.no_grad():
        return sum(full_kl(model(b).logits, dense(b).logits) for b in inputs) / len(inputs)


def test_sparse_kl_is_the_kl_of_the_coarsened_distributions():
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(3, 5, 40, generator=g) * 2
    student = torch.randn(3, 5, 40, generator=g) * 2
    # top-39 of 40 words: the "rest" bucket is the one word left, so the sparse KL is the full KL
    t = teacher_target(type("Out", (), {"logits": teacher})(), topk=39)
    assert t.values.shape == (3, 5, 39) and t.dense is None
    assert abs(float(sparse_kl(student, t)) - full_kl(student, teacher)) < 1e-5
    # fewer words: still a divergence (>= 0, 0 at the teacher itself) and at most the full KL
    t8 = teacher_target(type("Out", (), {"logits": teacher})(), topk=8)
    coarse = float(sparse_kl(student, t8))
    assert 0 < coarse <= full_kl(student, teacher) + 1e-6
    assert abs(float(sparse_kl(teacher, t8))) < 1e-5


def test_plain_tensor_outputs_are_matched_by_relative_squared_error():
    y = torch.randn(4, 8)
    t = teacher_target(y, topk=4)
    assert t.values is None and torch.equal(t.dense, y)
    from moefx.convert.distill import distill_loss

    assert float(distill_loss(y, t)) == 0.0
    assert abs(float(distill_loss(2 * y, t)) - 1.0) < 1e-6


def test_unknown_output_is_a_clear_error():
    with pytest.raises(TypeError, match="distill_steps=0"):
        teacher_target({"a": 1}, topk=4)


def test_distillation_brings_the_model_closer_to_dense_and_trains_only_experts():
    dense, inputs, kwargs = ZOO["llama"]()
    dense.eval()
    cfg = XMoEConfig(num_experts=6, num_shared=1, threshold=0.9, router="fitted")
    model = moefx.convert(copy.deepcopy(dense), cfg, inputs, kwargs, calibration_batches=batches(2))
    held_out = batches(3, seed=7)
    plain = copy.deepcopy(model)
    # rescale=False: the final in-model rescale would move the routers (tested on its own)
    moefx.calibrate(plain, batches(4), target_ratio=0.5, verbose=False, progress=False, rescale=False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    rep = moefx.calibrate(model, batches(4), target_ratio=0.5, verbose=False, progress=False,
                          distill_steps=40, distill_batches=batches(40, seed=3), distill_lr=3e-3, rescale=False)
    d = rep.distill
    assert d.steps == 40 and d.tokens == 40 * 2 * 16
    assert d.loss_last < d.loss_first
    assert d.held_out == 2 and d.held_out_after < d.held_out_before
    assert mean_kl(model, dense, held_out) < mean_kl(plain, dense, held_out)
    # only expert weights moved: routers, attention, norms and embeddings are the calibrated ones
    after, before = dict(model.named_parameters()), dict(plain.named_parameters())
    moved = {n for n in after if not torch.equal(after[n], before[n])}
    assert moved and all(".mlp." in n and ".router." not in n for n in moved), sorted(moved)[:5]
    # the model is left as it was found: flags, forwards, eval mode, no grads
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all("forward" not in m.__dict__ for m in moe_layers(model).values())
    assert all(p.grad is None for p in model.parameters())
    assert "distillation: 40 steps" in rep.table() and "2 held-out batches" in rep.table()


def test_distillation_defaults_to_the_calibration_batches_and_honours_the_time_limits():
    dense, inputs, kwargs = ZOO["llama"]()
    model = moefx.convert(dense, XMoEConfig(num_experts=4, threshold=0.9), inputs, kwargs,
                          calibration_batches=batches(2))
    rep = moefx.calibrate(model, batches(3), target_ratio=0.6, verbose=False, progress=False,
                          distill_steps=1000, distill_seconds=0.0)
    assert rep.distill.steps == 0
    rep = moefx.calibrate(model, batches(3), target_ratio=0.6, verbose=False, progress=False,
                          distill_steps=1000, budget_seconds=0.0)
    assert rep.distill.steps == 0 and len(rep.layers) == 2 and rep.layers[0].ratio_after < 0.9
    rep = moefx.calibrate(model, batches(3), target_ratio=0.6, verbose=False, progress=False, distill_steps=5,
                          budget_seconds=600)
    assert rep.distill.steps == 5 and rep.distill.tokens == 5 * 2 * 16


def test_slicemoe_layers_distill_too():
    dense, inputs, kwargs = ZOO["llama"]()
    dense.eval()
    model = moefx.convert(copy.deepcopy(dense), SliceMoEConfig(num_slices=4, num_experts=8, top_k=2), inputs, kwargs,
                          calibration_batches=batches(2))
    rep = moefx.calibrate(model, batches(3), steps=10, verbose=False, progress=False,
                          distill_steps=30, distill_batches=batches(30, seed=5), distill_lr=3e-3)
    assert rep.distill.loss_last < rep.distill.loss_first


def test_distill_without_examples_or_steps_does_nothing():
    dense, inputs, kwargs = ZOO["llama"]()
    model = moefx.convert(dense, XMoEConfig(num_experts=4, threshold=0.9), inputs, kwargs,
                          calibration_batches=batches(2))
    before = copy.deepcopy(model.state_dict())
    assert distill(model, [], steps=10).steps == 0
    assert distill(model, [(batches(1)[0], Target(dense=torch.zeros(1)))], steps=0).steps == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_hidden_state_outputs_distill_by_relative_error():
    from transformers.modeling_outputs import BaseModelOutput

    from moefx.data import output_tensor

    h = torch.randn(2, 3, 4)
    t, is_logits = output_tensor(BaseModelOutput(last_hidden_state=h))
    assert t is h and not is_logits
    assert teacher_target(BaseModelOutput(last_hidden_state=h), topk=2).dense is not None


def test_prob_combine_layers_train_through_their_own_forward():
    """masked_forward is the unit-combine output only: a layer combining by probability must
    keep its own forward during distillation, and still get closer to the dense model."""
    dense, inputs, kwargs = ZOO["llama"]()
    dense.eval()
    model = moefx.convert(copy.deepcopy(dense), XMoEConfig(num_experts=4, threshold=0.9, combine="prob"), inputs,
                          kwargs, calibration_batches=batches(2))
    seen = []
    for layer in moe_layers(model).values():
        layer.register_forward_hook(lambda m, a, o: seen.append("forward" in m.__dict__))
    rep = moefx.calibrate(model, batches(3), target_ratio=0.6, verbose=False, progress=False,
                          distill_steps=20, distill_batches=batches(20, seed=4), distill_lr=3e-3)
    assert seen and not any(seen[-4:])  # the layers' own forward ran during distillation
    assert rep.distill.loss_last < rep.distill.loss_first


def test_training_blocks_moves_attention_and_norms_but_not_embeddings_or_routers():
    dense, model = calibrated_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        examples = [(Inputs.of(b), teacher_target(dense(b), 64)) for b in batches(8, seed=5)]
    d = distill(model, examples,
                steps=8, lr=3e-3, progress=False, train="blocks")
    assert d.steps == 8
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(".self_attn." in n for n in moved) and any("norm" in n for n in moved)
    assert any(".mlp." in n and ".router." not in n for n in moved)
    assert not any("embed" in n or "lm_head" in n or ".router." in n for n in moved), sorted(moved)
    with pytest.raises(ValueError, match="train='everything'"):
        distill(model, examples, steps=1, train="everything")


def test_training_blocks_down_keeps_the_up_and_gate_projections_and_still_learns():
    """``train="blocks-down"``: every block parameter ``blocks`` trains except the converted
    layers' up and gate projections (routed and shared), which keep their values bit for bit;
    the down projections, attention and norms move, and the model gets closer to the dense one."""
    from moefx.convert.distill import UP_PROJECTIONS

    dense, plain = calibrated_llama(rescale=False)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # down projections away from their fit: an error that only they can take back
        for layer in moe_layers(plain).values():
            for w in (layer.w2, layer.shared_w2):
                w.add_(torch.randn(w.shape, generator=g) * 3 * w.std())
        examples = [(Inputs.of(b), teacher_target(dense(b), 64)) for b in batches(40, seed=3)]
    model = copy.deepcopy(plain)
    d = distill(model, examples, steps=40, lr=1e-3, progress=False, train="blocks-down")
    assert d.steps == 40
    before = dict(plain.named_parameters())
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    up = {f"{name}.{attr}" for name, layer in moe_layers(model).items() for attr in UP_PROJECTIONS
          if isinstance(getattr(layer, attr, None), torch.Tensor)}
    assert {n.rsplit(".", 1)[-1] for n in up} >= {"w1", "w3", "shared_w1", "shared_w3"}  # a GLU with shared experts
    assert not moved & up, sorted(moved & up)
    assert any(n.endswith(".w2") for n in moved) and any(n.endswith(".shared_w2") for n in moved)
    assert any(".self_attn." in n for n in moved) and any("norm" in n for n in moved)
    assert not any("embed" in n or "lm_head" in n or ".router." in n for n in moved), sorted(moved)
    held_out = batches(3, seed=7)
    assert mean_kl(model, dense, held_out) < 0.7 * mean_kl(plain, dense, held_out)


def test_teacher_outputs_recorded_after_the_layer_wise_fit_are_the_dense_models():
    """Distillation batches are recorded after calibration with the pre-calibration weights
    swapped back in: what they record is the dense model's output, and the calibrated weights
    are back afterwards."""
    from moefx.convert.calibrate import dense_mode, swapped_weights
    from moefx.convert.distill import record_teachers

    dense, inputs, kwargs = ZOO["llama"]()
    dense.eval()
    model = moefx.convert(copy.deepcopy(dense), XMoEConfig(num_experts=4, num_shared=1, threshold=0.9),
                          inputs, kwargs, calibration_batches=batches(2))
    layers = moe_layers(model)
    originals = {n: [p.detach().clone() for p in m.parameters()] for n, m in layers.items()}
    moefx.calibrate(model, batches(3), target_ratio=0.5, verbose=False, progress=False)
    probe = batches(3, seed=9)
    with torch.no_grad():
        calibrated = [model(b).logits for b in probe]
        assert not torch.allclose(calibrated[0], dense(probe[0]).logits, atol=1e-4)
        with swapped_weights(layers, originals), dense_mode(layers):
            recorded = record_teachers(model, probe, topk=8, progress=False)
        for (_, target), b in zip(recorded, probe):
            ref = teacher_target(dense(b), 8)
            torch.testing.assert_close(target.values, ref.values, rtol=1e-5, atol=1e-5)
            assert torch.equal(target.index, ref.index)
        for b, y in zip(probe, calibrated):
            assert torch.equal(model(b).logits, y)


def test_teacher_recording_stops_at_the_batch_and_time_limits():
    from moefx.convert.distill import record_teachers

    dense, _, _ = ZOO["llama"]()
    dense.eval()
    assert len(record_teachers(dense, batches(6), topk=4, progress=False, max_batches=3)) == 3
    assert len(record_teachers(dense, batches(6), topk=4, progress=False, seconds=0.0)) == 2
    assert len(record_teachers(dense, batches(6), topk=4, progress=False, seconds=60.0)) == 6


def test_learning_rate_warms_up_then_decays_to_its_floor_by_steps_or_time():
    from moefx.convert.distill import FINAL_LR, WARMUP_STEPS, lr_factor

    rates = [lr_factor(s, 100, 0.0, None) for s in range(100)]
    assert rates[0] == pytest.approx(1 / WARMUP_STEPS)
    assert max(rates) == pytest.approx(rates[WARMUP_STEPS - 1], rel=1e-2) and max(rates) <= 1.0
    assert all(a >= b for a, b in zip(rates[WARMUP_STEPS:], rates[WARMUP_STEPS + 1:]))
    assert lr_factor(100, 100, 0.0, None) == pytest.approx(FINAL_LR)
    # a time limit reached before the step count ends the schedule just as well
    assert lr_factor(10, 100, 30.0, 30.0) == pytest.approx(FINAL_LR)
    assert lr_factor(10, 100, 15.0, 30.0) == pytest.approx(FINAL_LR + (1 - FINAL_LR) * 0.5)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_the_schedule_sets_the_rate_of_each_step(schedule, monkeypatch):
    """Each Adam step runs at lr x lr_factor(step) with the cosine schedule, at lr with the
    constant one; an unknown schedule is refused before any step."""
    from moefx.convert import distill as distill_mod

    dense, inputs, kwargs = ZOO["llama"]()
    dense.eval()
    model = moefx.convert(copy.deepcopy(dense), XMoEConfig(num_experts=4, threshold=0.9), inputs, kwargs,
                          calibration_batches=batches(2))
    examples = [(Inputs.of(b), teacher_target(dense(b), 8)) for b in batches(6, seed=2)]
    seen = []
    real_step = torch.optim.Adam.step

    def step(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    rep = distill(model, examples, steps=6, lr=1e-3, schedule=schedule, progress=False)
    assert rep.steps == 6 and len(seen) == 6
    if schedule == "constant":
        assert seen == [1e-3] * 6
    else:
        want = [1e-3 * distill_mod.lr_factor(s, 6, 0.0, None) for s in range(6)]
        assert seen == pytest.approx(want, rel=1e-6)
        assert seen[0] < seen[3] and seen[-1] < seen[3]
    with pytest.raises(ValueError, match="schedule='linear'"):
        distill(model, examples, steps=2, schedule="linear", progress=False)


def in_model_ratio(model, inputs_list):
    """Mean activation ratio (shared groups included) of the XMoE layers, counted by the
    layers' own routing while the model runs ``inputs_list``."""
    layers = moe_layers(model)
    with moefx.metrics.collect(model) as stats:
        with torch.no_grad():
            for b in inputs_list:
                model(b)
    ratios = [(stats[n].activation_ratio * l.config.num_experts + l.config.num_shared)
              / (l.config.num_experts + l.config.num_shared) for n, l in layers.items()]
    return sum(ratios) / len(ratios)


def test_final_rescale_meets_the_ratio_on_the_converted_models_own_inputs():
    """Distillation that trains the blocks moves every layer's inputs, so the scale set on the
    dense model's activations no longer gives the asked ratio; the final rescale (default)
    sets it on the converted model's own inputs, and the report says what each layer keeps there."""
    dense, inputs, kwargs = ZOO["llama"]()
    dense.eval()
    cfg = XMoEConfig(num_experts=16, num_shared=2, threshold=0.9, router="fitted")
    cal = batches(4, rows=8)
    reports = {}
    for rescale in (False, True):
        model = moefx.convert(copy.deepcopy(dense), cfg, inputs, kwargs, calibration_batches=cal[:1])
        rep = moefx.calibrate(model, cal, target_ratio=0.5, verbose=False, progress=False, distill_steps=60,
                              distill_batches=batches(60, seed=3), distill_lr=3e-2, distill_train="blocks",
                              rescale=rescale)
        reports[rescale] = (rep, in_model_ratio(model, cal))
    (plain, plain_ratio), (rescaled, ratio) = reports[False], reports[True]
    assert abs(plain_ratio - 0.5) > 0.02  # the drift the rescale is for
    assert abs(ratio - 0.5) < 0.02
    # the report's in-model ratios are what the layers kept in the rescale pass (one pass: a
    # layer's new scale shifts the later layers' inputs a little)
    assert rescaled.mean("ratio_model") == pytest.approx(ratio, abs=0.01)
    assert rescaled.mean("ratio_model") == pytest.approx(0.5, abs=0.01)
    assert all(r.ratio_model != r.ratio_model for r in plain.layers)  # NaN: not measured
    assert all(r.ratio == r.ratio_after for r in plain.layers)
    assert all(r.ratio == r.ratio_model for r in rescaled.layers)
    assert "in model" in rescaled.table() and "in model" not in plain.table()
    assert rescaled.rescale_text == "calibration" and plain.rescale_text == ""  # 448 spare tokens: too few


def test_calibration_batches_are_distillation_examples_and_their_repeats_are_not_recorded_again(monkeypatch):
    """The dense pass of calibration records the teacher outputs of the calibration batches, so
    they are distillation examples without a second forward, cut to the distillation batches'
    size; a distillation batch that repeats one of them is skipped, and only new ones are
    recorded after the layer-wise fit."""
    from moefx.convert import distill as D

    dense, inputs, kwargs = ZOO["llama"]()
    model = moefx.convert(dense, XMoEConfig(num_experts=4, threshold=0.9), inputs, kwargs,
                          calibration_batches=batches(2))
    cal, extra = batches(2, rows=4), batches(2, seed=5)
    pieces = [c[s : s + 2] for c in cal for s in (0, 2)]
    recorded, trained = [], []
    real_record, real_distill = D.record_teachers, D.distill

    def record(model, bs, *a, **k):
        bs = list(bs)
        recorded.extend(bs)
        return real_record(model, bs, *a, **k)

    def train(model, examples, **k):
        trained.extend(i.args[0] for i, _ in examples)
        return real_distill(model, examples, **k)

    monkeypatch.setattr(D, "record_teachers", record)
    monkeypatch.setattr(D, "distill", train)
    rep = moefx.calibrate(model, cal, target_ratio=0.6, verbose=False, progress=False, distill_steps=6,
                          distill_batches=[p.clone() for p in pieces[1:]] + extra)
    assert len(recorded) == 2 and all(torch.equal(r, e) for r, e in zip(recorded, extra))
    assert len(trained) == 6 and all(torch.equal(t, b) for t, b in zip(trained, pieces + extra))
    assert rep.distill.steps == 6 and rep.distill.tokens == 6 * 2 * 16
    # enough calibration examples for every step (and the held-out pair): nothing more is recorded
    recorded.clear()
    moefx.calibrate(model, batches(4), target_ratio=0.6, verbose=False, progress=False, distill_steps=2,
                    distill_batches=extra)
    assert recorded == []


def test_the_recording_rule_prices_a_step_by_what_distillation_trains(monkeypatch):
    """Under a time budget, fresh teacher batches are recorded while training each example once
    still fits; a ``blocks-down`` step is cheaper than a ``blocks`` one, and a bfloat16 step
    cheaper than a float32 one, and the rule is told so."""
    from moefx.convert import distill as D
    from moefx.convert.calibrate import BFLOAT16_STEP, TRAIN_COST

    assert TRAIN_COST["blocks-down"] < TRAIN_COST["blocks"]
    dense, inputs, kwargs = ZOO["llama"]()
    seen = []
    real_record = D.record_teachers

    def record(model, bs, *a, **k):
        seen.append(k.get("train_cost"))
        return real_record(model, bs, *a, **k)

    monkeypatch.setattr(D, "record_teachers", record)
    for mode, precision in (("blocks", "float32"), ("blocks-down", "float32"), ("blocks", "bfloat16")):
        model = moefx.convert(copy.deepcopy(dense), XMoEConfig(num_experts=4, threshold=0.9), inputs, kwargs,
                              calibration_batches=batches(2))
        moefx.calibrate(model, batches(2), target_ratio=0.6, verbose=False, progress=False, distill_steps=4,
                        distill_batches=batches(4, seed=5), distill_train=mode, budget_seconds=600,
                        distill_precision=precision)
    assert 0 < BFLOAT16_STEP < 1
    assert seen == [TRAIN_COST["blocks"], TRAIN_COST["blocks-down"], TRAIN_COST["blocks"] * BFLOAT16_STEP]


def test_split_rows_cuts_inputs_and_targets_alike_or_leaves_them_whole():
    from moefx.convert.calibrate import split_rows

    ids = torch.arange(4 * 3).reshape(4, 3)
    target = Target(values=torch.randn(4, 3, 5), index=torch.zeros(4, 3, 5, dtype=torch.int32))
    parts = split_rows(Inputs((ids,), {"attention_mask": torch.ones(4, 3)}), target, 2)
    assert len(parts) == 2
    for k, (inp, t) in enumerate(parts):
        assert torch.equal(inp.args[0], ids[2 * k : 2 * k + 2]) and inp.kwargs["attention_mask"].shape == (2, 3)
        assert torch.equal(t.values, target.values[2 * k : 2 * k + 2]) and t.dense is None
    whole = Inputs((ids,), {"position_ids": torch.arange(3).unsqueeze(0)})  # a [1, seq] input: not cut
    assert len(split_rows(whole, target, 2)) == 1
    assert len(split_rows(Inputs((ids,), {}), target, None)) == 1
    assert len(split_rows(Inputs((ids,), {}), target, 4)) == 1


def test_batch_key_tells_batches_apart_by_content():
    from moefx.convert.calibrate import batch_key

    a = torch.arange(12).reshape(2, 6)
    assert batch_key(Inputs.of(a)) == batch_key(Inputs.of(a.clone()))
    assert batch_key(Inputs.of(a)) != batch_key(Inputs.of(a + 1))
    assert batch_key(Inputs.of(a)) != batch_key(Inputs.of(a.reshape(3, 4)))
    assert batch_key(Inputs.of(a)) != batch_key(Inputs.of(a.to(torch.int32)))
    x = torch.randn(2, 3, dtype=torch.bfloat16)
    assert batch_key(Inputs.of({"x": x, "flag": True})) == batch_key(Inputs.of({"flag": True, "x": x.clone()}))
    assert batch_key(Inputs.of({"x": x, "flag": True})) != batch_key(Inputs.of({"x": x, "flag": False}))


class _Out:
    def __init__(self, logits):
        self.logits = logits


def test_text_labels_mix_the_next_token_loss_into_the_target():
    from moefx.convert.distill import distill_loss

    g = torch.Generator().manual_seed(2)
    teacher, student = torch.randn(2, 6, 10, generator=g), torch.randn(2, 6, 10, generator=g)
    ids = torch.randint(0, 10, (2, 6), generator=g)
    t = teacher_target(_Out(teacher), topk=9)
    ce = torch.nn.functional.cross_entropy(student[:, :-1].reshape(-1, 10), ids[:, 1:].reshape(-1))
    for a in (0.0, 0.25, 0.9):
        got = float(distill_loss(_Out(student), t, Inputs.of(ids), labels=a))
        assert abs(got - ((1 - a) * float(sparse_kl(student, t)) + a * float(ce))) < 1e-5
    # the ids are found among keyword inputs too; a float input of the same shape is not ids
    mask = torch.ones(2, 6)
    assert abs(float(distill_loss(_Out(student), t, Inputs((), {"attention_mask": mask, "input_ids": ids}), 0.5))
               - (0.5 * float(sparse_kl(student, t)) + 0.5 * float(ce))) < 1e-5
    with pytest.raises(ValueError, match="token ids"):
        distill_loss(_Out(student), t, Inputs.of(mask), labels=0.5)


def test_text_labels_teach_the_text_and_cost_closeness_to_the_dense_model():
    """Text that follows a rule the dense model does not know (each token is the previous one
    plus one): with labels the converted model learns the rule; without, it stays closer to
    the dense model."""
    dense, inputs, kwargs = ZOO["llama"]()
    dense.eval()

    def rule_text(n, seed):
        g = torch.Generator().manual_seed(seed)
        return [(torch.randint(0, 64, (2, 1), generator=g) + torch.arange(16)) % 64 for _ in range(n)]

    def text_loss(m, text):
        with torch.no_grad():
            return sum(float(torch.nn.functional.cross_entropy(m(b).logits[:, :-1].reshape(-1, 64),
                                                               b[:, 1:].reshape(-1))) for b in text) / len(text)

    cfg = XMoEConfig(num_experts=6, num_shared=1, threshold=0.9, router="fitted")
    base = moefx.convert(copy.deepcopy(dense), cfg, inputs, kwargs, calibration_batches=batches(2))
    moefx.calibrate(base, batches(4), target_ratio=0.6, verbose=False, progress=False, rescale=False)
    with torch.no_grad():
        examples = [(Inputs.of(b), teacher_target(dense(b), 16)) for b in rule_text(16, 1)]
    held_out = rule_text(4, 9)
    models = {}
    for labels in (0.0, 0.7):
        models[labels] = copy.deepcopy(base)
        distill(models[labels], examples, steps=30, lr=3e-3, progress=False, train="blocks", labels=labels)
    assert text_loss(models[0.7], held_out) < text_loss(models[0.0], held_out) - 0.1
    assert mean_kl(models[0.0], dense, held_out) < mean_kl(models[0.7], dense, held_out)
    with pytest.raises(ValueError, match=r"labels=1\.0"):
        distill(base, examples, steps=1, labels=1.0)
    base.train()
    with pytest.raises(ValueError, match=r"distill_labels=-0\.1"):  # before any calibration work
        moefx.calibrate(base, batches(2), target_ratio=0.6, progress=False, distill_steps=1, distill_labels=-0.1)
    with pytest.raises(ValueError, match=r"distill_train='block'.*blocks-down"):
        moefx.calibrate(base, batches(2), target_ratio=0.6, progress=False, distill_steps=1, distill_train="block")
    with pytest.raises(ValueError, match=r"distill_schedule='cos'"):
        moefx.calibrate(base, batches(2), target_ratio=0.6, progress=False, distill_steps=1, distill_schedule="cos")
    # the refused calls left nothing behind: no recording hook on a layer, the model's mode as it was
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in moe_layers(base).values())
    assert base.training


def test_router_gradient_is_each_experts_first_order_effect_on_the_loss():
    """The straight-through gate leaves the output as it was and gives each expert's probability
    the gradient <dL/dy, E_e(x)>, chosen or not, chained through the softmax to the router."""
    from moefx.convert.distill import _xmoe_train_forward
    from moefx.convert.functional import expert_hidden, router_probs

    dense, inputs, kwargs = ZOO["llama"]()
    cfg = XMoEConfig(num_experts=6, num_shared=1, threshold=0.7, router="fitted")
    model = moefx.convert(copy.deepcopy(dense.eval()), cfg, inputs, kwargs, calibration_batches=batches(2))
    layer = next(iter(moe_layers(model).values()))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, layer.d_model, generator=g)
    up = torch.randn(40, layer.d_model, generator=g)
    layer.router.weight.requires_grad_(True)
    y = _xmoe_train_forward(layer, routers=True)(x)
    assert torch.equal(y, _xmoe_train_forward(layer)(x))
    (y * up).sum().backward()
    with torch.no_grad():
        outs = torch.einsum("teh,edh->ted", expert_hidden(layer, x), layer.w2)  # every expert's output
        dp = torch.einsum("ted,td->te", outs, up)
        p = router_probs(layer, x)
        dlogits = p * (dp - (p * dp).sum(-1, keepdim=True))
    torch.testing.assert_close(layer.router.weight.grad, dlogits.t() @ x, rtol=1e-4, atol=1e-6)


def test_trained_routers_choose_better_experts_at_the_same_activation():
    """Routers scrambled after calibration, then distilled with the experts all but frozen: with
    router training the model ends closer to the dense one than without, both rescaled to the
    same ratio; the routers' lr is validated before any work."""
    from moefx.convert.calibrate import rescale_in_model

    dense, base = calibrated_llama(rescale=False)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for layer in moe_layers(base).values():
            layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=g) * layer.router.weight.std())
        examples = [(Inputs.of(b), teacher_target(dense(b), 64)) for b in batches(24, seed=5)]
    held_out = batches(4, seed=7)
    kl = {}
    for router_lr in (0.0, 0.3):
        m = copy.deepcopy(base)
        before = {n: l.router.weight.detach().clone() for n, l in moe_layers(m).items()}
        distill(m, examples, steps=40, lr=1e-9, router_lr=router_lr, progress=False)
        moved = [not torch.equal(l.router.weight, before[n]) for n, l in moe_layers(m).items()]
        assert all(moved) if router_lr else not any(moved)
        layers = moe_layers(m)
        kept = rescale_in_model(m, layers, {n: 0.5 for n in layers}, batches(4))
        assert all(abs(r - 0.5) < 0.1 for r in kept.values()), kept
        kl[router_lr] = mean_kl(m, dense, held_out)
    assert kl[0.3] < 0.8 * kl[0.0], kl
    with pytest.raises(ValueError, match=r"router_lr=-1"):
        distill(base, examples, steps=1, router_lr=-1)
    with pytest.raises(ValueError, match=r"distill_router_lr=-0\.1"):  # before any calibration work
        moefx.calibrate(base, batches(2), target_ratio=0.6, progress=False, distill_steps=1, distill_router_lr=-0.1)


def test_adam_is_fused_where_torch_has_it_and_takes_the_same_steps(monkeypatch):
    from moefx.convert import distill as distill_mod

    g = torch.Generator().manual_seed(3)
    start = [torch.randn(7, 5, generator=g), torch.randn(5, generator=g)]
    grads = [[torch.randn(t.shape, generator=g) for t in start] for _ in range(4)]

    def run(make):
        ps = [torch.nn.Parameter(t.clone()) for t in start]
        opt = make([{"params": ps}], 1e-2)
        for gs in grads:
            for p, gr in zip(ps, gs):
                p.grad = gr.clone()
            opt.step()
        return opt, ps

    fused, got = run(distill_mod.adam)
    assert fused.defaults["fused"] is True  # CPU float32: torch >= 2.4 has the fused kernel
    _, want = run(lambda groups, lr: torch.optim.Adam(groups, lr=lr))
    for a, b, s in zip(got, want, start):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert bool((a != s).all())  # every weight took the steps

    real = torch.optim.Adam

    def no_fused(groups, lr, fused=None):
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return real(groups, lr=lr)

    monkeypatch.setattr(torch.optim, "Adam", no_fused)
    plain, again = run(distill_mod.adam)
    assert not plain.defaults.get("fused")
    for a, b in zip(again, want):
        torch.testing.assert_close(a, b)


def _autograd_sparse_kl(logits, target):
    """The sparse KL written out, differentiated by autograd: what the closed form must match."""
    ls = torch.log_softmax(logits.double(), dim=-1)
    ls_top = ls.gather(-1, target.index.long())
    pt = target.values.double().exp()
    rest_t = (1.0 - pt.sum(-1)).clamp_min(1e-7)
    rest_s = (1.0 - ls_top.exp().sum(-1)).clamp_min(1e-7)
    return ((pt * (target.values.double() - ls_top)).sum(-1) + rest_t * (rest_t.log() - rest_s.log())).mean()


@pytest.mark.parametrize("topk", [1, 5, 29, 30])
def test_sparse_kl_gradient_is_autograds_through_the_written_out_kl(topk):
    g = torch.Generator().manual_seed(topk)
    teacher = torch.randn(2, 6, 30, generator=g) * 2
    target = teacher_target(type("Out", (), {"logits": teacher})(), topk=topk)
    for student in (teacher + 0.3 * torch.randn(teacher.shape, generator=g), torch.randn(2, 6, 30, generator=g) * 3):
        s = student.clone().requires_grad_()
        ref = student.double().clone().requires_grad_()
        loss = sparse_kl(s, target)
        want = _autograd_sparse_kl(ref, target)
        (3.0 * loss).backward()
        (3.0 * want).backward()
        assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-4, abs=1e-6)
        torch.testing.assert_close(s.grad.double(), ref.grad, rtol=1e-4, atol=1e-7)
    # the student's rest floored (the top-k hold all its mass): that term has no gradient, as under clamp
    peaked = torch.full((1, 1, 30), -30.0)
    peaked[..., target.index[0, 0].long()] = 10.0
    s, ref = peaked.clone().requires_grad_(), peaked.double().clone().requires_grad_()
    sparse_kl(s, Target(values=target.values[:1, :1], index=target.index[:1, :1])).backward()
    _autograd_sparse_kl(ref, Target(values=target.values[:1, :1], index=target.index[:1, :1])).backward()
    torch.testing.assert_close(s.grad.double(), ref.grad, rtol=1e-4, atol=1e-7)


def test_down_projections_train_flat_and_end_as_if_trained_in_place(monkeypatch):
    """The XMoE down projections ``w2 [E, d, h]`` train as one ``[d, E * h]`` parameter (no
    strided copy per step) and are written back at the end: the same weights as training ``w2``
    itself, and nothing of the flat copy is left on the model."""
    from moefx.convert import distill as distill_mod

    dense, model = calibrated_llama()
    with torch.no_grad():
        examples = [(Inputs.of(b), teacher_target(dense(b), 64)) for b in batches(6, seed=5)]
    in_place = copy.deepcopy(model)
    names = {n for n, _ in model.named_parameters()}
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = []
    real = distill_mod._flat_down_projections
    monkeypatch.setattr(distill_mod, "_flat_down_projections", lambda *a: seen.append(real(*a)) or seen[-1])
    distill(model, examples, steps=6, lr=3e-3, progress=False, train="blocks", router_lr=1e-3)
    assert sorted(seen[0]) == sorted(moe_layers(model))  # every layer's w2 trained flat
    monkeypatch.setattr(distill_mod, "_flat_down_projections", lambda *a: {})
    distill(in_place, examples, steps=6, lr=3e-3, progress=False, train="blocks", router_lr=1e-3)
    got, want = dict(model.named_parameters()), dict(in_place.named_parameters())
    assert set(got) == names
    for n in names:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6, msg=n)
    assert all(not torch.equal(got[n], start[n]) for n in names if n.endswith(".w2")), "w2 did not train"


def test_teachers_are_recorded_while_the_time_left_trains_every_example_once(monkeypatch):
    """With a training cost, the time limit covers recording and one pass of training: a batch
    is recorded only if, at the recording's own measured cost per token, the time left after it
    still trains it and everything held before it."""
    from moefx.convert import distill as distill_mod
    from moefx.convert.distill import record_teachers, worth_recording

    # 1 s per 100 tokens recorded, training 3x that: 10 s recorded 1000 tokens; 500 held before
    assert worth_recording(100.0, 10.0, 1000, 500, 100, 3.0)  # 10 + 1 + 3 * 16 = 59
    assert not worth_recording(58.0, 10.0, 1000, 500, 100, 3.0)
    assert worth_recording(59.0, 10.0, 1000, 500, 100, 3.0)
    assert worth_recording(1.0, 0.0, 0, 10_000, 100, 3.0)  # nothing timed yet

    clock = [0.0]
    monkeypatch.setattr(distill_mod.time, "perf_counter", lambda: clock[0])
    real = distill_mod.teacher_target

    def timed(out, topk):  # each batch of 2 x 16 = 32 tokens takes 1 s to record
        clock[0] += 1.0
        return real(out, topk)

    monkeypatch.setattr(distill_mod, "teacher_target", timed)
    dense, _, _ = ZOO["llama"]()
    dense.eval()
    # n batches: n s of recording + 3 s per batch of training (n + 2 held) <= 40 s -> n <= 8.5
    got = record_teachers(dense, batches(20), topk=4, progress=False, seconds=40.0, train_cost=3.0, trained_tokens=64)
    assert len(got) == 8
    clock[0] = 0.0
    assert len(record_teachers(dense, batches(20), topk=4, progress=False, seconds=5.0, train_cost=3.0)) == 2  # the floor
    clock[0] = 0.0
    assert len(record_teachers(dense, batches(20), topk=4, progress=False, seconds=40.0)) == 20  # no cost: time alone


def test_final_rescale_runs_the_masked_path_and_sets_the_scales_the_layers_own_forward_would(monkeypatch):
    """rescale_in_model records the layers' inputs through the masked dense path (faster on a CPU
    than the grouped op for experts of a few neurons): the layers' own forward is not called,
    every forward is put back, and the scales are those a pass through the op gives."""
    from moefx.convert import distill as distill_mod
    from moefx.convert.calibrate import rescale_in_model
    from moefx.layers import XMoE

    dense, inputs, kwargs = ZOO["llama"]()
    dense.eval()
    cfg = XMoEConfig(num_experts=16, num_shared=2, threshold=0.9, router="fitted")
    cal = batches(4, rows=8)
    base = moefx.convert(copy.deepcopy(dense), cfg, inputs, kwargs, calibration_batches=cal[:1])
    moefx.calibrate(base, cal, target_ratio=0.5, verbose=False, progress=False, rescale=False)
    calls = []
    own = XMoE.forward
    monkeypatch.setattr(XMoE, "forward", lambda self, x: (calls.append(1), own(self, x))[1])
    kept = {}
    for path in ("masked", "op"):
        if path == "op":
            monkeypatch.setattr(distill_mod, "masked_layers", lambda layers: [])
        m = copy.deepcopy(base)
        layers = moe_layers(m)
        kept[path] = (m, rescale_in_model(m, layers, {n: 0.6 for n in layers}, cal))
        assert all("forward" not in layer.__dict__ for layer in layers.values())
        assert bool(calls) == (path == "op")
    (fast, k_fast), (slow, k_slow) = kept["masked"], kept["op"]
    assert k_fast == pytest.approx(k_slow, abs=0.01) and all(abs(r - 0.6) < 0.05 for r in k_fast.values())
    for a, b, c in zip(moe_layers(fast).values(), moe_layers(slow).values(), moe_layers(base).values()):
        assert not torch.equal(a.router.weight, c.router.weight)  # rescaled from 0.5 to 0.6
        torch.testing.assert_close(a.router.weight, b.router.weight, rtol=1e-3, atol=0)


def test_final_rescale_runs_on_held_out_distillation_text_where_there_is_enough(monkeypatch):
    """The final rescale sets the scales on distillation batches that nothing was fit or trained
    on (those never recorded as teachers), so the ratio holds on new text; with too few such
    tokens it falls back to the calibration batches."""
    import importlib

    cal_mod = importlib.import_module("moefx.convert.calibrate")  # the package's name is the function
    monkeypatch.setattr(cal_mod, "RESCALE_TOKENS", 256)
    seen = []
    real = cal_mod.rescale_in_model
    monkeypatch.setattr(cal_mod, "rescale_in_model", lambda m, lay, r, b, **k: (seen.append(b), real(m, lay, r, b, **k))[1])
    dense, inputs, kwargs = ZOO["llama"]()
    dense.eval()
    cfg = XMoEConfig(num_experts=16, num_shared=2, threshold=0.9, router="fitted")
    cal, dist = batches(1), batches(40, seed=3)  # 1 calibration example; 40 x 32 distillation tokens
    model = moefx.convert(copy.deepcopy(dense), cfg, inputs, kwargs, calibration_batches=cal)
    rep = moefx.calibrate(model, cal, target_ratio=0.5, verbose=False, progress=False, distill_steps=10,
                          distill_batches=dist, distill_lr=1e-3)
    assert rep.rescale_text == "held-out" and "(on held-out text)" in rep.table()
    assert len(seen[0]) == 40 - 11 and all(a is b for a, b in zip(seen[0], dist[11:]))  # 11 recorded: 10 + 2 - 1
    assert in_model_ratio(model, seen[0]) == pytest.approx(0.5, abs=0.02)
    small = moefx.convert(copy.deepcopy(dense), cfg, inputs, kwargs, calibration_batches=cal)
    rep = moefx.calibrate(small, cal, target_ratio=0.5, verbose=False, progress=False, distill_steps=10,
                          distill_batches=dist[:18], distill_lr=1e-3)  # 7 spare batches: 224 tokens
    assert rep.rescale_text == "calibration" and len(seen[-1]) == 1 and seen[-1][0] is cal[0]


def test_bfloat16_distillation_runs_under_autocast_with_float32_weights_selection_and_loss(monkeypatch):
    """precision="bfloat16": the blocks' products run in bfloat16 (autocast on during the
    forward), the routers choose in float32, the weights stay float32, and the model learns about
    as much as in float32; unknown precisions are refused before any work."""
    from moefx.convert import distill as D

    dense, base = calibrated_llama(rescale=False)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in moe_layers(base).values():  # something to learn back
            layer.w2.add_(torch.randn(layer.w2.shape, generator=g) * layer.w2.std())
        examples = [(Inputs.of(b), teacher_target(dense(b), 64)) for b in batches(24, seed=5)]
    held_out = batches(4, seed=7)
    seen = {"autocast": [], "probs": []}
    attn = next(m for n, m in base.named_modules() if n.endswith("self_attn.q_proj"))
    attn.register_forward_pre_hook(lambda m, a: seen["autocast"].append(torch.is_autocast_enabled("cpu")))
    probs_of = D.router_probs

    def spy(layer, x2d):
        p = probs_of(layer, x2d)
        seen["probs"].append(p.dtype)
        return p

    monkeypatch.setattr(D, "router_probs", spy)
    kl = {}
    for precision in ("float32", "bfloat16"):
        m = copy.deepcopy(base)
        seen["autocast"].clear()
        seen["probs"].clear()
        rep = distill(m, examples, steps=30, lr=3e-3, router_lr=1e-3, progress=False,
                      precision=precision)
        assert rep.steps == 30
        # the held-out loss is measured outside autocast, the steps inside it (bfloat16 only)
        assert (True in seen["autocast"]) == (precision == "bfloat16") and False in seen["autocast"]
        assert set(seen["probs"]) == {torch.float32}
        assert all(p.dtype == torch.float32 for p in m.parameters())
        kl[precision] = mean_kl(m, dense, held_out)
    before = mean_kl(base, dense, held_out)
    assert kl["bfloat16"] < 0.7 * before, (kl, before)
    assert abs(kl["bfloat16"] - kl["float32"]) < 0.25 * kl["float32"], kl
    with pytest.raises(ValueError, match=r"precision='fp16'.*bfloat16"):
        distill(base, examples, steps=1, precision="fp16")
    with pytest.raises(ValueError, match=r"distill_precision='half'"):  # before any calibration work
        moefx.calibrate(base, batches(2), target_ratio=0.6, progress=False, distill_steps=1, distill_precision="half")


def test_auto_precision_is_bfloat16_only_where_the_device_has_fast_bfloat16(monkeypatch):
    from moefx.convert import distill as D

    cpu = torch.device("cpu")
    assert D.autocast_dtype("float32", cpu) is None and D.autocast_dtype("bfloat16", cpu) is torch.bfloat16
    for fast in (True, False):
        monkeypatch.setattr(D, "fast_bfloat16", lambda device, fast=fast: fast)
        assert D.autocast_dtype("auto", cpu) is (torch.bfloat16 if fast else None)
    monkeypatch.undo()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert not D.fast_bfloat16(cpu)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert D.fast_bfloat16(cpu)
    assert not D.fast_bfloat16(torch.device("meta"))
