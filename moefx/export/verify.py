"""Run an exported .onnx file in onnxruntime and compare it with the PyTorch model.

The comparison is norm-wise: ``max|onnx - torch| / max|torch|`` per output, so that outputs near
zero do not turn rounding into huge element-wise ratios. Tolerances follow SPEC.md §3 loosened
for a whole graph (fp32 1e-4, half types 1e-2). Checked on the example inputs and on a second
shape where every dynamic axis is 1 (batch 1, sequence 1): the decode shape, and the one where
reshape or broadcast mistakes in a translation show up.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils import _pytree as pytree

RTOL = {torch.float32: 1e-4, torch.float64: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


class VerificationError(RuntimeError):
    """The ONNX file disagrees with PyTorch past tolerance (or onnxruntime cannot run it)."""


@dataclasses.dataclass
class VerifyResult:
    provider: str
    shapes: str
    output: str
    rel_err: float
    tol: float

    @property
    def ok(self) -> bool:
        return bool(self.rel_err <= self.tol)

    def __str__(self) -> str:
        mark = "ok" if self.ok else "FAIL"
        return f"{self.provider:<26} {self.shapes:<28} {self.output:<16} rel err {self.rel_err:.2e} (tol {self.tol:.0e}) {mark}"


def providers() -> list[str]:
    """CPU always; CUDA as well when this onnxruntime build has it."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    out = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        out.append("CUDAExecutionProvider")
    return out


def session(path: str, provider: str = "CPUExecutionProvider", threads: Optional[int] = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    chain = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    return ort.InferenceSession(path, options, providers=chain)


def feeds(exported_program, args: tuple, kwargs: dict) -> dict:
    """Map the user tensors of (args, kwargs) to the ONNX input names (the placeholder names of
    the ExportedProgram, which the ONNX exporter keeps)."""
    from torch.export.graph_signature import InputKind, TensorArgument

    flat, _ = pytree.tree_flatten((args, kwargs))
    specs = [s for s in exported_program.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    if len(specs) != len(flat):
        raise VerificationError(
            f"cannot match {len(flat)} example values to the {len(specs)} user inputs of the exported program"
        )
    out = {}
    for spec, value in zip(specs, flat):
        if isinstance(spec.arg, TensorArgument) and isinstance(value, torch.Tensor):
            out[spec.arg.name] = value.detach().cpu().numpy()
    return out


def torch_outputs(model, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(*args, **kwargs)
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def resize_inputs(args: tuple, kwargs: dict, dynamic_axes: dict, size: int = 1):
    """Copies of the example inputs with every dynamic axis cut to ``size``. Integer tensors keep
    (a prefix of) their own values, so token ids stay in the vocabulary and masks stay masks;
    float tensors get fresh normal values with the example's mean and spread."""
    flat, spec = pytree.tree_flatten((args, kwargs))
    out = []
    gen = torch.Generator().manual_seed(1234)
    for i, value in enumerate(flat):
        axes = dynamic_axes.get(i, ())
        if not isinstance(value, torch.Tensor) or not axes:
            out.append(value)
            continue
        index = tuple(slice(0, size) if a in axes else slice(None) for a in range(value.dim()))
        small = value[index]
        if value.is_floating_point():
            mean, std = value.float().mean(), value.float().std().clamp_min(1e-3)
            fresh = torch.randn(small.shape, generator=gen) * std + mean
            small = fresh.to(value.dtype)
        out.append(small.clone())
    return pytree.tree_unflatten(out, spec)


def _holds_bfloat16(exported_program) -> bool:
    state = getattr(exported_program, "state_dict", None) or {}
    return any(getattr(v, "dtype", None) == torch.bfloat16 for v in state.values())


def compare(path: str, exported_program, input_sets: Sequence, expected_sets: Sequence,
            rtol: Optional[float] = None) -> list[VerifyResult]:
    """Run ``path`` on every provider and every ``(args, kwargs)`` of ``input_sets`` against
    the PyTorch outputs ``expected_sets``; raise :class:`VerificationError` naming the worst
    output past tolerance."""
    results = []
    for provider in providers():
        try:
            sess = session(path, provider)
        except Exception as err:  # onnxruntime raises its own exception types
            hint = ""
            if provider == "CPUExecutionProvider" and "NOT_IMPLEMENTED" in str(err) and _holds_bfloat16(exported_program):
                hint = (". onnxruntime's CPU provider has no bfloat16 kernels for most ops: export a "
                        "float32 copy (model.float(); `moefx export --dtype float32`) or a float16 one "
                        "(model.half()), or pass verify=False to write the bfloat16 file for a runtime "
                        "that runs it")
            raise VerificationError(f"onnxruntime ({provider}) cannot load {path}: {err}{hint}") from err
        names = [o.name for o in sess.get_outputs()]
        for (args, kwargs), expected in zip(input_sets, expected_sets):
            feed = feeds(exported_program, args, kwargs)
            shapes = ",".join("x".join(map(str, v.shape)) for v in feed.values())
            try:
                got = sess.run(None, feed)
            except Exception as err:
                raise VerificationError(f"onnxruntime ({provider}) failed on inputs of shape {shapes}: {err}") from err
            if len(got) != len(expected):
                raise VerificationError(
                    f"the ONNX graph has {len(got)} outputs, PyTorch returned {len(expected)} tensors"
                )
            for name, g, e in zip(names, got, expected):
                tol = rtol if rtol is not None else RTOL.get(e.dtype, 1e-4)
                ref = e.detach().to(torch.float64).cpu().numpy()
                if g.shape != ref.shape:
                    raise VerificationError(
                        f"output {name}: ONNX shape {g.shape} != PyTorch shape {ref.shape} on inputs {shapes} ({provider})"
                    )
                if ref.size == 0:
                    err = 0.0
                elif not np.isfinite(g).all() and np.isfinite(ref).all():
                    err = float("inf")
                else:
                    scale = max(float(np.abs(ref).max()), 1e-6)
                    err = float(np.abs(g.astype(np.float64) - ref).max()) / scale
                results.append(VerifyResult(provider.replace("ExecutionProvider", ""), shapes, name, err, tol))
    bad = [r for r in results if not r.ok]
    if bad:
        worst = max(bad, key=lambda r: r.rel_err)
        lines = "\n  ".join(str(r) for r in results)
        raise VerificationError(
            f"ONNX output {worst.output} differs from PyTorch: relative error {worst.rel_err:.3e} > "
            f"{worst.tol:.0e} on inputs {worst.shapes} ({worst.provider}). All checks:\n  {lines}\n"
            "The .onnx file was not written. Re-export with verify=False (CLI --no-verify) to keep "
            "it anyway, or target='portable' to rule out the com.microsoft.MoE path."
        )
    return results
