"""End-to-end distillation: the converted model's MoE experts trained to reproduce the dense
model's outputs, after layer-wise calibration.

Layer-wise calibration fits each MoE layer to its own dense FFN on the dense model's
activations; each layer is left with an error (about 17% relative on SmolLM2 at 75%
activation) that compounds over 30 layers. Distillation trains all converted layers together
on what matters end to end, the model's output distribution, so later layers learn to absorb
earlier layers' errors. It is short (tens to a few hundred steps) and cheap per step:

* Only the expert weights of the converted layers train (XMoE: routed and shared experts and
  the output bias; SliceMoE: the whole layer). Everything else is frozen, and an XMoE
  layer's selection is held fixed by its router (not differentiable: ``combine="unit"``),
  unless ``router_lr`` > 0: then the routers train too, through a straight-through gate
  (:func:`_xmoe_train_forward`).
* XMoE layers with ``combine="unit"`` and no capacity limit (every converted layer by
  default) train through :func:`masked_forward` (every expert computed in two large GEMMs,
  the unchosen ones masked): the same output as the layer's grouped op, at half the cost of
  differentiating per-expert GEMMs of ~20 neurons. Other XMoE layers train through their own
  forward (the ops' autograd).
* Teacher targets are the dense model's outputs. :func:`moefx.convert.calibrate.calibrate`
  records those of the calibration batches in the dense pass that records the layers' inputs
  (no extra forward); for distillation batches of their own, it records them after the
  layer-wise fit with the converted layers' pre-calibration weights swapped back in, and only
  as many as the time budget will train on (a teacher forward costs ~1/3 of a training step). Logits are stored sparsely:
  the teacher's top-``topk`` log-probabilities per token plus the rest as one bucket, so 50k
  tokens of a 49k-word vocabulary cost ~20 MB instead of ~5 GB. The loss is the KL divergence
  of the student from the teacher over that partition (exact when the top-k hold all the mass).
  An output that is a plain tensor (no ``.logits``) is matched by relative squared error.

The learning rate is constant by default; ``schedule="cosine"`` warms it up over a few steps
and decays it to a tenth by the end of the run, the end being whichever limit comes first,
steps or seconds (:func:`lr_factor`).

Fresh text matters more than steps: on SmolLM2 (75% activation, 1.49x dense perplexity after
the layer-wise fit), 48 steps on 24k distinct tokens gave 1.37x where 60 steps cycling over 4k
tokens gave 1.43x; 96 steps on 49k tokens give 1.33x (bench/results-quality.md).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Iterable, List, Optional

import torch
from torch import nn

from ..data import output_tensor
from .functional import masked_forward, router_probs, select_mask


@dataclass
class Target:
    """What the dense model produced for one batch: sparse log-probabilities (``values``,
    ``index``: ``[..., topk]``) or, for a non-logit output, the ``dense`` tensor itself."""

    values: Optional[torch.Tensor] = None
    index: Optional[torch.Tensor] = None
    dense: Optional[torch.Tensor] = None

    @property
    def tokens(self) -> int:
        """How many tokens (positions) the target covers."""
        t = self.values if self.values is not None else self.dense
        return int(math.prod(t.shape[:-1]))


@dataclass
class DistillReport:
    steps: int = 0
    tokens: int = 0
    loss_first: float = float("nan")
    loss_last: float = float("nan")
    seconds: float = 0.0
    losses: List[float] = field(default_factory=list)
    held_out: int = 0
    held_out_before: float = float("nan")
    held_out_after: float = float("nan")

    def line(self) -> str:
        text = f"distillation: {self.steps} steps on {self.tokens} tokens"
        if self.held_out:
            text += (f", loss on {self.held_out} held-out batches {self.held_out_before:.4f} -> "
                     f"{self.held_out_after:.4f}")
        else:
            text += f", training loss {self.loss_first:.4f} -> {self.loss_last:.4f} (first/last {_WINDOW} steps)"
        return text + f", {self.seconds:.0f} s"


_WINDOW = 8
HELD_OUT_EVERY = 16
"""With at least this many examples, one in this many (at most 2) is kept out of training and
the loss on them is measured before and after: each training step sees a new batch, so the
training loss moves with the text as much as with the model."""
DISTILL_TRAIN = ("experts", "blocks", "blocks-down")
UP_PROJECTIONS = ("w1", "b1", "w3", "b3", "shared_w1", "shared_b1", "shared_w3", "shared_b3")
"""The parameters of a converted layer that ``train="blocks-down"`` leaves as they are: the
experts' up and gate projections (routed and shared) and their biases."""
DISTILL_SCHEDULES = ("constant", "cosine")
DISTILL_PRECISIONS = ("auto", "float32", "bfloat16")
"""``precision`` of :func:`distill`: ``"bfloat16"`` runs the training forward and backward under
bfloat16 autocast (matrix products in bfloat16, weights, optimizer state and loss in float32);
``"auto"`` does so where the hardware has bfloat16 matrix units (:func:`fast_bfloat16`), else
float32."""


def fast_bfloat16(device: torch.device) -> bool:
    """Whether bfloat16 matrix products are much faster than float32 ones on ``device``: a CUDA
    GPU that supports bfloat16, or a CPU with AMX tiles (Intel Sapphire Rapids on; on a 2-core
    one, a ``[512, 576] x [576, 1536]`` product ran at ~2.7 TFLOPS in bfloat16 against ~0.4 in
    float32). A CPU with only AVX-512 bfloat16 instructions gains less and is left in float32."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
        return bool(amx and amx())
    return False


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype :func:`distill` trains under for ``precision`` on ``device`` (None:
    float32, no autocast)."""
    if precision not in DISTILL_PRECISIONS:
        raise ValueError(f"distill(precision={precision!r}): use one of {', '.join(DISTILL_PRECISIONS)}")
    if precision == "bfloat16" or (precision == "auto" and fast_bfloat16(device)):
        return torch.bfloat16
    return None


@torch.no_grad()
def teacher_target(output, topk: int) -> Target:
    """The distillation target of one batch from the dense model's output."""
    try:
        t, is_logits = output_tensor(output)
    except TypeError as err:
        raise TypeError(f"distillation needs a model output with .logits or a tensor: {err}; "
                        f"pass distill_steps=0 to calibrate without it") from None
    if is_logits:  # a vocabulary of at most topk words is kept whole
        lp = torch.log_softmax(t.float(), dim=-1)
        values, index = lp.topk(min(topk, t.shape[-1]), dim=-1)
        return Target(values=values, index=index.to(torch.int32))
    return Target(dense=t.detach().float().clone())


def sparse_kl(logits: torch.Tensor, target: Target) -> torch.Tensor:
    """KL(teacher || student) over the partition {teacher's top-k words, everything else},
    averaged over tokens. Its gradient is computed in closed form (:class:`_SparseKL`)."""
    return _SparseKL.apply(logits, target.values, target.index)


_REST_FLOOR = 1e-7


class _SparseKL(torch.autograd.Function):
    """:func:`sparse_kl` with its gradient in closed form. With ``p`` the student's
    probabilities, ``P`` and ``S`` the student's and teacher's mass on the top-k, and
    ``r = rest_teacher / rest_student``, the gradient at logit ``j`` is
    ``p_j (S - r P) + [j in top-k] (r p_j - teacher_j)`` (``r`` is 0 where the student's rest
    is floored): one pass over the ``[tokens, vocab]`` logits, where autograd's chain through
    ``log_softmax`` and ``gather`` makes three and a zero-filled buffer (SmolLM2's 49k words:
    ~60 ms of a ~4 s step)."""

    @staticmethod
    def forward(ctx, logits, values, index):
        ls = torch.log_softmax(logits.float(), dim=-1)
        idx = index.long()
        ls_top = ls.gather(-1, idx)
        pt = values.exp()
        p_top = ls_top.exp()
        s_t, s_s = pt.sum(-1), p_top.sum(-1)
        rest_t = (1.0 - s_t).clamp_min(_REST_FLOOR)
        rest_s_raw = 1.0 - s_s
        rest_s = rest_s_raw.clamp_min(_REST_FLOOR)
        kl = (pt * (values - ls_top)).sum(-1) + rest_t * (rest_t.log() - rest_s.log())
        r = torch.where(rest_s_raw >= _REST_FLOOR, rest_t / rest_s, torch.zeros_like(rest_s))
        ctx.save_for_backward(ls, idx, pt, p_top, r, s_t, s_s)
        ctx.logits_dtype = logits.dtype
        return kl.mean()

    @staticmethod
    def backward(ctx, grad_out):
        ls, idx, pt, p_top, r, s_t, s_s = ctx.saved_tensors
        grad = ls.exp().mul_((s_t - r * s_s).unsqueeze(-1))
        grad.scatter_add_(-1, idx, r.unsqueeze(-1) * p_top - pt)
        grad.mul_(grad_out / s_t.numel())
        return grad.to(ctx.logits_dtype), None, None


def token_ids(inputs, logits: torch.Tensor) -> torch.Tensor:
    """The token ids of a causal LM's batch: its first integer tensor input shaped like the
    logits without their vocabulary dimension (``input_ids``)."""
    for t in inputs.tensors():
        if not t.dtype.is_floating_point and tuple(t.shape) == tuple(logits.shape[:-1]):
            return t
    raise ValueError(f"distill(labels=...) needs the batch's token ids: no integer input of shape "
                     f"{tuple(logits.shape[:-1])} among the model inputs; pass labels=0")


def distill_loss(output, target: Target, inputs=None, labels: float = 0.0) -> torch.Tensor:
    """The distillation loss of one batch. With ``labels`` > 0 (logit outputs only) the target
    distribution is ``(1 - labels) * teacher + labels * next token of the text``: the student
    also learns the calibration text itself, a causal LM's own training loss."""
    t, _ = output_tensor(output)
    if target.dense is None:
        kl = sparse_kl(t, target)
        if labels <= 0:
            return kl
        ids = token_ids(inputs, t)
        ce = torch.nn.functional.cross_entropy(t[..., :-1, :].float().flatten(0, -2), ids[..., 1:].flatten().long())
        return (1.0 - labels) * kl + labels * ce
    ref = target.dense
    return (t.float() - ref).pow(2).mean() / ref.pow(2).mean().clamp_min(1e-12)


def _xmoe_train_forward(layer, routers: bool = False, w2_flat: Optional[torch.Tensor] = None):
    """The training forward of a ``combine="unit"`` XMoE layer: its output under the threshold
    rule's selection, computed by :func:`masked_forward`.

    With ``routers``, the gate is ``mask + p - stop_gradient(p)`` (``p`` the router's
    probabilities): its value is the mask, so the output is unchanged, but the loss's gradient
    reaches every expert's probability as ``<dL/dy, E_e(x)>``, what adding that expert's output
    would change in the loss to first order, chosen or not. The router then learns, end to
    end, to raise the experts whose output the model needs and lower the others: the one part
    of the layer that layer-wise calibration fits to a proxy (each expert's output norm). On
    SmolLM2 (256 + 64 experts, 75%, the same 72 steps) router lr 1e-3 took dense perplexity
    x1.101 to x1.094 on 8192 held-out tokens with one example order and x1.099 to x1.097 with
    another (bench/results-quality.md, twelfth session): a small gain.

    ``w2_flat``: the down projections as the ``[d, E * h]`` parameter that trains in their place
    (:func:`_flat_down_projections`)."""

    def forward(x, *args, **kwargs):
        x2d = x.reshape(-1, layer.d_model)
        cfg = layer.config
        # the selection is made in float32 under a bfloat16 autocast too: the experts a token
        # trains with are those it gets at inference
        with torch.set_grad_enabled(routers and torch.is_grad_enabled()), torch.autocast(x.device.type, enabled=False):
            probs = router_probs(layer, x2d)
        mask = select_mask(probs.detach(), cfg.threshold, cfg.top_k, cfg.max_experts)
        gate = mask.to(probs.dtype) + (probs - probs.detach()) if routers else mask  # exactly the mask in value
        return masked_forward(layer, x2d, gate, w2_flat).reshape(x.shape)

    return forward


def masked_layers(layers: dict) -> List[str]:
    """The names of ``layers`` whose output :func:`masked_forward` reproduces: ``combine="unit"``
    XMoE without a capacity limit (a probability-weighted or capacity-limited layer runs its own
    forward)."""
    from .calibrate import is_xmoe

    return [n for n, layer in layers.items() if is_xmoe(layer) and getattr(layer, "combine", "unit") == "unit"
            and layer.config.capacity_factor is None]


def _slicemoe_train_forward(layer):
    from .calibrate import slicemoe_forward

    def forward(x, *args, **kwargs):
        return slicemoe_forward(layer, x.reshape(-1, layer.d_model)).reshape(x.shape)

    return forward


def block_parameters(model: nn.Module) -> List[nn.Parameter]:
    """What ``train="blocks"`` may train: every parameter outside the embeddings and the output
    head (a Hugging Face model's, tied or not), each once."""
    frozen = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Module):
        frozen.append(head)
    frozen_ids = {id(p) for m in frozen for p in m.parameters()}
    return [p for p in model.parameters() if id(p) not in frozen_ids]  # tied weights come once


def distill(
    model: nn.Module,
    examples: List[tuple],
    *,
    steps: int,
    lr: float = 1e-4,
    seconds: Optional[float] = None,
    progress: bool = True,
    seed: int = 0,
    train: str = "experts",
    schedule: str = "constant",
    labels: float = 0.0,
    router_lr: float = 0.0,
    precision: str = "float32",
) -> DistillReport:
    """Train the converted layers of ``model`` on ``examples`` (``(inputs, Target)`` pairs,
    inputs as :func:`moefx.convert.calibrate.run_batch` takes them), one example per Adam step,
    in a random order (each example once before any repeats). Stops after ``steps`` steps or
    ``seconds`` seconds, whichever comes first. From :data:`HELD_OUT_EVERY` examples on, the
    last one or two are held out and scored before and after. ``train``: ``"experts"`` trains
    the converted layers' expert weights only; ``"blocks"`` also every other floating-point
    parameter outside the embeddings and the output head (attention, norms: the dense model's own weights, which
    then move too); ``"blocks-down"`` the same but the converted layers' up and gate
    projections (:data:`UP_PROJECTIONS`), which keep the dense FFN's values: their weight
    gradients are two of the nine products of a masked GLU layer's training step. On SmolLM2
    (256 + 64 experts, 75%) a step took ~7% less time (3.76 s against 4.07 s, steady state,
    alternating in one process) and, the same 72 steps on the same examples, the model scored
    1.1027x dense perplexity against 1.1042x, its KL divergence from the dense model 0.192
    against 0.201 (bench/results-quality.md, sixteenth session). XMoE routers train only with
    ``router_lr`` > 0 (Adam, its own peak rate under the same schedule; straight-through,
    :func:`_xmoe_train_forward`); the selection they make then moves, and calibration's final
    rescale (:func:`moefx.convert.calibrate.rescale_in_model`) sets each layer's ratio again.
    ``precision`` (:data:`DISTILL_PRECISIONS`): ``"bfloat16"`` trains under bfloat16 autocast
    (the routers' selection, the loss, the weights and Adam's state stay float32; the held-out
    loss is measured in float32); ``"auto"`` where :func:`fast_bfloat16` says the device has
    bfloat16 matrix units. On a 2-core Sapphire Rapids CPU (AMX) a SmolLM2 ``blocks`` step took
    1.25 s against 1.88 s in float32 (bench/results-quality.md, eighteenth session).
    Restores every ``requires_grad`` flag and the layers' own forwards on exit."""
    from tqdm.auto import tqdm

    from .calibrate import is_xmoe, moe_layers, run_batch
    from .rewrite import replace_forwards, restore_forwards, set_mode

    if steps <= 0 or not examples or (seconds is not None and seconds <= 0):
        return DistillReport()
    layers = moe_layers(model)
    if not layers:
        raise ValueError("distill found no converted MoE layer in the model: run moefx.convert(...) first")
    if train not in DISTILL_TRAIN:
        raise ValueError(f"distill(train={train!r}): use one of {', '.join(DISTILL_TRAIN)}")
    if not 0.0 <= labels < 1.0:
        raise ValueError(f"distill(labels={labels}): the weight of the text's next tokens must be in [0, 1)")
    if not router_lr >= 0.0:
        raise ValueError(f"distill(router_lr={router_lr}): use 0 (routers frozen) or a positive learning rate")
    if schedule not in DISTILL_SCHEDULES:
        raise ValueError(f"distill(schedule={schedule!r}): use one of {', '.join(DISTILL_SCHEDULES)}")
    device = model_device(model)
    cast = autocast_dtype(precision, device)
    flags = {p: p.requires_grad for p in model.parameters()}
    routers = {id(p) for layer in layers.values() if is_xmoe(layer) for p in layer.router.parameters()}
    if train == "experts":
        candidates = [p for layer in layers.values() for p in layer.parameters()]
    else:
        candidates = block_parameters(model)
    if train == "blocks-down":
        up = {id(getattr(layer, n)) for layer in layers.values() for n in UP_PROJECTIONS
              if isinstance(getattr(layer, n, None), torch.Tensor)}
        candidates = [p for p in candidates if id(p) not in up]
    params = [p for p in candidates if id(p) not in routers and p.dtype.is_floating_point]
    router_params = [p for p in model.parameters() if id(p) in routers] if router_lr > 0 else []
    masked = masked_layers(layers)
    flat = _flat_down_projections({n: layers[n] for n in masked}, params)
    for p in flags:
        p.requires_grad_(False)
    for p in params + router_params:
        p.requires_grad_(True)
    forwards = {}
    for name, layer in layers.items():
        if not is_xmoe(layer):
            forwards[name] = _slicemoe_train_forward(layer)
        elif name in masked:
            forwards[name] = _xmoe_train_forward(layer, routers=bool(router_params), w2_flat=flat.get(name))
        # else: probability-weighted or capacity-limited XMoE trains through its own forward
        # (the ops' autograd), which masked_forward does not reproduce
    saved = replace_forwards(layers, forwards)
    was_training = model.training
    set_mode(model, False)  # no dropout: the student is trained to match the deterministic teacher
    groups = [{"params": params, "lr": lr, "base": lr}]
    if router_params:
        groups.append({"params": router_params, "lr": router_lr, "base": router_lr})
    opt = adam(groups, lr)
    gen = torch.Generator().manual_seed(seed)
    report = DistillReport()
    n_held = min(2, len(examples) // HELD_OUT_EVERY)
    held, examples = examples[len(examples) - n_held:], examples[:len(examples) - n_held]

    def held_out_loss() -> float:
        with torch.no_grad():
            return sum(float(distill_loss(run_batch(model, i), t)) for i, t in held) / len(held)

    t0 = time.perf_counter()
    order: List[int] = []
    bar = tqdm(total=steps, desc="distilling", disable=not progress)
    try:
        if held:
            report.held_out, report.held_out_before = len(held), held_out_loss()
        with torch.enable_grad():
            for step in range(steps):
                if seconds is not None and time.perf_counter() - t0 > seconds:
                    break
                if not order:
                    order = torch.randperm(len(examples), generator=gen).tolist()
                inputs, target = examples[order.pop()]
                if schedule == "cosine":
                    for group in opt.param_groups:
                        group["lr"] = group["base"] * lr_factor(step, steps, time.perf_counter() - t0, seconds)
                with torch.autocast(device.type, dtype=cast or torch.bfloat16, enabled=cast is not None):
                    output = run_batch(model, inputs)
                loss = distill_loss(output, target, inputs, labels)
                del output
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"distillation loss became {loss.item()} at step {step}; lower distill_lr (now {lr})"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                report.losses.append(float(loss.detach()))
                report.steps += 1
                report.tokens += target.tokens
                bar.update(1)
                bar.set_postfix(loss=f"{sum(report.losses[-_WINDOW:]) / len(report.losses[-_WINDOW:]):.4f}")
        if held:
            report.held_out_after = held_out_loss()
    finally:
        bar.close()
        restore_forwards(layers, saved)
        for name, w2_flat in flat.items():  # what the flat down projections learned, back in place
            layers[name].set_flat_w2(w2_flat)
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
        set_mode(model, was_training)
    if report.losses:
        w = min(_WINDOW, len(report.losses))
        report.loss_first = sum(report.losses[:w]) / w
        report.loss_last = sum(report.losses[-w:]) / w
    report.seconds = time.perf_counter() - t0
    return report


def _flat_down_projections(layers, params: List[nn.Parameter]) -> dict:
    """For each of ``layers`` (XMoE trained through :func:`masked_forward`) whose ``w2 [E, d, h]``
    is among ``params``: a ``[d, E * h]`` parameter with its values (``XMoE.flat_w2``) that takes
    its place in ``params`` (in place) and in the training forward; :func:`distill` copies it
    back at the end. The masked forward multiplies by ``w2`` in that layout, which ``[E, d, h]``
    can only give as a strided copy, forward and again in backward (SmolLM2: ~130 ms of a ~4 s
    step over 30 layers); trained flat, it is one copy in, one out."""
    at = {id(p): i for i, p in enumerate(params)}
    flat = {}
    for name, layer in layers.items():
        i = at.get(id(layer.w2))
        if i is None:
            continue
        flat[name] = nn.Parameter(layer.flat_w2().detach().clone())
        params[i] = flat[name]
    return flat


WARMUP_STEPS = 4
FINAL_LR = 0.1


def adam(groups, lr: float) -> torch.optim.Adam:
    """Adam over ``groups``, its fused implementation where this torch has one for the
    parameters' device and dtype (CPU included since torch 2.4): one kernel per parameter instead
    of a dozen elementwise passes. On SmolLM2 (256 + 64 experts, ``train="blocks"``) the update
    took 0.12 s of a ~4 s step instead of 0.28-0.31 s."""
    try:
        return torch.optim.Adam(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel here
        return torch.optim.Adam(groups, lr=lr)


def lr_factor(step: int, steps: int, elapsed: float, seconds: Optional[float]) -> float:
    """Learning-rate multiplier: a linear warm-up over :data:`WARMUP_STEPS` steps, then a cosine
    decay to :data:`FINAL_LR` at the end of the run, whichever comes first of ``steps`` steps and
    ``seconds`` seconds (progress is the larger of the two fractions, so a time-limited run still
    ends at the low rate). A short fine-tune ends better on a decayed rate than on a constant one."""
    progress = step / max(1, steps)
    if seconds is not None and seconds > 0:
        progress = max(progress, elapsed / seconds)
    progress = min(1.0, progress)
    warm = min(1.0, (step + 1) / WARMUP_STEPS)
    return warm * (FINAL_LR + (1 - FINAL_LR) * 0.5 * (1 + math.cos(math.pi * progress)))


def record_teachers(model: nn.Module, batches: Iterable, topk: int, progress: bool = True,
                    desc: str = "recording teacher outputs", max_batches: Optional[int] = None,
                    seconds: Optional[float] = None, train_cost: Optional[float] = None,
                    trained_tokens: int = 0) -> List[tuple]:
    """``(inputs, Target)`` for each batch, from ``model`` as it computes now (call inside
    :func:`moefx.convert.calibrate.dense_mode` to get the dense model's outputs). At most
    ``max_batches``; at least two are recorded. Without ``train_cost``, stops starting new ones
    after ``seconds``. With it, ``seconds`` is the time for recording *and* training on what is
    recorded, a training step costing ``train_cost`` times a teacher forward of the same tokens
    (measured here, per token, on the batches recorded so far): the next batch is recorded only
    if the time left after it still trains every example once, these and the
    ``trained_tokens`` already held (:func:`worth_recording`)."""
    from tqdm.auto import tqdm

    from .calibrate import Inputs, run_batch

    batches = list(batches)
    if max_batches is not None:
        batches = batches[:max_batches]
    out = []
    tokens = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for b in tqdm(batches, desc=desc, disable=not progress):
            elapsed = time.perf_counter() - t0
            if seconds is not None and len(out) >= 2:
                if train_cost is None:
                    if elapsed > seconds:
                        break
                elif not worth_recording(seconds, elapsed, tokens, trained_tokens, out[-1][1].tokens, train_cost):
                    break
            inputs = Inputs.of(b)
            out.append((inputs, teacher_target(run_batch(model, inputs), topk)))
            tokens += out[-1][1].tokens
    return out


def worth_recording(seconds: float, elapsed: float, recorded: int, trained: int, batch: int, train_cost: float) -> bool:
    """Whether one more teacher batch of ``batch`` tokens fits: ``elapsed`` seconds went into
    recording ``recorded`` tokens (so a token costs ``elapsed / recorded`` to record and
    ``train_cost`` times that to train on), and the recording plus one training pass over all the
    examples (``trained`` tokens held before, these, the new batch) must fit in ``seconds``.
    Distillation trains on distinct examples when it can: on SmolLM2, 100 steps over 50 examples
    gave 1.099x dense perplexity where 100 over 72 gave 1.090x (bench/results-quality.md)."""
    if recorded <= 0:
        return True
    per_token = elapsed / recorded
    return elapsed + per_token * (batch + train_cost * (trained + recorded + batch)) <= seconds
