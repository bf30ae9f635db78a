"""Dense -> MoE conversion: capture, find, partition, rewrite; then calibration and save/load.

``convert(model, config, example_inputs)`` is the one call users make. It validates every
chosen block's config *before* touching the model, so a bad value leaves the model as it was;
builds every new layer; then places them (module swap, chain swap, or graph edit: see
:mod:`moefx.convert.rewrite`). The returned model carries ``moefx_recipe`` (what was converted,
where, with which config), which :func:`moefx.save` writes next to the weights.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Iterable, Optional, Union

import torch
from torch import nn

from ..config import COACTIVATION_SPLITS, SliceMoEConfig, XMoEConfig
from .calibrate import CalibrationReport, Inputs, calibrate
from .rewrite import (ConversionError, drop_unused_weights, graph_replace, occurrences, plan, select,
                      set_submodule, unique_name)

__all__ = ["convert", "calibrate", "ConversionError", "CalibrationReport", "Inputs"]

Config = Union[XMoEConfig, SliceMoEConfig]


def _needs_stats(cfg: Config) -> bool:
    return isinstance(cfg, XMoEConfig) and (cfg.num_shared > 0 or cfg.split in COACTIVATION_SPLITS)


def _where(m) -> str:
    return m.path if m.path else m.name


def _validate(chosen) -> None:
    for m, cfg in chosen:
        if not isinstance(cfg, (XMoEConfig, SliceMoEConfig)):
            raise ConversionError(f"'{_where(m)}': config must be an XMoEConfig or SliceMoEConfig, got {type(cfg).__name__}")
        cfg.validate_for(m.d_model, m.d_ff, _where(m))
        if isinstance(cfg, XMoEConfig):
            from .partition import group_width

            h = group_width(m.d_ff, cfg.num_experts, cfg.num_shared)
            if cfg.num_shared and cfg.num_shared * h >= m.d_ff:
                from ..config import ConfigError

                raise ConfigError(
                    f"num_shared={cfg.num_shared} shared experts take all {m.d_ff} neurons at "
                    f"'{_where(m)}'; use fewer shared experts"
                )


def _run(model, batch) -> None:
    from .calibrate import run_batch

    run_batch(model, batch)


def _collect_stats(model, gm, placements, chosen, batches, progress: bool) -> dict:
    """Neuron statistics of the blocks that need them, from one pass over ``batches``."""
    from .dense import DenseFFN
    from .partition import StatsAccumulator

    need = [(p, cfg) for p, (_, cfg) in zip(placements, chosen) if _needs_stats(cfg)]
    if not need:
        return {}
    accs = {}
    for p, cfg in need:
        dense = DenseFFN.from_dict(p.match.dense_weights(model), p.match.activation)
        accs[id(p.match)] = StatsAccumulator(dense, coactivation=cfg.split in COACTIVATION_SPLITS)
    batches = list(batches)
    if all(p.how != "graph" for p, _ in need):
        hooks = []
        for p, _ in need:
            target = p.match.path if p.how == "module" else p.chain[0]
            mod = model.get_submodule(target) if target else model
            acc = accs[id(p.match)]
            hooks.append(mod.register_forward_pre_hook(lambda m, a, acc=acc: acc.add(a[0])))
        try:
            with torch.no_grad():
                for b in batches:
                    _run(model, b)
        finally:
            for h in hooks:
                h.remove()
    else:
        import torch.fx as fx
        import torch.utils._pytree as pytree

        from ..capture import prepare_kwargs

        wanted = {p.match.input_node: accs[id(p.match)] for p, _ in need}

        class Recorder(fx.Interpreter):
            def run_node(self, n):
                value = super().run_node(n)
                if n in wanted:
                    wanted[n].add(value)
                return value

        with torch.no_grad():
            for b in batches:
                args, kwargs = Inputs.of(b).args, Inputs.of(b).kwargs
                leaves = pytree.tree_leaves((tuple(args), prepare_kwargs(model, kwargs)))
                Recorder(gm).run(*leaves)
    return {(p.match.path if p.match.path is not None else p.match.name): accs[id(p.match)].result() for p, _ in need}


def convert(
    model: nn.Module,
    config: Union[Config, Dict[str, Config]],
    example_inputs=None,
    example_kwargs: Optional[dict] = None,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
    *,
    calibration_batches: Optional[Iterable] = None,
    source: Optional[dict] = None,
    seed: int = 0,
    matches=None,
) -> nn.Module:
    """Rewrite the dense FFNs of ``model`` into XMoE or SliceMoE layers; return the model.

    ``config``: one :class:`XMoEConfig`/:class:`SliceMoEConfig` for every block, or a map from
    module path (or match name, for functional blocks) to config; blocks not in the map stay
    dense. ``filter_fn(module, fqn) -> bool`` narrows the choice further. The result is the
    same ``model`` object with submodules swapped whenever every chosen block sits in whole
    submodules, the MoE layer itself when the model *is* one FFN, and a GraphModule otherwise.
    ``calibration_batches`` (inputs as the model takes them) feed the activation statistics
    that the co-activation splits (``split="coactivation"``, ``"kmeans-coactivation"``) and
    shared neurons (``num_shared``) need; without them the example inputs are used.
    ``source`` (a ``moefx.models.LoadedModel.source``) is recorded for :func:`moefx.load`.
    Conversion is exact before calibration for XMoE with ``combine="unit"`` (every expert kept
    reproduces the dense FFN).
    """
    from ..passes.find_ffn import find_ffns

    if not isinstance(model, nn.Module):
        raise TypeError(f"convert() needs an nn.Module, got {type(model).__name__}")
    if matches is None:
        matches = find_ffns(model, example_inputs, example_kwargs)
    if not matches:
        from ..layers import SliceMoE, XMoE

        moe = [name or "<root>" for name, m in model.named_modules() if isinstance(m, (XMoE, SliceMoE))]
        if moe:
            listed = ", ".join(moe[:4]) + (" ..." if len(moe) > 4 else "")
            raise ConversionError(
                f"no dense FFN block left in {type(model).__name__}: it already holds {len(moe)} moefx "
                f"MoE layer(s) ({listed}). To convert with another configuration, convert a fresh "
                "copy of the dense model (convert() swaps layers in the model it is given)"
            )
        raise ConversionError(
            f"no dense FFN block found in {type(model).__name__}: nothing to convert. "
            "`moefx inspect MODEL --explain` lists near-misses and why they were rejected"
        )
    chosen = select(model, matches, config, filter_fn)
    if not chosen:
        listed = ", ".join(repr(_where(m)) for m in matches[:8]) + (" ..." if len(matches) > 8 else "")
        raise ConversionError(
            f"the filter/config map selected none of the {len(matches)} FFN blocks ({listed}); "
            "pass paths from this list or a filter_fn that accepts some of them"
        )
    _validate(chosen)
    placements = plan([m for m, _ in chosen])
    use_graph = any(p.how == "graph" for p in placements)
    if use_graph:
        chosen, placements, matches = _dynamic_graph(model, example_inputs, example_kwargs, matches, chosen,
                                                     placements)
    gm = chosen[0][0].graph_module
    stats = {}
    if any(_needs_stats(cfg) for _, cfg in chosen):
        batches = calibration_batches
        if batches is None:
            batches = [Inputs(example_inputs, example_kwargs)]
        stats = _collect_stats(model, gm, placements, chosen, batches, progress=False)

    from ..passes.to_slicemoe import slicemoe_layer_for
    from ..passes.to_xmoe import xmoe_layer_for

    layers = []
    built = {}  # one layer per (weights, config): a block called at several places (ALBERT's
    # shared layers) stays one set of parameters, fitted on the inputs of every call
    for p, (m, cfg) in zip(placements, chosen):
        key = m.path if m.path is not None else m.name
        weights_key = (tuple(sorted(m.weights.items())), repr(cfg))
        if weights_key in built:
            layers.append(built[weights_key])
        elif isinstance(cfg, XMoEConfig):
            layers.append(xmoe_layer_for(m, cfg, model, stats=stats.get(key), seed=seed))
        else:
            layers.append(slicemoe_layer_for(m, cfg, model, seed=seed))
        built[weights_key] = layers[-1]
        # the new layer takes the model's mode: a layer left in train mode inside an eval model
        # would compute balance losses (and train-time paths) at inference
        layers[-1].train(model.training)

    entries = []
    result: nn.Module = model
    if use_graph:
        if gm is None:
            raise ConversionError("a block needs a graph rewrite but find_ffns kept no GraphModule")
        names = {}
        occurrence = occurrences(matches)
        for p, (m, cfg), layer in zip(placements, chosen, layers):
            name = names.get(id(layer)) or unique_name(gm, f"moefx_{_kind(cfg)}_{m.path or m.name}")
            names[id(layer)] = name
            graph_replace(gm, m, layer, name)
            entries.append(_entry(m, cfg, layer, "graph", name, None))
            entries[-1]["occurrence"] = occurrence[id(m)][1]
        drop_unused_weights(gm, [fqn for m, _ in chosen for fqn in m.weights.values()])
        result = gm
    else:
        for p, (m, cfg), layer in zip(placements, chosen, layers):
            if p.how == "module":
                if m.path == "":
                    result = layer
                else:
                    set_submodule(model, m.path, layer)
                entries.append(_entry(m, cfg, layer, "module", m.path, None))
            else:
                set_submodule(model, p.chain[0], layer)
                for rest in p.chain[1:]:
                    set_submodule(model, rest, nn.Identity())
                entries.append(_entry(m, cfg, layer, "chain", p.chain[0], list(p.chain)))
    from .. import __version__

    recipe = {
        "moefx_version": __version__,
        "source": source,
        "base_class": type(model).__module__ + "." + type(model).__qualname__,
        "layers": entries,
    }
    object.__setattr__(result, "moefx_recipe", recipe)
    return result


def _dynamic_graph(model, example_inputs, example_kwargs, matches, chosen, placements):
    """The chosen blocks found again in a capture with dynamic batch/sequence dimensions: the
    GraphModule that conversion returns must run on other shapes than the example's. Keeps the
    static graph (with a warning) when the model cannot be captured so or its blocks differ."""
    import warnings

    from ..passes.find_ffn import find_ffns

    gm = chosen[0][0].graph_module
    if gm is not None and gm.meta.get("moefx_dynamic"):
        return chosen, placements, matches
    why = None
    try:
        again = find_ffns(model, example_inputs, example_kwargs, dynamic=True)
        static_keys, again_keys = occurrences(matches), occurrences(again)
        by_key = {again_keys[id(m)]: m for m in again}
        keys = [static_keys.get(id(m)) for m, _ in chosen]
        if again and again[0].graph_module.meta.get("moefx_dynamic") and all(k in by_key for k in keys):
            chosen = [(by_key[k], cfg) for k, (_, cfg) in zip(keys, chosen)]
            return chosen, plan([m for m, _ in chosen]), again
        why = "the blocks were not found again with dynamic shapes"
    except Exception as err:  # the static graph still converts; it only fixes the input shape
        why = f"{type(err).__name__}: {err}"
    warnings.warn(f"moefx.convert: the GraphModule it returns runs only on inputs shaped like the example "
                  f"inputs (a capture with dynamic batch/sequence failed: {why})", stacklevel=3)
    return chosen, placements, matches


def _kind(cfg) -> str:
    return "xmoe" if isinstance(cfg, XMoEConfig) else "slicemoe"


def _entry(m, cfg, layer, how, target, chain) -> dict:
    return {
        "match": m.path if m.path is not None else m.name,
        "name": m.name,
        "how": how,
        "target": target,
        "chain": chain,
        "kind": _kind(cfg),
        "config": dataclasses.asdict(cfg),
        "d_model": m.d_model,
        "d_ff": m.d_ff,
        "activation": m.activation,
        "glu": m.kind == "glu",
        "bias": bool(getattr(layer, "bias", None) is not None),
        "dense_params": m.num_params,
        "dense_flops_per_token": m.flops_per_token,
    }
