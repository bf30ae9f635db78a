"""moefx's compute kernels: importing this package registers the ``torch.ops.moefx`` ops.

``ops`` defines them with the portable PyTorch path; on a CUDA machine the Triton room's
``moefx.kernels.cuda`` module, when present, registers GPU kernels for the same ops.
"""
import torch

from moefx.kernels import ops  # noqa: F401  (registers torch.ops.moefx.*)
from moefx.kernels import reference  # noqa: F401

if torch.cuda.is_available():
    try:
        import moefx.kernels.cuda  # noqa: F401
    except ModuleNotFoundError as err:
        if err.name != "moefx.kernels.cuda":
            raise
