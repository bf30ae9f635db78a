"""Capture: ``nn.Module`` -> ``torch.fx.GraphModule``, the first stage of the pipeline.

``torch.export.export(..., strict=False)`` comes first: it traces through arbitrary Python (all
Hugging Face models), records for every node the module it came from (``nn_module_stack``) and,
once unlifted with ``ep.module()``, reads each parameter through a ``get_attr`` node whose target
is the parameter's fqn in the original model. That is what FFN discovery needs. Hugging Face
decoders return a cache object export cannot flatten, so ``use_cache=False`` is added to the
keyword arguments of any model whose config has ``use_cache``. With ``dynamic=True`` every input
dimension is ``Dim.AUTO`` (export keeps dynamic what the model lets vary, such as batch and
sequence, and specialises the rest; a static export is the fallback): conversion captures that
way when its result is a GraphModule, which must then run on other shapes than the example's.
Finding FFNs needs no more than a static graph, which captures about twice as fast.

When export fails (data-dependent Python control flow export cannot guard, unsupported ops),
moefx's own :class:`MoefxTracer` tries next: ``torch.fx`` symbolic tracing with ``nn.Linear``,
HF ``Conv1D``, activation modules and user-named modules as leaves, then ``ShapeProp`` on the
example inputs so shapes are known. If that fails too, :class:`CaptureError` lists why each way
failed.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.fx as fx
import torch.nn as nn


class CaptureError(RuntimeError):
    """Every capture method failed; ``.failures`` maps method name -> the exception."""

    def __init__(self, model: nn.Module, failures: dict):
        self.failures = failures
        lines = [f"could not capture {type(model).__name__} as an FX graph; each way failed:"]
        for method, err in failures.items():
            msg = str(err).strip().splitlines()
            first = msg[0] if msg else ""
            lines.append(f"  - {method}: {type(err).__name__}: {first[:400]}")
        lines.append(
            "what to do: check that the example inputs run the model (model(*inputs, **kwargs)); "
            "pass the modules that cannot be traced as leaf_modules=(...) (types or module "
            "paths); or move data-dependent Python control flow out of forward"
        )
        super().__init__("\n".join(lines))


def _as_tuple(example_inputs) -> tuple:
    if example_inputs is None:
        return ()
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    return (example_inputs,)


def prepare_kwargs(model: nn.Module, example_kwargs: Optional[dict]) -> dict:
    """Copy the kwargs and add ``use_cache=False`` for models whose forward accepts it."""
    kwargs = dict(example_kwargs or {})
    config = getattr(model, "config", None)
    if "use_cache" not in kwargs and config is not None and hasattr(config, "use_cache"):
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            params = {}
        if "use_cache" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
            kwargs["use_cache"] = False
    return kwargs


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:
        return None
    return Conv1D


class MoefxTracer(fx.Tracer):
    """``torch.fx`` tracer that keeps Linear-like and activation modules whole.

    Keeping ``nn.Linear``/``Conv1D``/activation modules as ``call_module`` leaves gives the
    canonicaliser one node per layer to lower, whatever their forward does internally; the
    user's leaves let a model with an untraceable submodule be captured around it.
    """

    def __init__(self, leaf_modules: Iterable = ()):
        super().__init__()
        self.leaf_types = tuple(t for t in leaf_modules if isinstance(t, type))
        self.leaf_paths = {p for p in leaf_modules if isinstance(p, str)}
        conv1d = _conv1d_type()
        self.builtin_leaves = (nn.Linear,) + ((conv1d,) if conv1d is not None else ())

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self.builtin_leaves) or isinstance(m, self.leaf_types):
            return True
        if module_qualified_name in self.leaf_paths:
            return True
        mod = type(m).__module__
        if mod.startswith("transformers.activations") or mod == "torch.nn.modules.activation":
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _auto_dims(value):
    """``dynamic_shapes`` for one input: every dimension of every tensor ``Dim.AUTO`` (export
    keeps dynamic what the model lets vary, e.g. batch and sequence, and specialises the rest)."""
    from torch.utils._pytree import tree_map

    return tree_map(lambda v: {i: torch.export.Dim.AUTO for i in range(v.dim())}
                    if isinstance(v, torch.Tensor) else None, value)


def _export(model: nn.Module, args: tuple, kwargs: dict, dynamic: bool = False) -> fx.GraphModule:
    """torch.export; with ``dynamic``, dynamic dimensions where the model allows them (a static
    export when the dynamic one fails: ``gm.meta["moefx_dynamic"]`` says which it got)."""
    import logging

    gm = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamic:
            quiet = logging.getLogger("torch._export.non_strict_utils")  # "dim ... specialized" notes
            level = quiet.level
            quiet.setLevel(logging.ERROR)
            try:
                spec = _dynamic_spec(model, args, kwargs, (_auto_dims(args), _auto_dims(kwargs)))
                gm = torch.export.export(model, args, kwargs, dynamic_shapes=spec, strict=False).module()
            except Exception:  # a model export cannot trace symbolically still captures statically
                gm = None
            finally:
                quiet.setLevel(level)
        dynamic_ok = gm is not None
        if gm is None:
            gm = torch.export.export(model, args, kwargs, strict=False).module()
    gm.meta["moefx_capture"] = "torch.export"
    gm.meta["moefx_dynamic"] = dynamic_ok
    return gm


def _dynamic_spec(model: nn.Module, args: tuple, kwargs: dict, dynamic):
    """``dynamic_shapes`` keyed as torch.export wants them: by the forward's parameter names."""
    arg_specs, kwarg_specs = dynamic
    names = [n for n, p in inspect.signature(model.forward).parameters.items()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(names):
        return tuple(arg_specs) + tuple(kwarg_specs.values()) if not kwargs else None
    spec = dict(zip(names, arg_specs))
    spec.update(kwarg_specs)
    return spec


def _fx_trace(model: nn.Module, args: tuple, kwargs: dict, leaf_modules) -> fx.GraphModule:
    from torch.fx.passes.shape_prop import ShapeProp

    tracer = MoefxTracer(leaf_modules)
    sig = inspect.signature(model.forward)
    names = [n for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    concrete = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
    tensor_kwargs = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    # Positional parameters beyond the given inputs that are not passed get their defaults baked in.
    for name in names[len(args):]:
        if name not in kwargs and sig.parameters[name].default is not inspect.Parameter.empty:
            concrete[name] = sig.parameters[name].default
    graph = tracer.trace(model, concrete_args=concrete or None)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    feed = list(args)
    for ph in placeholders[len(args):]:
        if ph.target in tensor_kwargs:
            feed.append(tensor_kwargs[ph.target])
    if len(feed) == len(placeholders):
        with torch.no_grad():
            ShapeProp(gm).propagate(*feed)
    gm.meta["moefx_capture"] = "fx"
    gm.meta["moefx_dynamic"] = True  # symbolic tracing records sizes as graph nodes, not constants
    return gm


def capture(
    model: nn.Module,
    example_inputs=None,
    example_kwargs: Optional[dict] = None,
    leaf_modules: Sequence[Union[type, str]] = (),
    methods: Sequence[str] = ("export", "fx"),
    dynamic: bool = False,
) -> fx.GraphModule:
    """Trace ``model`` on the example inputs into a GraphModule (see the module docstring).

    ``example_inputs`` is one tensor, a tuple of positional arguments, or a mapping of keyword
    arguments (a tokenizer's output); ``example_kwargs`` are
    keyword arguments (``use_cache=False`` is added for Hugging Face models). ``leaf_modules``
    (types or module paths) are kept whole by the fallback tracer. ``gm.meta["moefx_capture"]``
    says which method worked. ``dynamic``: keep the dimensions the model lets vary dynamic (see
    the module docstring). The returned graph is not canonicalised; FFN discovery does that in
    place.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"capture() needs an nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, Mapping) and example_kwargs is None:
        example_inputs, example_kwargs = (), dict(example_inputs)  # e.g. a tokenizer's output
    args = _as_tuple(example_inputs)
    kwargs = prepare_kwargs(model, example_kwargs)
    failures: dict = {}
    for method in methods:
        try:
            if method == "export":
                return _export(model, args, kwargs, dynamic)
            if method == "fx":
                return _fx_trace(model, args, kwargs, leaf_modules)
            raise ValueError(f"unknown capture method {method!r}; use 'export' or 'fx'")
        except Exception as err:  # each failure is reported, none is swallowed
            failures["torch.export.export(strict=False)" if method == "export" else
                     "moefx fx tracer (MoefxTracer)" if method == "fx" else method] = err
    raise CaptureError(model, failures)
