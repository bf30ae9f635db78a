"""moefx: find the dense FFN blocks of a PyTorch model and rewrite them into Mixture-of-Experts.

The public API, and nothing else, lives here. Names resolve lazily so that ``import moefx``
stays cheap (no transformers, onnx or triton import until a feature needs it).

    ffns  = moefx.find_ffns(model, example_inputs)
    model = moefx.convert(model, moefx.XMoEConfig(num_experts=16, threshold=0.9), example_inputs)
    moefx.calibrate(model, batches)
    moefx.save(model, "out/"); model = moefx.load("out/")
    moefx.export_onnx(model, example_inputs, "m.onnx", target="ort")
"""
from __future__ import annotations

import importlib

from .config import ConfigError, SliceMoEConfig, XMoEConfig

__version__ = "0.1.0"

_LAZY = {
    "capture": ("moefx.capture", "capture"),
    "CaptureError": ("moefx.capture", "CaptureError"),
    "find_ffns": ("moefx.passes.find_ffn", "find_ffns"),
    "FFNMatch": ("moefx.passes.find_ffn", "FFNMatch"),
    "convert": ("moefx.convert", "convert"),
    "calibrate": ("moefx.convert", "calibrate"),
    "save": ("moefx.convert.io", "save"),
    "load": ("moefx.convert.io", "load"),
    "optimize": ("moefx.passes.optimize", "optimize"),
    "export_onnx": ("moefx.export", "export_onnx"),
    "aux_loss": ("moefx.metrics", "aux_loss"),
    "metrics": ("moefx.metrics", None),
    "layers": ("moefx.layers", None),
    "kernels": ("moefx.kernels", None),
    "passes": ("moefx.passes", None),
}

__all__ = ["ConfigError", "SliceMoEConfig", "XMoEConfig", "__version__", *_LAZY]


def __getattr__(name: str):
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'moefx' has no attribute {name!r}") from None
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
