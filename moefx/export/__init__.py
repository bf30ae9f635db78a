"""Export moefx models to ONNX for onnxruntime (or any ONNX runtime).

    report = moefx.export_onnx(model, example_inputs, "m.onnx", target="ort", verify=True)
    print(report)

Pipeline: ``torch.export`` (non-strict, dynamic batch and sequence axes) → ``torch.onnx.export
(dynamo=True)`` with moefx's translation table (:mod:`moefx.export.translations`) → weight
slices folded → written to a temporary file beside the destination → checked in onnxruntime →
``os.replace`` onto the destination. A failure at any step leaves no .onnx behind and the
destination untouched.

Targets: ``"portable"`` emits standard ONNX ops only; ``"ort"`` emits ``com.microsoft.MoE``
for every layer it can express exactly and the portable form for the rest
(:func:`moefx.export.ort.plan_layer` gives the reasons, which the report lists).
"""
from __future__ import annotations

import dataclasses
import inspect
import io
import os
import shutil
import tempfile
import time
import contextlib
import warnings
from typing import Any, Optional

import torch
from torch.utils import _pytree as pytree

from moefx.export.verify import VerificationError, VerifyResult, compare, resize_inputs, torch_outputs

TARGETS = ("ort", "portable")
EXTERNAL_DATA_BYTES = 1_800_000_000
"""Past this many bytes of weights the file uses external data (protobuf's hard limit is 2 GiB)."""

__all__ = ["ExportError", "ExportReport", "VerificationError", "export_onnx", "register_translation"]


class ExportError(RuntimeError):
    """The model cannot be exported as asked; the message says where and what to do."""


def register_translation(qualified_name: str, fn) -> None:
    """Give a custom op of another room (e.g. a fused op) its ONNX form; see
    :func:`moefx.export.translations.register_translation`."""
    from moefx.export.translations import register_translation as _register

    _register(qualified_name, fn)


@dataclasses.dataclass
class ExportReport:
    """What one export did: per MoE layer, what was emitted and why; the file; the checks."""

    path: str
    target: str
    opset: int
    layers: list
    op_counts: dict
    file_bytes: int
    external_data: bool
    verification: list
    seconds: float
    notes: list = dataclasses.field(default_factory=list)

    @property
    def contrib_layers(self) -> int:
        return sum(1 for p in self.layers if p.emitted == "com.microsoft.MoE")

    def __str__(self) -> str:
        size = self.file_bytes / 2**20
        lines = [
            f"exported {self.path} ({size:.1f} MiB{', external data' if self.external_data else ''}), "
            f"target={self.target}, opset {self.opset}, {self.seconds:.1f} s",
        ]
        if self.layers:
            lines.append(f"MoE layers: {len(self.layers)} ({self.contrib_layers} as com.microsoft.MoE)")
            width = max(len(p.path) for p in self.layers)
            for p in self.layers:
                lines.append(f"  {p.path:<{width}}  {p.kind:<8}  {p.emitted:<17}  {p.reason}")
        else:
            lines.append("MoE layers: none (dense model)")
        contrib = {k: v for k, v in self.op_counts.items() if "::" in k}
        top = sorted(self.op_counts.items(), key=lambda kv: -kv[1])[:10]
        lines.append(f"nodes: {sum(self.op_counts.values())}; non-standard: "
                     + (", ".join(f"{k} x{v}" for k, v in sorted(contrib.items())) or "none"))
        lines.append("most frequent ops: " + ", ".join(f"{k} x{v}" for k, v in top))
        if self.verification:
            worst = max(self.verification, key=lambda r: r.rel_err)
            shapes = ", ".join(dict.fromkeys(r.shapes for r in self.verification))
            providers = ", ".join(dict.fromkeys(r.provider for r in self.verification))
            lines.append(f"verified in onnxruntime ({providers}) on inputs {shapes}: worst relative error "
                         f"{worst.rel_err:.2e} (inputs {worst.shapes})")
        else:
            lines.append("not verified (verify=False)")
        lines.extend(self.notes)
        return "\n".join(lines)


# ------------------------------------------------------------------ dynamic shapes


def _dynamic_axes_for(value) -> tuple:
    """Axes exported as dynamic by default: batch, and sequence where the layout has one."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.dim() == 1:
        return ()
    if value.dim() == 2:
        return (0,) if value.is_floating_point() else (0, 1)
    if value.dim() == 3:
        return (0, 1)
    return (0,)


def _default_dynamic(model, args: tuple, kwargs: dict):
    """``(dynamic_shapes for torch.export, {flat index: axes})``: one shared ``batch`` Dim and
    one shared ``seq`` Dim across all inputs."""
    batch = torch.export.Dim("batch")
    seq = torch.export.Dim("seq")
    names = {0: batch, 1: seq}

    def spec(value):
        axes = _dynamic_axes_for(value)
        return {a: names[a] for a in axes} if axes else None

    flat, _ = pytree.tree_flatten((args, kwargs))
    axes_by_index = {i: _dynamic_axes_for(v) for i, v in enumerate(flat) if _dynamic_axes_for(v)}
    signature = inspect.signature(model.forward)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as err:
        raise ExportError(f"example inputs do not fit {type(model).__name__}.forward{signature}: {err}") from err
    shapes = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind == inspect.Parameter.VAR_POSITIONAL:
            shapes[name] = tuple(pytree.tree_map(spec, v) for v in value)
        elif kind == inspect.Parameter.VAR_KEYWORD:
            shapes[name] = {k: pytree.tree_map(spec, v) for k, v in value.items()}
        else:
            shapes[name] = pytree.tree_map(spec, value)
    return shapes, axes_by_index


def _dynamic_axes_of(exported_program) -> dict:
    """``{flat input index: axes}`` of the axes the exported program really left symbolic,
    whoever chose them (the defaults or the user's ``dynamic_shapes``)."""
    from torch.export.graph_signature import InputKind

    placeholders = {n.name: n for n in exported_program.graph.nodes if n.op == "placeholder"}
    specs = [s for s in exported_program.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    out = {}
    for i, spec in enumerate(specs):
        node = placeholders.get(getattr(spec.arg, "name", None))
        value = node.meta.get("val") if node is not None else None
        if isinstance(value, torch.Tensor):
            axes = tuple(a for a, size in enumerate(value.shape) if not isinstance(size, int))
            if axes:
                out[i] = axes
    return out


def _widen_for_trace(args, kwargs, axes_by_index):
    """torch.export specialises a dynamic axis whose example size is 0 or 1; repeat such axes
    to size 2 for the trace (every op here is row-wise, so the graph is the same)."""
    flat, spec = pytree.tree_flatten((args, kwargs))
    changed = False
    for i, axes in axes_by_index.items():
        value = flat[i]
        for a in axes:
            if value.shape[a] < 2:
                reps = [1] * value.dim()
                reps[a] = 2 if value.shape[a] == 1 else 0
                if value.shape[a] == 0:
                    raise ExportError(f"example input {i} has size 0 on axis {a}; give at least one row")
                value = value.repeat(*reps)
                changed = True
        flat[i] = value
    if not changed:
        return args, kwargs
    return pytree.tree_unflatten(flat, spec)


# ------------------------------------------------------------------ the exporter


def _uncalled_layers(model) -> set:
    """Paths of the MoE layers that a GraphModule holds but never calls as modules (lowered by
    ``moefx.optimize`` or inlined by capture): they must not be swapped for the contrib op, as
    the graph reads their parameters directly."""
    from moefx.export import ort as ort_target

    if not isinstance(model, torch.fx.GraphModule):
        return set()
    called = {n.target for n in model.graph.nodes if n.op == "call_module"}
    return {p for p, _ in ort_target.moe_layers(model)
            if p != "<root>" and not any(p == c or p.startswith(c + ".") for c in called)}


def _normalise_inputs(example_inputs, example_kwargs):
    if isinstance(example_inputs, torch.Tensor):
        args = (example_inputs,)
    elif isinstance(example_inputs, (tuple, list)):
        args = tuple(example_inputs)
    elif isinstance(example_inputs, dict) and example_kwargs is None:
        args, example_kwargs = (), dict(example_inputs)
    else:
        raise ExportError(
            f"example_inputs must be a tensor, a tuple of positional inputs or a dict of keyword "
            f"inputs, got {type(example_inputs).__name__}"
        )
    return args, dict(example_kwargs or {})


@contextlib.contextmanager
def _quiet():
    """The ONNX exporter prints progress lines, and logs and warns about things moefx handles
    (e.g. torchvision ops it cannot register)."""
    import logging

    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.redirect_stdout(io.StringIO()):
                yield
    finally:
        logger.setLevel(level)


def export_onnx(
    model: torch.nn.Module,
    example_inputs,
    path: str,
    target: str = "ort",
    dynamic: bool = True,
    verify: bool = True,
    *,
    example_kwargs: Optional[dict] = None,
    dynamic_shapes: Any = None,
    accept_gelu_tanh: bool = False,
    opset: Optional[int] = None,
    rtol: Optional[float] = None,
    external_data: Optional[bool] = None,
) -> ExportReport:
    """Export ``model`` to ``path`` (.onnx) and return an :class:`ExportReport`.

    ``target="ort"`` emits ``com.microsoft.MoE`` where exact (SPEC.md §4) and the portable form
    elsewhere; ``target="portable"`` emits standard ONNX ops only (opset >= 18). ``dynamic``
    makes batch and sequence axes dynamic (dim 0 of every input of rank >= 2, and dim 1 of 3-D
    inputs and 2-D integer inputs such as token ids); pass ``dynamic_shapes`` (torch.export
    format) to choose yourself. ``verify`` runs the file in onnxruntime on the examples and on a
    batch-1/sequence-1 shape and raises :class:`VerificationError` past tolerance (fp32 1e-4
    relative), in which case nothing is written. ``accept_gelu_tanh`` lets erf-GELU layers use
    the contrib op's tanh GELU (then verification compares against that approximation).
    ``external_data`` forces (True) or forbids (False) a separate ``path + ".data"`` weight file;
    by default it is used past 1.8 GB of weights.
    """
    from moefx.export import ort as ort_target
    from moefx.export import portable, translations

    started = time.perf_counter()
    if target not in TARGETS:
        raise ExportError(f"target must be one of {TARGETS}, got {target!r}")
    if not isinstance(model, torch.nn.Module):
        raise ExportError(f"export_onnx needs an nn.Module, got {type(model).__name__}")
    path = os.fspath(path)
    if not path.endswith(".onnx"):
        raise ExportError(f"the output path must end in .onnx, got {path!r}")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ExportError(f"the directory of {path!r} does not exist; create {directory} first")
    if opset is not None and opset < 18:
        raise ExportError(f"opset must be 18 or later (the translations use opset-18 ops), got {opset}")
    args, kwargs = _normalise_inputs(example_inputs, example_kwargs)

    was_training = model.training
    model.eval()
    try:
        lowered = _uncalled_layers(model)
        plans = [
            ort_target.LayerPlan(p, type(layer).__name__, ort_target.PORTABLE, "lowered (moefx.optimize): its "
                                 "moefx ops export in standard ONNX ops") if p in lowered
            else ort_target.plan_layer(p, layer, target, accept_gelu_tanh)
            for p, layer in ort_target.moe_layers(model)
        ]
        approximated = any(p.approximated for p in plans)
        if dynamic and dynamic_shapes is None:
            dyn_shapes, default_axes = _default_dynamic(model, args, kwargs)
            trace_args, trace_kwargs = _widen_for_trace(args, kwargs, default_axes)
        else:
            dyn_shapes = dynamic_shapes if dynamic else None
            trace_args, trace_kwargs = args, kwargs
        table = translations.translation_table()

        with ort_target.swapped_layers(model, plans) as module:
            try:
                with torch.no_grad():
                    ep = torch.export.export(module, trace_args, trace_kwargs, dynamic_shapes=dyn_shapes, strict=False)
            except Exception as err:
                raise ExportError(
                    f"torch.export could not capture {type(model).__name__}: {type(err).__name__}: {err}\n"
                    "For Hugging Face decoders pass example_kwargs={'use_cache': False}; to fix the "
                    "dynamic axes pass dynamic_shapes=... (torch.export format) or dynamic=False."
                ) from err
            missing = portable.untranslated_nodes(ep, table, _torchlib_has)
            if missing:
                raise ExportError(
                    "no ONNX translation for " + "; ".join(missing) + ". Export the model "
                    "before lowering/fusion passes (XMoE and SliceMoE layers export directly), or "
                    "register a translation with moefx.export.register_translation('namespace::op', fn)."
                )
            try:
                with _quiet():
                    program = _to_onnx(ep, table, opset)
            except Exception as err:
                raise ExportError(f"ONNX conversion failed: {type(err).__name__}: {err}") from err
            input_sets = _input_sets(args, kwargs, _dynamic_axes_of(ep)) if verify else []
            expected = [torch_outputs(module, a, k) for a, k in input_sets] if approximated else None

        onnx_model = program.model
        with _quiet():
            portable.optimize(onnx_model)
        counts = portable.op_counts(onnx_model)
        if target == "portable":
            foreign = portable.non_standard_ops(onnx_model)
            if foreign:
                raise ExportError(f"target='portable' produced non-standard ops {foreign}; this is a moefx bug")
        opset_used = onnx_model.opset_imports.get("", 0)
        weight_bytes = sum(
            v.const_value.nbytes for v in onnx_model.graph.initializers.values() if v.const_value is not None
        )
        use_external = external_data if external_data is not None else weight_bytes > EXTERNAL_DATA_BYTES
        if not use_external and weight_bytes >= 2**31:
            raise ExportError(
                f"the weights take {weight_bytes / 2**30:.2f} GiB, past protobuf's 2 GiB limit for one "
                "file; leave external_data unset (or True) to write them to a .data file"
            )

        verification: list[VerifyResult] = []
        tmpdir = tempfile.mkdtemp(prefix=".moefx-export-", dir=directory)
        try:
            tmp_path = os.path.join(tmpdir, os.path.basename(path))
            program.save(tmp_path, external_data=use_external)
            if verify:
                if expected is None:
                    expected = [torch_outputs(model, a, k) for a, k in input_sets]
                verification = compare(tmp_path, ep, input_sets, expected, rtol)
            data_name = os.path.basename(path) + ".data"
            if use_external:
                os.replace(os.path.join(tmpdir, data_name), path + ".data")
            os.replace(tmp_path, path)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
    finally:
        model.train(was_training)

    notes = []
    if approximated:
        notes.append("note: erf GELU layers use the tanh form (accept_gelu_tanh=True); the file "
                     "differs from the PyTorch model by that approximation")
    return ExportReport(
        path=path, target=target, opset=opset_used, layers=plans, op_counts=dict(counts),
        file_bytes=os.path.getsize(path) + (os.path.getsize(path + ".data") if use_external else 0),
        external_data=use_external, verification=verification,
        seconds=time.perf_counter() - started, notes=notes,
    )


_REGISTRIES: dict = {}


def _torchlib_registry(opset: Optional[int]):
    """The torchlib registry for ``opset`` (built once per process), or None when the private
    API has moved."""
    try:
        from torch.onnx._internal.exporter import _constants, _registration
    except ImportError:
        return None
    opset_version = opset or torch.onnx._constants.ONNX_DEFAULT_OPSET
    registry_opset = max(opset_version, _constants.TORCHLIB_OPSET)
    base = _REGISTRIES.get(registry_opset)
    if base is None:
        with _quiet():
            base = _registration.ONNXRegistry.from_torchlib(opset_version=registry_opset)
        _REGISTRIES[registry_opset] = base
    return base


def _torchlib_has(target) -> bool:
    registry = _torchlib_registry(None)
    return registry is not None and registry.is_registered(target)


def _to_onnx(ep, table: dict, opset: Optional[int]):
    """``torch.onnx.export(ep, dynamo=True, custom_translation_table=table, optimize=False)``,
    reusing the torchlib registry across calls: building it costs about 2.5 s per export, which
    would dominate exporting small models (and the test suite). Falls back to the public call
    when the private entry point moves."""
    try:
        from torch.onnx._internal.exporter import _core
    except ImportError:
        _core = None
    base = _torchlib_registry(opset)
    if _core is None or base is None or not hasattr(_core, "export"):
        return torch.onnx.export(ep, dynamo=True, custom_translation_table=table, opset_version=opset,
                                 optimize=False, verbose=False)
    import copy

    opset_version = opset or torch.onnx._constants.ONNX_DEFAULT_OPSET
    registry = copy.copy(base)
    registry.functions = {k: list(v) for k, v in base.functions.items()}
    for target, fn in table.items():
        registry.register_op(target, fn, is_complex=False)
    return _core.export(ep, registry=registry, optimize=False, opset_version=opset_version, verbose=False)


def _input_sets(args, kwargs, axes_by_index) -> list:
    """The examples, and the same inputs cut to size 1 on every dynamic axis."""
    sets = [(args, kwargs)]
    if axes_by_index:
        sets.append(resize_inputs(args, kwargs, axes_by_index, size=1))
    return sets
