"""Saving and loading converted models: ``model.safetensors`` + ``recipe.json``.

The recipe says how to rebuild the architecture without the original weights: the base model
(a Hugging Face class and its config, or a ``moefx.models`` source such as a factory), then
each conversion as recorded by :func:`moefx.convert` (where, how, which config, widths,
partition). :func:`load` rebuilds the base model, places fresh MoE layers exactly as recorded
(module swap, chain swap, or graph edit after re-capturing), and loads the weights with
``strict=True`` from safetensors (no pickle is ever read).

Atomicity: everything is written into a fresh temporary directory next to the destination,
which is renamed into place only when complete. A crash leaves at most a hidden
``.NAME.tmp-*`` directory, never a half-written model at the destination; an existing
destination is replaced only with ``overwrite=True``, and then only after the new save is
complete (old moved aside, new renamed in, old removed).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Optional

import torch
from torch import nn

RECIPE = "recipe.json"
WEIGHTS = "model.safetensors"
FORMAT = 1


def _moe_entries(model: nn.Module) -> list:
    recipe = getattr(model, "moefx_recipe", None)
    if not recipe or not recipe.get("layers"):
        raise ValueError(
            f"{type(model).__name__} carries no moefx recipe: save() writes models returned by "
            "moefx.convert(...)"
        )
    return recipe["layers"]


def _base_record(model: nn.Module, recipe: dict, source: Optional[dict]) -> dict:
    import torch.fx as fx

    source = source or recipe.get("source")
    config = getattr(model, "config", None)
    if not isinstance(model, fx.GraphModule) and config is not None and hasattr(config, "to_dict"):
        return {"kind": "hf", "class": type(model).__name__, "config": config.to_dict(), "source": source}
    if source:
        return {"kind": "source", "source": source}
    raise ValueError(
        "cannot record how to rebuild this model: it is not a Hugging Face model and no source "
        "is known; convert a model loaded with moefx.models.load_model, or pass "
        "save(model, dir, source={'kind': 'factory', 'factory': 'pkg.mod:fn'})"
    )


def save(model: nn.Module, directory: str, source: Optional[dict] = None, overwrite: bool = False) -> str:
    """Write ``model`` (a result of :func:`moefx.convert`) to ``directory`` atomically."""
    from safetensors.torch import save_model

    from .. import __version__

    entries = _moe_entries(model)
    recipe = dict(getattr(model, "moefx_recipe"))
    directory = os.path.abspath(directory)
    if os.path.exists(directory) and not overwrite:
        raise FileExistsError(f"{directory} exists; pass overwrite=True (CLI: --force) to replace it")
    layers = []
    for e in entries:
        e = dict(e)
        layer = _get(model, e)
        if dataclasses.is_dataclass(getattr(layer, "config", None)):
            e["config"] = dataclasses.asdict(layer.config)  # calibration may lift a threshold
        part = getattr(layer, "moefx_partition", None)
        e["partition"] = part.tolist() if isinstance(part, torch.Tensor) else None
        layers.append(e)
    record = {
        "format": FORMAT,
        "moefx_version": __version__,
        "base": _base_record(model, recipe, source),
        "layers": layers,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
    try:
        save_model(model, os.path.join(tmp, WEIGHTS))
        with open(os.path.join(tmp, RECIPE), "w", encoding="utf-8") as fh:
            json.dump(record, fh, indent=1, default=str)
        if os.path.exists(directory):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.old-", dir=parent)
            os.rmdir(old)
            os.rename(directory, old)
            os.rename(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _get(model: nn.Module, entry: dict) -> nn.Module:
    target = entry["target"]
    return model.get_submodule(target) if target else model


def _build_layer(entry: dict) -> nn.Module:
    from ..config import SliceMoEConfig, XMoEConfig

    cfg = dict(entry["config"])
    if entry["kind"] == "xmoe":
        from ..layers import XMoE

        return XMoE(XMoEConfig(**cfg), entry["d_model"], entry["d_ff"], activation=entry["activation"],
                    glu=entry["glu"], bias=entry["bias"], converted=True)
    from ..layers import SliceMoE

    return SliceMoE(SliceMoEConfig(**cfg), entry["d_model"], entry["d_ff"], activation=entry["activation"], glu=entry["glu"])


def _rebuild_base(base: dict):
    """``(model, example_inputs, example_kwargs)`` of the unconverted architecture."""
    if base["kind"] == "hf":
        import transformers

        transformers.logging.set_verbosity_error()
        config = transformers.AutoConfig.for_model(**base["config"])
        cls = getattr(transformers, base["class"], None)
        if cls is None:
            raise ValueError(f"transformers has no class {base['class']!r} (recorded in the recipe)")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = cls(config)
        from ..models import example_inputs_for

        inputs, kwargs = example_inputs_for(model)
        return model.eval(), inputs, kwargs
    from ..models import load_from_source

    loaded = load_from_source(base["source"])
    return loaded.model, loaded.example_inputs, loaded.example_kwargs


def load(directory: str) -> nn.Module:
    """Rebuild a model saved by :func:`save` and load its weights (eval mode)."""
    from safetensors.torch import load_model

    from .rewrite import drop_unused_weights, graph_replace, occurrences, set_submodule

    recipe_path = os.path.join(directory, RECIPE)
    weights_path = os.path.join(directory, WEIGHTS)
    if not (os.path.isfile(recipe_path) and os.path.isfile(weights_path)):
        raise FileNotFoundError(f"{directory} is not a saved moefx model (needs {RECIPE} and {WEIGHTS})")
    with open(recipe_path, encoding="utf-8") as fh:
        record = json.load(fh)
    if record.get("format") != FORMAT:
        raise ValueError(f"{recipe_path}: unknown recipe format {record.get('format')!r} (this moefx reads {FORMAT})")
    model, inputs, kwargs = _rebuild_base(record["base"])
    entries = record["layers"]
    result: nn.Module = model
    if any(e["how"] == "graph" for e in entries):
        from ..passes.find_ffn import find_ffns

        found = find_ffns(model, inputs, kwargs, dynamic=True)
        keys = occurrences(found)
        matches = {keys[id(m)]: m for m in found}  # (name, k): a block called at several places
        seen: dict = {}
        used = []
        for e in entries:
            k = e.get("occurrence", seen.get(e["name"], 0))
            seen[e["name"]] = k + 1
            if (e["name"], k) not in matches:
                raise ValueError(f"{directory}: the rebuilt model has no FFN block {e['name']!r} any more")
            match = matches[(e["name"], k)]
            layer = getattr(match.graph_module, e["target"], None)  # a layer shared by several calls is built once
            graph_replace(match.graph_module, match, layer if layer is not None else _build_layer(e), e["target"])
            used.append(match)
        gm = used[0].graph_module
        drop_unused_weights(gm, [fqn for m in used for fqn in m.weights.values()])
        result = gm
    else:
        for e in entries:
            layer = _build_layer(e)
            if e["how"] == "module" and e["target"] == "":
                result = layer
            elif e["how"] == "module":
                set_submodule(model, e["target"], layer)
            else:
                set_submodule(model, e["chain"][0], layer)
                for rest in e["chain"][1:]:
                    set_submodule(model, rest, nn.Identity())
    dtype = getattr(torch, record.get("dtype", "float32"), torch.float32)
    result.to(dtype)
    missing, unexpected = load_model(result, weights_path, strict=True)
    for e in entries:
        if e.get("partition") is not None:
            _get(result, e).register_buffer("moefx_partition", torch.tensor(e["partition"]), persistent=False)
    recipe = {"moefx_version": record["moefx_version"], "source": record["base"].get("source"),
              "layers": [{k: v for k, v in e.items() if k != "partition"} for e in entries]}
    object.__setattr__(result, "moefx_recipe", recipe)
    from .rewrite import set_mode

    set_mode(result, False)
    return result
