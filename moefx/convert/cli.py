"""``moefx convert MODEL --to xmoe|slicemoe [...] --out DIR [--force]``.

Loads MODEL (any form ``moefx inspect`` takes), converts every dense FFN, optionally
calibrates on ``--calibrate-tokens`` tokens (standard-library docstrings through the model's
tokenizer when it has one; random token ids or example-shaped noise otherwise, which only fits
routers and experts to the model's own activations), saves atomically to DIR and prints a
summary: layers converted, parameters and FLOPs per token before and after, mean activation,
and each layer's relative error against its dense FFN. Nothing is written when conversion
fails, and an existing DIR is kept unless ``--force``.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

from ..config import XMOE_ROUTERS, XMOE_SPLITS
from .calibrate import BUDGET_MODES, ROUTER_TARGETS
from .distill import DISTILL_PRECISIONS, DISTILL_SCHEDULES, DISTILL_TRAIN

EPILOG = """\
Examples:
  moefx convert smollm2 --to xmoe --experts 16 --shared 4 --router fitted --calibrate-tokens 4096 --target-ratio 0.5 --out out/smol-xmoe
  moefx convert path/to/config.json --to slicemoe --slices 8 --experts 16 --top-k 2 --out out/tiny-slice
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="rewrite the dense FFNs of MODEL into XMoE or SliceMoE layers and save the result",
        description=__doc__.split("\n\n", 1)[1],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="the dense model (forms: see `moefx --help`)")
    p.add_argument("--to", choices=("xmoe", "slicemoe"), required=True, help="the MoE layer kind")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (recipe.json + model.safetensors)")
    p.add_argument("--force", action="store_true", help="replace DIR if it exists")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="cast the loaded model first (default: as loaded; a Hugging Face checkpoint loads "
                   "in its own dtype, often bfloat16; calibration computes in float32 either way)")
    p.add_argument("--experts", type=int, default=16,
                   help="experts per layer (default 16). XMoE: more, smaller experts route better (SmolLM2 at 75%%: "
                        "256 + 64 shared gave 1.24x dense perplexity, 64 + 16 gave 1.35x) but run slower on CPU")
    p.add_argument("--threshold", type=float, default=None, help="XMoE probability-mass threshold (default 0.9)")
    p.add_argument("--top-k", type=int, default=None, help="XMoE: fixed top-k instead of a threshold; SliceMoE: k (default 2)")
    p.add_argument("--shared", type=int, default=0, help="XMoE always-on shared experts (default 0)")
    p.add_argument("--slices", type=int, default=8, help="SliceMoE slices per token (default 8)")
    p.add_argument("--split", choices=XMOE_SPLITS, default="kmeans",
                   help="XMoE neuron partition (default kmeans: balanced k-means on the neurons' gate rows; "
                        "kmeans-coactivation: on whom each neuron fires with on the calibration tokens)")
    p.add_argument("--router", choices=XMOE_ROUTERS, default=None,
                   help="XMoE router: centroid (no data) or fitted (default: fitted when calibrating)")
    p.add_argument("--router-target", choices=ROUTER_TARGETS, default="fisher",
                   help="what a fitted XMoE router learns to rank experts by: each expert's output measured by "
                        "what it changes in the model's prediction (fisher, default: one extra forward and backward "
                        "pass on 2048 tokens) or its plain norm")
    p.add_argument("--calibrate-tokens", type=int, default=0,
                   help="calibrate on this many tokens (0: no calibration); routers fit better on more: "
                        "SmolLM2 at 50%% went from 1.66x to 1.44-1.48x dense perplexity with 32768 instead of 4096")
    p.add_argument("--target-ratio", type=float, default=None,
                   help="XMoE: rescale routers so this fraction of expert groups is active (needs calibration)")
    p.add_argument("--budgets", choices=BUDGET_MODES, default="uniform",
                   help="XMoE per-layer activation budgets around --target-ratio: uniform (default: every "
                   "layer at the ratio); model (each layer's cost measured in the model's output, two extra "
                   "forwards per layer, and the budget goes where it buys most); inverse (first and last "
                   "layers get more); relative/absolute (more where a layer's own output loses more). "
                   "bench/RESULTS.md compares them on SmolLM2")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="stop distillation when calibration has run this long (the layer-wise fit always "
                   "completes); e.g. 600 for the ten minutes of bench/RESULTS.md")
    p.add_argument("--steps", type=int, default=None, help="Adam steps per layer during calibration")
    p.add_argument("--distill-steps", type=int, default=0,
                   help="after the layer-wise fit, end-to-end distillation steps toward the dense model's outputs "
                        "(one 2 x 256-token batch each; needs --calibrate-tokens; default 0)")
    p.add_argument("--distill-tokens", type=int, default=None,
                   help="distinct tokens for distillation (default: 512 per step, capped at the text available)")
    p.add_argument("--distill-lr", type=float, default=1e-4, help="distillation learning rate (Adam, default 1e-4; the peak with --distill-schedule cosine)")
    p.add_argument("--distill-schedule", choices=list(DISTILL_SCHEDULES), default="constant",
                   help="distillation learning rate over time: constant (default), or a 4-step warm-up then a "
                        "cosine decay to a tenth by the end of the step or time budget")
    p.add_argument("--distill-train", choices=list(DISTILL_TRAIN), default="experts",
                   help="what distillation trains: the converted layers' experts (default); blocks: also every "
                        "other block parameter (attention, norms; not the embeddings or the output head); "
                        "blocks-down: blocks, but the converted layers' up and gate projections keep their dense "
                        "values (steps ~7%% faster, no worse per step on SmolLM2)")
    p.add_argument("--distill-labels", type=_label_weight, default=0.0, metavar="WEIGHT",
                   help="weight in [0, 1) of the calibration text's own next tokens in the distillation "
                        "target (default 0: the dense model's outputs only). Above 0 the model also adapts "
                        "to the text's domain, and drifts from the dense model (bench/RESULTS.md)")
    p.add_argument("--distill-router-lr", type=_rate, default=0.0, metavar="LR",
                   help="XMoE: distillation also trains the routers, at this peak learning rate (default 0: "
                        "routers keep their layer-wise fit; 1e-3 is the setting of bench/RESULTS.md)")
    p.add_argument("--distill-precision", choices=list(DISTILL_PRECISIONS), default="float32",
                   help="distillation's matrix products: float32 (default); bfloat16 (autocast: weights, "
                        "optimizer state, routing and loss stay float32); auto: bfloat16 where the CPU has AMX "
                        "tiles or the GPU bfloat16, else float32")
    p.set_defaults(func=run)


def _number(ok, what: str):
    """An argparse type: a float for which ``ok(value)`` holds, else an error naming ``what``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    return parse


_rate = _number(lambda v: v >= 0.0, "a learning rate (a number >= 0; 0: routers frozen)")
_label_weight = _number(lambda v: 0.0 <= v < 1.0, "a weight in [0, 1) (0: the dense model's outputs only)")


def _configs(args):
    from ..config import SliceMoEConfig, XMoEConfig

    if args.to == "xmoe":
        router = args.router or ("fitted" if args.calibrate_tokens > 0 else "centroid")
        if args.top_k is not None:
            return XMoEConfig(num_experts=args.experts, threshold=None, top_k=args.top_k,
                              num_shared=args.shared, split=args.split, router=router)
        return XMoEConfig(num_experts=args.experts, threshold=0.9 if args.threshold is None else args.threshold,
                          num_shared=args.shared, split=args.split, router=router)
    return SliceMoEConfig(num_slices=args.slices, num_experts=args.experts, top_k=args.top_k or 2)


def calibration_batches_for(loaded, num_tokens: int, seed: int = 0, batch_size: int = 8, seq_len: int = 256) -> list:
    """Calibration inputs for a loaded MODEL (see the module docstring): where there is a
    tokenizer, ``batch_size`` sequences of ``seq_len`` tokens per batch."""
    import torch

    from .calibrate import Inputs

    tok = _tokenizer(loaded.source)
    if tok is not None:
        from .. import data

        seq = min(seq_len, num_tokens)
        return [Inputs((b,), {}) for b in data.token_batches(tok, "calibration", num_tokens=num_tokens, seq_len=seq,
                                                            batch_size=batch_size)]
    gen = torch.Generator().manual_seed(seed)
    inputs, kwargs = tuple(loaded.example_inputs), dict(loaded.example_kwargs)
    first = inputs[0] if inputs else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
    if first is None:
        return [Inputs(inputs, kwargs)]
    per = max(1, first.numel() if first.dtype in (torch.long, torch.int) else first.shape[0] * (first.shape[1] if first.dim() > 2 else 1))
    n = max(1, min(64, math.ceil(num_tokens / per)))
    vocab = getattr(getattr(loaded.model, "config", None), "vocab_size", None)
    out = []
    for _ in range(n):
        def fresh(t):
            if not isinstance(t, torch.Tensor):
                return t
            if t.dtype in (torch.long, torch.int) and vocab:
                return torch.randint(0, vocab, t.shape, generator=gen, dtype=t.dtype)
            if t.is_floating_point():
                return torch.randn(t.shape, generator=gen, dtype=t.dtype)
            return t
        out.append(Inputs(tuple(fresh(t) for t in inputs), {k: fresh(v) for k, v in kwargs.items()}))
    return out


def _tokenizer(source: dict):
    if not source or source.get("kind") not in ("gguf", "hf_dir"):
        return None
    try:
        from pathlib import Path

        from transformers import AutoTokenizer

        path = Path(source["path"])
        if source["kind"] == "gguf":
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return AutoTokenizer.from_pretrained(str(path))
    except Exception:
        return None


def layer_cost(layer, ratio: float):
    """``(parameters, FLOPs per token)`` of a MoE layer at activation ratio ``ratio`` (the
    fraction of expert groups used; multiply-adds count 2, activations not counted)."""
    params = sum(p.numel() for p in layer.parameters())
    mats = 3 if layer.glu else 2
    d = layer.d_model
    if hasattr(layer.config, "threshold"):
        E, S, h = layer.config.num_experts, layer.config.num_shared, layer.expert_hidden
        flops = 2 * d * E + ratio * (E + S) * 2 * mats * d * h
    else:
        c = layer.config
        ds, h = layer.slice_dim, layer.expert_hidden
        flops = c.num_slices * (2 * (ds * c.router_hidden + c.router_hidden * c.num_experts) + c.top_k * 2 * mats * ds * h)
    return params, int(flops)


def _fmt(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def summary_table(model, report) -> str:
    """The closing table of ``moefx convert`` and ``moefx demo``."""
    entries = model.moefx_recipe["layers"]
    by_name = {r.name: r for r in report.layers}
    rows = [f"{'layer':<34} {'kind':<8} {'params dense':>12} {'params moe':>10} {'FLOPs/tok dense':>15} "
            f"{'FLOPs/tok moe':>13} {'act':>6} {'rel err':>8} {'cos':>7}"]
    rows.append("-" * len(rows[0]))
    tot = [0, 0, 0, 0]
    for e in entries:
        layer = model.get_submodule(e["target"]) if e["target"] else model
        r = by_name.get(e["target"])
        ratio = r.ratio if r else 1.0
        params, flops = layer_cost(layer, ratio)
        tot[0] += e["dense_params"]; tot[1] += params; tot[2] += e["dense_flops_per_token"]; tot[3] += flops
        rows.append(f"{e['target'][-34:]:<34} {e['kind']:<8} {_fmt(e['dense_params']):>12} {_fmt(params):>10} "
                    f"{_fmt(e['dense_flops_per_token']):>15} {_fmt(flops):>13} {ratio:>6.3f} "
                    f"{(r.rel_err_after if r else float('nan')):>8.4f} {(r.cos_after if r else float('nan')):>7.4f}")
    rows.append("-" * len(rows[0]))
    mean_act = report.mean("ratio") if report.layers else float("nan")
    mean_err = report.mean("rel_err_after") if report.layers else float("nan")
    rows.append(f"{f'total: {len(entries)} layers converted':<34} {'':<8} {_fmt(tot[0]):>12} {_fmt(tot[1]):>10} "
                f"{_fmt(tot[2]):>15} {_fmt(tot[3]):>13} {mean_act:>6.3f} {mean_err:>8.4f}")
    return "\n".join(rows)


def run(args) -> int:

    from ..config import ConfigError
    from ..models import ModelLoadError, load_model
    from . import calibrate, convert
    from .io import save
    from .rewrite import ConversionError

    out = os.path.abspath(args.out)
    if os.path.exists(out) and not args.force:
        print(f"moefx convert: {out} exists; pass --force to replace it", file=sys.stderr)
        return 2
    try:
        cfg = _configs(args)
    except ConfigError as err:
        print(f"moefx convert: {err}", file=sys.stderr)
        return 2
    if args.distill_steps and not args.calibrate_tokens:
        print("moefx convert: --distill-steps needs --calibrate-tokens N (distillation follows calibration)", file=sys.stderr)
        return 2
    if args.budgets != "uniform" and args.target_ratio is None:
        print("moefx convert: --budgets spreads --target-ratio over the layers: give --target-ratio too", file=sys.stderr)
        return 2
    if args.target_ratio is not None and not args.calibrate_tokens:
        print("moefx convert: --target-ratio needs --calibrate-tokens N (the routers are rescaled on data)", file=sys.stderr)
        return 2
    try:
        loaded = load_model(args.model)
    except ModelLoadError as err:
        print(f"moefx convert: {err}", file=sys.stderr)
        return 2
    if args.dtype is not None:
        import torch

        loaded.model.to(getattr(torch, args.dtype))
    print(f"loaded {type(loaded.model).__name__} from {args.model}"
          f" ({next(loaded.model.parameters()).dtype})".replace("torch.", ""), flush=True)
    batches = calibration_batches_for(loaded, args.calibrate_tokens) if args.calibrate_tokens else None
    try:
        model = convert(loaded.model, cfg, loaded.example_inputs, loaded.example_kwargs,
                        calibration_batches=batches[:2] if batches else None, source=loaded.source)
    except (ConversionError, ConfigError) as err:
        print(f"moefx convert: {err}", file=sys.stderr)
        return 1
    print(f"converted {len(model.moefx_recipe['layers'])} FFN blocks to {args.to}", flush=True)
    if batches:
        kw = {"router_target": args.router_target, "budgets": args.budgets, "budget_seconds": args.time_budget}
        if args.steps is not None:
            kw["steps"] = args.steps
        if args.distill_steps:
            kw.update(distill_steps=args.distill_steps, distill_lr=args.distill_lr, distill_train=args.distill_train,
                      distill_schedule=args.distill_schedule, distill_labels=args.distill_labels,
                      distill_router_lr=args.distill_router_lr, distill_precision=args.distill_precision,
                      distill_batches=calibration_batches_for(loaded, args.distill_tokens or 512 * args.distill_steps,
                                                              seed=1, batch_size=2))
        report = calibrate(model, batches, target_ratio=args.target_ratio, verbose=True, **kw)
    else:
        from .calibrate import Inputs

        report = calibrate(model, [Inputs(loaded.example_inputs, loaded.example_kwargs)],
                           fit_router=False, fit_experts=False, progress=False, verbose=False)
    save(model, out, source=loaded.source, overwrite=args.force)
    print(summary_table(model, report))
    print(f"saved to {out}")
    return 0
