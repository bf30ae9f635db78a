"""Quality of converted SmolLM2-135M: perplexity on held-out docstrings, dense vs MoE.

All 30 FFNs are converted through the public API (``moefx.convert``), calibrated with
``moefx.calibrate`` on docstrings of one set of standard-library modules, and evaluated on
docstrings of a disjoint set (``moefx.data``). One row per target activation ratio, plus
SliceMoE (S=8, E=16, k=2). Prints a markdown table and appends it to ``--out`` if given.

    python bench/quality.py --ratios 0.75 0.5 0.25 --calib-tokens 32768 --eval-tokens 2048
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main(argv=None) -> int:
    from moefx.convert.distill import DISTILL_PRECISIONS, DISTILL_SCHEDULES, DISTILL_TRAIN

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", type=float, nargs="*", default=[0.75, 0.5, 0.25])
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--shared", type=int, default=4)
    ap.add_argument("--split", default="kmeans")
    ap.add_argument("--threshold", type=float, default=0.9,
                    help="XMoE threshold t; calibration sets each router's scale so t keeps the ratio")
    ap.add_argument("--calib-tokens", type=int, default=32768,
                    help="tokens for the layer-wise fit (default 32768: routers fit on fewer generalise worse)")
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=0, help="Adam steps per layer after the closed-form fit")
    ap.add_argument("--slicemoe", action="store_true", help="also convert to SliceMoE (S=8, E=16, k=2)")
    ap.add_argument("--slicemoe-steps", type=int, default=30)
    ap.add_argument("--slicemoe-batch", type=int, default=256)
    ap.add_argument("--no-xmoe", action="store_true", help="skip the XMoE rows")
    ap.add_argument("--budgets", default="uniform", choices=["uniform", "model", "relative", "absolute", "inverse"],
                    help="per-layer activation budgets (calibrate(budgets=...))")
    ap.add_argument("--budget-spread", type=float, default=None, help="max per-layer deviation from the target")
    ap.add_argument("--layer-ratios", type=float, nargs="*", default=None,
                    help="explicit per-layer activation ratios, in layer order (replaces --ratios)")
    ap.add_argument("--distill-steps", type=int, default=0,
                    help="end-to-end distillation steps after the layer-wise fit (calibrate(distill_steps=...))")
    ap.add_argument("--distill-tokens", type=int, default=49152,
                    help="calibration-split tokens for distillation, in batches of 2 x 256")
    ap.add_argument("--distill-lr", type=float, default=1e-4)
    ap.add_argument("--distill-train", default="experts", choices=list(DISTILL_TRAIN),
                    help="what distillation trains: expert weights, every block parameter outside the embeddings, "
                         "or that but the converted layers' up and gate projections (blocks-down)")
    ap.add_argument("--distill-seconds", type=float, default=None)
    ap.add_argument("--distill-schedule", default="constant", choices=list(DISTILL_SCHEDULES))
    ap.add_argument("--distill-precision", default="float32", choices=list(DISTILL_PRECISIONS),
                    help="bfloat16 autocast in distillation (auto: where the CPU has AMX or the GPU bfloat16)")
    ap.add_argument("--distill-labels", type=float, default=0.0,
                    help="weight of the calibration text's own next tokens in the distillation target (0: teacher only)")
    ap.add_argument("--distill-router-lr", type=float, default=0.0,
                    help="peak learning rate of the XMoE routers in distillation (0: routers frozen)")
    ap.add_argument("--budget-seconds", type=float, default=590,
                    help="whole-calibration wall-clock budget (issue: at most 10 minutes); distillation stops "
                         "early to stay inside it")
    ap.add_argument("--router-target", default="fisher", choices=["fisher", "norm"],
                    help="what fitted routers rank experts by (calibrate(router_target=...))")
    ap.add_argument("--fisher-tokens", type=int, default=None,
                    help="tokens of the Fisher pass (moefx.convert.calibrate.FISHER_TOKENS)")
    ap.add_argument("--dense-reference", type=int, default=0, metavar="STEPS",
                    help="also fine-tune a copy of the dense model for STEPS steps with the distillation recipe "
                         "(--distill-lr, cosine, --distill-labels, attention/norms/FFNs trained) and report its "
                         "perplexity: what text labels would give the dense model itself")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="append the markdown table to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import moefx
    from moefx import data

    if args.fisher_tokens:
        import importlib

        importlib.import_module("moefx.convert.calibrate").FISHER_TOKENS = args.fisher_tokens
    from moefx.models import load_model, smollm2_path
    from transformers import AutoTokenizer

    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    loaded = load_model("smollm2")
    dense = loaded.model.eval()
    cal = data.token_batches(tok, "calibration", num_tokens=args.calib_tokens, seq_len=256, batch_size=8)
    ev = data.token_batches(tok, "evaluation", num_tokens=args.eval_tokens, seq_len=256, batch_size=8)
    dist = (data.token_batches(tok, "calibration", num_tokens=args.distill_tokens, seq_len=256, batch_size=2)
            if args.distill_steps else None)
    t = time.perf_counter()
    dense_ppl, first = split_perplexity(dense, ev, "dense perplexity")
    print(f"dense perplexity {dense_ppl:.3f} ({time.perf_counter() - t:.0f} s)", flush=True)
    if len(ev) > 1:
        print(f"dense perplexity on the first {ev[0].numel()} evaluation tokens {first:.3f}", flush=True)
    if args.dense_reference:
        ref = dense_reference(dense, dist or data.token_batches(tok, "calibration", num_tokens=args.distill_tokens,
                                                                 seq_len=256, batch_size=2),
                              args.dense_reference, args.distill_lr, args.distill_labels)
        ref_ppl = data.perplexity(ref, ev)
        print(f"dense model fine-tuned {args.dense_reference} steps (lr {args.distill_lr:g} cosine, text labels "
              f"{args.distill_labels:g}): perplexity {ref_ppl:.3f} ({ref_ppl / dense_ppl:.3f}x dense)", flush=True)
        del ref
    matches = moefx.find_ffns(dense, loaded.example_inputs, loaded.example_kwargs)
    rows = []
    runs = [("xmoe", r) for r in ([] if args.no_xmoe else args.ratios)] + ([("slicemoe", None)] if args.slicemoe else [])
    for kind, ratio in runs:
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        if kind == "xmoe":
            cfg = moefx.XMoEConfig(num_experts=args.experts, num_shared=args.shared, threshold=args.threshold,
                                   split=args.split, router="fitted")
            label = (f"XMoE E={args.experts}+{args.shared} shared, {args.split}, fitted router ({args.router_target}), t={args.threshold} rescaled, "
                     f"{args.budgets} budgets" + (f" +-{args.budget_spread}" if args.budget_spread else ""))
        else:
            cfg = moefx.SliceMoEConfig(num_slices=8, num_experts=16, top_k=2)
            label = "SliceMoE S=8 E=16 k=2"
        model = moefx.convert(model, cfg, loaded.example_inputs, loaded.example_kwargs,
                              calibration_batches=cal[:2], matches=_rebind(matches, model))
        t1 = time.perf_counter()
        if args.layer_ratios and kind == "xmoe":
            from moefx.convert.calibrate import moe_layers

            ratio = dict(zip(moe_layers(model), args.layer_ratios))
        rep = moefx.calibrate(model, cal, target_ratio=ratio, verbose=False,
                              steps=args.steps if kind == "xmoe" else args.slicemoe_steps,
                              batch=1024 if kind == "xmoe" else args.slicemoe_batch, budgets=args.budgets, budget_spread=args.budget_spread,
                              distill_steps=args.distill_steps, distill_batches=dist, distill_lr=args.distill_lr, distill_train=args.distill_train,
                              distill_schedule=args.distill_schedule, distill_labels=args.distill_labels,
                              distill_router_lr=args.distill_router_lr, distill_precision=args.distill_precision,
                              distill_seconds=args.distill_seconds, budget_seconds=args.budget_seconds,
                              router_target=args.router_target)
        t2 = time.perf_counter()
        if rep.budgets and len(set(rep.budgets.values())) > 1:
            print("per-layer budgets: " + " ".join(f"{v:.2f}" for v in rep.budgets.values()), flush=True)
        with moefx.metrics.collect(model) as stats:
            ppl, part = split_perplexity(model, ev, f"{kind} perplexity")
        act = rep.mean("ratio_after")
        act_eval = in_model_activation(model, stats)
        if len(ev) > 1:
            print(f"on the first {ev[0].numel()} evaluation tokens: {part:.3f} ({part / first:.3f}x dense)", flush=True)
        with moefx.metrics.collect(model) as cal_stats, torch.no_grad():
            for b in cal[:1]:
                model(b)
        print(f"activation on {cal[0].numel()} calibration tokens, in the converted model: "
              f"{in_model_activation(model, cal_stats):.3f} (layer-wise, on the dense model's activations: {act:.3f})"
              + (f"; final rescale on {rep.rescale_text} text" if rep.rescale_text else ""), flush=True)
        if isinstance(ratio, dict):
            ratio = sum(ratio.values()) / len(ratio)
            label += ", explicit per-layer ratios"
        if rep.distill is not None and rep.distill.steps:
            print(rep.distill.line(), flush=True)
            label += f", distilled {rep.distill.steps} steps x 512 tokens (lr {args.distill_lr:g}, {args.distill_schedule})"
            if args.distill_labels:
                label += f", text labels {args.distill_labels:g}"
            if args.distill_router_lr:
                label += f", routers trained (lr {args.distill_router_lr:g})"
            if args.distill_precision != "float32":
                label += f", {args.distill_precision} autocast"
        rows.append((label, ratio, act, act_eval, ppl, ppl / dense_ppl, rep.mean("rel_err_after"), t1 - t0, t2 - t1))
        print(f"{label} target={ratio} act={act:.3f} (evaluation text, in the model: {act_eval:.3f}) ppl={ppl:.3f} ({ppl / dense_ppl:.2f}x) "
              f"relerr={rep.mean('rel_err_after'):.3f} convert {t1 - t0:.0f}s calibrate {t2 - t1:.0f}s", flush=True)
        del model
    table = [
        f"### SmolLM2-135M quality ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{platform.machine()}, {torch.get_num_threads()} threads, load average at the end "
        f"{' '.join(f'{v:.1f}' for v in os.getloadavg())})",
        "",
        f"Dense perplexity {dense_ppl:.3f} on {sum(b.numel() for b in ev)} held-out docstring tokens; "
        f"calibration on {sum(b.numel() for b in cal)} tokens of other modules; layer-wise "
        f"calibration, {args.steps} Adam steps per XMoE layer after the closed-form fit"
        + (f"; then end-to-end distillation, {args.distill_steps} Adam steps (lr {args.distill_lr:g}) on 2 x 256-token "
           f"batches drawn from {args.distill_tokens} calibration-split tokens" if args.distill_steps else "")
        + ". 'calibrate s' includes distillation.",
        "",
        "| model | target act. | measured act. (calib., layer-wise) | measured act. (eval., in model) | perplexity "
        "| x dense | mean layer rel. err | convert s | calibrate s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, ratio, act, act_eval, ppl, x, err, tc, tk in rows:
        table.append(f"| {label} | {'-' if ratio is None else f'{ratio:.2f}'} | {act:.3f} | {act_eval:.3f} | {ppl:.2f} | "
                     f"{x:.2f} | {err:.3f} | {tc:.0f} | {tk:.0f} |")
    text = "\n".join(table) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as fh:
            fh.write("\n" + text)
    return 0


def split_perplexity(model, ev, desc: str):
    """Perplexity on all of ``ev`` and on its first batch (the default 2048-token text), in one
    pass: the two parts' mean cross-entropies weighted by their predicted-token counts."""
    import math

    from moefx import data

    first = data.perplexity(model, ev[:1], progress=True, desc=desc)
    if len(ev) == 1:
        return first, first
    rest = data.perplexity(model, ev[1:], progress=True, desc=desc)
    n1 = sum(b[:, 1:].numel() for b in ev[:1])
    n2 = sum(b[:, 1:].numel() for b in ev[1:])
    return math.exp((n1 * math.log(first) + n2 * math.log(rest)) / (n1 + n2)), first


def dense_reference(dense, batches, steps: int, lr: float, labels: float):
    """A copy of ``dense`` trained as distillation trains a converted model (every parameter
    outside the embeddings and the output head, Adam, warm-up then cosine, one 2 x 256-token
    batch per step in a fixed random order, target ``(1 - labels) * dense + labels * text``):
    with ``labels`` > 0 it measures how much of a converted model's gain is the text's domain."""
    from moefx.convert.calibrate import Inputs
    from moefx.convert.distill import block_parameters, distill_loss, lr_factor, teacher_target

    model = copy.deepcopy(dense)
    params = block_parameters(model)
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(0)).tolist()
    for step in range(steps):
        b = batches[order[step % len(order)]]
        with torch.no_grad():
            target = teacher_target(dense(b), 64)
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(step, steps, 0.0, None)
        loss = distill_loss(model(b), target, Inputs.of(b), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.requires_grad_(False)
    return model.eval()


def in_model_activation(model, stats) -> float:
    """Mean activation ratio (shared groups included) over the XMoE layers, as the converted
    model routed the text it ran under ``stats`` (``moefx.metrics.collect`` counts)."""
    from moefx.convert.calibrate import is_xmoe, moe_layers

    ratios = []
    for name, layer in moe_layers(model).items():
        if is_xmoe(layer) and name in stats:
            E, S = layer.config.num_experts, layer.config.num_shared
            ratios.append((stats[name].activation_ratio * E + S) / (E + S))
    return sum(ratios) / len(ratios) if ratios else float("nan")


def _rebind(matches, model):
    """The FFN matches found once on the dense model, pointed at a copy of it (same fqns), so
    each run skips the ~1 minute capture of the 30-layer model."""
    import dataclasses

    return [dataclasses.replace(m, model=model) for m in matches]


if __name__ == "__main__":
    sys.exit(main())
