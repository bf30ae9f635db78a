"""moefx: find the dense FFN blocks of a PyTorch model and rewrite them into Mixture-of-Experts.

The public API, and nothing else, lives here. Most names resolve lazily so that ``import moefx``
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

# ``capture`` and ``convert`` name both a function and the submodule that defines it. Importing
# a submodule sets the package attribute to the module, so these two are bound eagerly, after
# their modules are imported, and stay functions whatever is imported later.
from .capture import CaptureError, capture  # noqa: E402
from .convert import ConversionError, calibrate, convert  # noqa: E402

_LAZY = {
    "find_ffns": ("moefx.passes.find_ffn", "find_ffns"),
    "FFNMatch": ("moefx.passes.find_ffn", "FFNMatch"),
    "save": ("moefx.convert.io", "save"),
    "load": ("moefx.convert.io", "load"),
    "optimize": ("moefx.passes.optimize", "optimize"),
    "export_onnx": ("moefx.export", "export_onnx"),
    "ExportError": ("moefx.export", "ExportError"),
    "VerificationError": ("moefx.export.verify", "VerificationError"),
    "aux_loss": ("moefx.metrics", "aux_loss"),
    "metrics": ("moefx.metrics", None),
    "layers": ("moefx.layers", None),
    "kernels": ("moefx.kernels", None),
    "passes": ("moefx.passes", None),
}

__all__ = [
    "CaptureError", "ConfigError", "ConversionError", "SliceMoEConfig", "XMoEConfig", "__version__",
    "calibrate", "capture", "convert", *_LAZY,
]


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
