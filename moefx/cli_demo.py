"""``moefx demo`` (what ``make demo`` runs): SmolLM2-135M, dense vs XMoE, in a few minutes.

Loads the bundled SmolLM2-135M, measures its perplexity on held-out standard-library
docstrings, converts all 30 FFNs to XMoE (64 routed + 16 shared experts, balanced k-means
split, fitted routers: the best measured setting, 1.55x dense perplexity at 75% against 1.65x
for 16 + 4, and no slower to calibrate; see bench/results-quality.md), calibrates layer by
layer on docstrings of other modules at a target mean activation ratio (first and last layers
get more than the middle ones: ``--budgets inverse``, 1.49x vs 1.55x uniform), distils the
whole model toward the dense one for a short while (``--distill-steps``, default 32 steps of
2 x 256 tokens, about two minutes here, on the teacher outputs that calibration's own dense
pass over its 16384 tokens recorded), and prints dense against converted perplexity and the
conversion summary: 1.29x dense perplexity at 75% in about six minutes (bench/RESULTS.md).
``--model`` takes any MODEL form for a quick look at another model (without a tokenizer the
text is replaced by random token ids, which only shows that the pipeline runs).
"""
from __future__ import annotations

import argparse
import time


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="convert SmolLM2-135M to XMoE, calibrate, compare perplexity with the dense model",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="smollm2", help="MODEL to convert (default: the bundled smollm2)")
    p.add_argument("--ratio", type=float, default=0.75, help="target activation ratio (default 0.75)")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--shared", type=int, default=16)
    from .convert.calibrate import BUDGET_MODES

    p.add_argument("--budgets", default="inverse", choices=BUDGET_MODES,
                   help="per-layer activation budgets (calibrate(budgets=...)); default inverse: "
                        "1.49x vs 1.55x uniform on SmolLM2 at 75%%")
    p.add_argument("--calib-tokens", type=int, default=16384,
                   help="calibration tokens (default 16384: routers fit on more tokens route better, and "
                        "their teacher outputs serve the distillation steps)")
    p.add_argument("--distill-steps", type=int, default=32,
                   help="end-to-end distillation steps after the layer-wise fit, 2 x 256 tokens each "
                        "(default 32, ~2 minutes here; 0 skips it; bench/quality.py runs as many as 10 minutes allow)")
    p.add_argument("--distill-tokens", type=int, default=None,
                   help="distinct tokens for distillation (default 512 per step)")
    p.add_argument("--eval-tokens", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=256)
    p.set_defaults(func=run)


def _eval_batches(loaded, tok, args):
    import torch

    from . import data

    if tok is not None:
        return data.token_batches(tok, "evaluation", num_tokens=args.eval_tokens, seq_len=args.seq_len, batch_size=4)
    vocab = loaded.model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    n = max(1, args.eval_tokens // args.seq_len)
    return [torch.randint(0, vocab, (n, args.seq_len), generator=g)]


def run(args) -> int:
    import copy


    from . import XMoEConfig, data
    from .convert import calibrate, convert
    from .convert.calibrate import Inputs
    from .convert.cli import _tokenizer, calibration_batches_for, summary_table
    from .models import load_model

    t0 = time.perf_counter()
    print(f"loading {args.model} ...", flush=True)
    loaded = load_model(args.model)
    tok = _tokenizer(loaded.source)
    if tok is not None:
        cal = [Inputs((b,), {}) for b in data.token_batches(tok, "calibration", num_tokens=args.calib_tokens,
                                                            seq_len=args.seq_len, batch_size=8)]
    else:
        cal = calibration_batches_for(loaded, args.calib_tokens)
    ev = _eval_batches(loaded, tok, args)
    dense = loaded.model
    dense_ppl = data.perplexity(dense, ev, progress=True, desc="dense perplexity")
    print(f"dense perplexity: {dense_ppl:.3f} on {sum(b.numel() for b in ev)} held-out tokens", flush=True)
    model = copy.deepcopy(dense)
    cfg = XMoEConfig(num_experts=args.experts, num_shared=args.shared, threshold=0.9, split="kmeans", router="fitted")
    print("converting every FFN to XMoE ...", flush=True)
    model = convert(model, cfg, loaded.example_inputs, loaded.example_kwargs, calibration_batches=cal[:2],
                    source=loaded.source)
    print(f"converted {len(model.moefx_recipe['layers'])} FFN blocks; calibrating at activation ratio {args.ratio}", flush=True)
    dist = None
    if args.distill_steps:
        dist = calibration_batches_for(loaded, args.distill_tokens or 512 * args.distill_steps, seed=1, batch_size=2,
                                       seq_len=args.seq_len)
    report = calibrate(model, cal, target_ratio=args.ratio, verbose=False, budgets=args.budgets,
                       distill_steps=args.distill_steps, distill_batches=dist)
    if report.distill is not None and report.distill.steps:
        print(report.distill.line(), flush=True)
    moe_ppl = data.perplexity(model, ev, progress=True, desc="XMoE perplexity")
    print()
    print(summary_table(model, report))
    print()
    print(f"{'':<28}{'perplexity':>12}{'x dense':>10}")
    print(f"{'dense':<28}{dense_ppl:>12.3f}{1.0:>10.2f}")
    act = report.mean("ratio")
    label = f"XMoE (activation {act:.2f})"
    print(f"{label:<28}{moe_ppl:>12.3f}{moe_ppl / dense_ppl:>10.2f}")
    print(f"total {time.perf_counter() - t0:.0f} s (calibration {report.seconds:.0f} s)")
    return 0
