"""Replaying the blocks of a model that a probe leaves unchanged.

``budgets="model"`` (:func:`moefx.convert.calibrate.model_curves`) runs the whole model twice
per converted layer, each time with that one layer routed and every other layer dense. Every
block before the probed layer then computes exactly what it computed in the all-dense reference
run on the same inputs. :class:`BlockReplay` records each block's inputs and output in the
reference run and, in a probe, answers a block before the probed layer from that record. On
SmolLM2 (30 layers) this takes the probes from 117-129 s to 87-90 s (measured in one process on
a loaded machine; about 81 s to 58 s on an idle one): the embedding, the output head and the
KL divergence over the 49k-word vocabulary are still computed in every probe.

A *block* is a converted layer's outermost ancestor that is an item of an ``nn.ModuleList`` or
``nn.Sequential`` (a transformer layer of a Hugging Face model; an item of a sequential stack);
models without one replay nothing. Nothing is taken on trust: a block is answered from the
record only when every tensor it receives equals the recorded one, otherwise it computes, so a
replayed output is always the one the block would compute (given the same non-tensor
arguments and no hidden state, as for any module run twice on the same inputs).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterable, List, Optional

import torch
from torch import nn
from torch.utils._pytree import tree_map


def _leaves(v, out: List[torch.Tensor]) -> List[torch.Tensor]:
    """The tensors in ``v``, through tuples, lists and dicts (other objects, e.g. a key-value
    cache, are not compared)."""
    if isinstance(v, torch.Tensor):
        out.append(v)
    elif isinstance(v, (tuple, list)):
        for item in v:
            _leaves(item, out)
    elif isinstance(v, dict):
        for item in v.values():
            _leaves(item, out)
    return out


def _same(a: List[torch.Tensor], b: List[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and x.dtype == y.dtype and x.device == y.device and torch.equal(x, y) for x, y in zip(a, b)
    )


def _clone(out):
    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)


def block_names(model: nn.Module, layer_names: Iterable[str]) -> Dict[str, str]:
    """``{layer: block}``: each layer's outermost ancestor (or itself) that is an item of an
    ``nn.ModuleList`` / ``nn.Sequential``; layers with none are left out."""
    modules = dict(model.named_modules())
    out = {}
    for name in layer_names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            if isinstance(modules.get(".".join(parts[: i - 1])), (nn.ModuleList, nn.Sequential)):
                out[name] = ".".join(parts[:i])
                break
    return out


class BlockReplay:
    """Records the blocks holding ``layer_names`` while the model runs on probe ``i``
    (:meth:`recording`), then answers the blocks that ran before a given layer's block from that
    record (:meth:`replaying`). ``hits`` / ``misses`` count the blocks answered from the record
    and those that had to compute because an input differed."""

    def __init__(self, model: nn.Module, layer_names: Iterable[str]) -> None:
        self.blocks = block_names(model, layer_names)
        modules = dict(model.named_modules())
        self._modules = {b: modules[b] for b in set(self.blocks.values())}
        self._records: Dict[int, Dict[str, tuple]] = {}
        self._calls: Dict[str, int] = {}
        self.order: List[str] = []
        self.hits = self.misses = 0

    @contextmanager
    def recording(self, i: int):
        """Record every block's tensor inputs and output in the run inside, as probe ``i``'s.
        A block run more than once in one forward (shared weights) is never replayed."""
        record = self._records.setdefault(i, {})
        calls: Dict[str, int] = {}

        def hook(name):
            def run(mod, args, kwargs, out):
                calls[name] = calls.get(name, 0) + 1
                # copies: the model may change these tensors in place later in the run
                record[name] = ([t.clone() for t in _leaves(kwargs, _leaves(args, []))], _clone(out))
            return run

        handles = [m.register_forward_hook(hook(b), with_kwargs=True) for b, m in self._modules.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        for b, n in calls.items():
            self._calls[b] = max(self._calls.get(b, 0), n)
            if b not in self.order:
                self.order.append(b)
        for b in [b for b, n in calls.items() if n > 1]:
            record.pop(b, None)

    def before(self, layer: str) -> List[str]:
        """The recorded blocks that ran before ``layer``'s block (none if it has no block)."""
        block = self.blocks.get(layer)
        if block not in self.order:
            return []
        return [b for b in self.order[: self.order.index(block)] if self._calls.get(b) == 1]

    @contextmanager
    def replaying(self, i: int, layer: Optional[str]):
        """Inside, the blocks that ran before ``layer``'s block return probe ``i``'s recorded
        outputs (a copy) when their tensor inputs equal the recorded ones."""
        record = self._records.get(i, {})
        saved = {}
        for b in self.before(layer) if layer is not None else []:
            if b not in record:
                continue
            mod = self._modules[b]
            saved[b] = mod.__dict__.get("forward")
            mod.forward = self._replay(b, mod.forward, record[b])
        try:
            yield
        finally:
            for b, f in saved.items():
                if f is None:
                    self._modules[b].__dict__.pop("forward", None)
                else:
                    self._modules[b].forward = f

    def _replay(self, name: str, compute, recorded: tuple):
        ins, out = recorded

        def forward(*args, **kwargs):
            if _same(_leaves(kwargs, _leaves(args, [])), ins):
                self.hits += 1
                return _clone(out)
            self.misses += 1
            return compute(*args, **kwargs)

        return forward
