"""``moefx inspect MODEL [--json]``: list the dense FFN blocks moefx would convert.

Loads MODEL (:mod:`moefx.models`), captures it and runs FFN discovery; prints one row per block
(path, kind, d_model, d_ff, activation, parameters, FLOPs per token) and the FFN share of all
parameters, which is the part of the model an MoE conversion makes sparse. ``--json`` prints the
same as one JSON object with key ``ffns``. A model with no FFN is not an error (exit 0); a
MODEL that cannot be loaded or captured is (exit 2 / 1, with the reason on stderr).
"""
from __future__ import annotations

import argparse
import json
import sys

from .models import FORMS_HELP

HELP = "list the dense FFN blocks of MODEL (what moefx would convert)"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "inspect",
        help=HELP,
        description="Find the dense FFN blocks of a model and print their shapes, parameters "
        "and FLOPs per token.",
        epilog=FORMS_HELP + "\n\nExamples:\n  moefx inspect smollm2\n  moefx inspect "
        "path/to/config.json --json\n  moefx inspect mypkg.models:build --explain",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="what to inspect (forms below)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--explain", action="store_true",
                   help="also list near-matches that are not FFNs, with the reason")
    p.set_defaults(func=run)


def _fmt_int(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def summarize(model, report) -> dict:
    """The JSON document of ``inspect --json`` (also used by the table)."""
    total = sum(p.numel() for p in model.parameters())
    ffns = []
    for m in report.matches:
        d = m.to_dict()
        d.pop("nodes", None)
        ffns.append(d)
    ffn_params = sum(f["params"] for f in ffns)
    return {
        "model": type(model).__name__,
        "capture": report.capture_method,
        "ffns": ffns,
        "num_ffns": len(ffns),
        "ffn_params": ffn_params,
        "total_params": total,
        "ffn_share": (ffn_params / total) if total else 0.0,
        "rejected": [{"name": r.name, "reason": r.reason, "nodes": r.nodes} for r in report.rejected],
    }


def render_table(doc: dict, explain: bool = False) -> str:
    lines = []
    if not doc["ffns"]:
        lines.append(f"{doc['model']}: no dense FFN block found "
                     f"({doc['total_params']:,} parameters); nothing to convert.")
    else:
        header = ("path", "kind", "d_model", "d_ff", "activation", "params", "FLOPs/token")
        rows = [(f["path"] if f["path"] is not None else f"- ({f['name']})", f["kind"], str(f["d_model"]),
                 str(f["d_ff"]), f["activation"], _fmt_int(f["params"]), _fmt_int(f["flops_per_token"]))
                for f in doc["ffns"]]
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
        fmt = "  ".join(f"{{:<{w}}}" if i in (0, 1, 4) else f"{{:>{w}}}" for i, w in enumerate(widths))
        lines.append(fmt.format(*header))
        lines.append(fmt.format(*("-" * w for w in widths)))
        lines += [fmt.format(*r) for r in rows]
        lines.append("")
        lines.append(
            f"{doc['num_ffns']} FFN blocks in {doc['model']}: {doc['ffn_params']:,} of "
            f"{doc['total_params']:,} parameters ({100 * doc['ffn_share']:.1f}%) are FFN weights"
        )
    if explain and doc["rejected"]:
        lines.append("")
        lines.append("near-matches that are not FFNs:")
        lines += [f"  {r['name']}: {r['reason']}" for r in doc["rejected"]]
    return "\n".join(lines)


def run(args) -> int:
    from .capture import CaptureError
    from .models import ModelLoadError, load_model
    from .passes.find_ffn import find_ffns

    try:
        loaded = load_model(args.model)
    except ModelLoadError as err:
        print(f"moefx inspect: error: {err}", file=sys.stderr)
        return 2
    try:
        report = find_ffns(loaded.model, loaded.example_inputs, loaded.example_kwargs, explain=True)
    except CaptureError as err:
        print(f"moefx inspect: error: {err}", file=sys.stderr)
        return 1
    doc = summarize(loaded.model, report)
    doc["source"] = loaded.source
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(render_table(doc, explain=args.explain))
    return 0
