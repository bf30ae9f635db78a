"""``moefx export MODEL_OR_DIR --onnx out.onnx [--target ort|portable] [--no-verify]``.

MODEL_OR_DIR is a directory written by ``moefx convert`` (read with ``moefx.load``) or any
MODEL form of ``moefx.models.load_model`` (a dense model exports too: the baseline to compare a
converted one with). Example inputs come from the loader; Hugging Face language models get
token ids of shape ``--batch x --seq`` and ``use_cache=False`` (export cannot return a cache).
"""
from __future__ import annotations

import argparse
import os
import sys

DESCRIPTION = """\
Export a model to ONNX for onnxruntime. With --target ort (default) every MoE layer that
com.microsoft.MoE expresses exactly becomes that one contrib node; the others (SliceMoE with
input gating, erf GELU unless --accept-gelu-tanh, non-SwiGLU GLU) use standard ONNX ops, as
--target portable does for all layers. The file is checked in onnxruntime against PyTorch
(the example shape and batch 1 x sequence 1) before it is written; a failed check writes
nothing."""

EPILOG = """\
Examples:
  moefx export out/smol-xmoe --onnx smol.onnx
  moefx export out/smol-xmoe --onnx smol-portable.onnx --target portable
  moefx export smollm2 --onnx smol-dense.onnx        # the dense baseline
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a model (converted or dense) to ONNX and verify it in onnxruntime",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL_OR_DIR", help="a `moefx convert` output directory or any MODEL")
    p.add_argument("--onnx", required=True, metavar="OUT.onnx", help="where to write the .onnx file")
    p.add_argument("--target", choices=("ort", "portable"), default="ort",
                   help="ort: com.microsoft.MoE where exact (default); portable: standard ONNX ops only")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime parity check")
    p.add_argument("--static", action="store_true", help="fixed input shapes instead of dynamic batch/sequence")
    p.add_argument("--accept-gelu-tanh", action="store_true",
                   help="let erf-GELU layers use the contrib op's tanh GELU")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="cast the model's weights first (default: as loaded; a Hugging Face checkpoint "
                   "loads in its own dtype, often bfloat16, which onnxruntime's CPU provider cannot run: "
                   "pass float32 or float16)")
    p.add_argument("--batch", type=int, default=2, help="example batch size for language models (default 2)")
    p.add_argument("--seq", type=int, default=8, help="example sequence length for language models (default 8)")
    p.set_defaults(func=run)


def _is_saved_moefx_dir(path: str) -> bool:
    """A ``moefx.save`` directory holds its recipe (``recipe.json``) next to the weights."""
    if not os.path.isdir(path):
        return False
    try:
        from moefx.convert.io import RECIPE
    except ImportError:
        return False
    return os.path.isfile(os.path.join(path, RECIPE))


def _token_inputs(model, batch: int, seq: int):
    import torch

    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if not vocab:
        return None
    gen = torch.Generator().manual_seed(0)
    return (torch.randint(0, int(vocab), (batch, seq), generator=gen),), {"use_cache": False}


def load_for_export(spec: str, batch: int = 2, seq: int = 8):
    """``(model, args, kwargs, description)`` for a MODEL_OR_DIR argument."""
    import moefx

    if batch < 1 or seq < 1:
        raise ValueError(f"--batch and --seq must be >= 1, got {batch} and {seq}")
    if _is_saved_moefx_dir(spec):
        loaded = moefx.load(spec)
        model = getattr(loaded, "model", loaded)
        examples = _token_inputs(model, batch, seq)
        if examples is None and getattr(loaded, "example_inputs", None) is not None:
            examples = (tuple(loaded.example_inputs), dict(getattr(loaded, "example_kwargs", None) or {}))
        if examples is None:
            raise ValueError(
                f"{spec}: cannot build example inputs for a {type(model).__name__}; export it from "
                "Python with moefx.export_onnx(model, example_inputs, path)"
            )
        return model, examples[0], examples[1], f"moefx directory {spec}"
    from moefx.models import load_model

    loaded = load_model(spec)
    model = loaded.model
    examples = _token_inputs(model, batch, seq)
    if examples is not None:
        kwargs = {k: v for k, v in (loaded.example_kwargs or {}).items() if not hasattr(v, "shape")}
        kwargs.update(examples[1])
        return model, examples[0], kwargs, str(getattr(loaded, "source", spec))
    args = loaded.example_inputs
    args = (args,) if not isinstance(args, (tuple, list)) else tuple(args)
    return model, args, dict(loaded.example_kwargs or {}), str(getattr(loaded, "source", spec))


def run(args) -> int:
    from moefx.export import ExportError, VerificationError, export_onnx

    try:
        model, ex_args, ex_kwargs, source = load_for_export(args.model, args.batch, args.seq)
    except (OSError, ValueError, ImportError) as err:
        print(f"moefx export: cannot load {args.model!r}: {err}", file=sys.stderr)
        return 2
    print(f"loaded {source}", file=sys.stderr)
    if args.dtype is not None:
        import torch

        model = model.to(getattr(torch, args.dtype))
    try:
        report = export_onnx(
            model, ex_args, args.onnx, target=args.target, dynamic=not args.static,
            verify=not args.no_verify, example_kwargs=ex_kwargs, accept_gelu_tanh=args.accept_gelu_tanh,
        )
    except VerificationError as err:
        print(f"moefx export: verification failed: {err}", file=sys.stderr)
        return 1
    except ExportError as err:
        print(f"moefx export: {err}", file=sys.stderr)
        return 1
    print(report)
    return 0
