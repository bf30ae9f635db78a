"""A custom op with no ONNX translation, defined once for the exporter's error tests (an op
name can be registered only once per process)."""
import torch


@torch.library.custom_op("moefx_test::mystery", mutates_args=())
def mystery(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@mystery.register_fake
def _(x):
    return torch.empty_like(x)
