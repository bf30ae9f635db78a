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
from typing import Dict, Iterable, List, Optional, Set

import torch
from torch import nn
from torch.utils._pytree import tree_map

from .rewrite import replace_forwards, restore_forwards


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


def _inputs(args: tuple, kwargs: dict) -> List[torch.Tensor]:
    """The tensors a call receives, positional then keyword, in order."""
    return _leaves(kwargs, _leaves(args, []))


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
        self._never: Set[str] = set()  # blocks run twice in a forward or changing their inputs
        self.order: List[str] = []
        self.hits = self.misses = 0

    @contextmanager
    def recording(self, i: int):
        """Record every block's tensor inputs and output in the run inside, as probe ``i``'s: its
        own forward's, inside any hooks the block carries (so those run once on a replay as on a
        computation). A block run more than once in one forward (shared weights) or that changes
        its inputs in place is never replayed."""
        record = self._records.setdefault(i, {})
        calls: Dict[str, int] = {}
        unsafe = set()

        def wrap(name, compute):
            def forward(*args, **kwargs):
                ins = [t.clone() for t in _inputs(args, kwargs)]
                out = compute(*args, **kwargs)
                calls[name] = calls.get(name, 0) + 1
                if not _same(_inputs(args, kwargs), ins):
                    unsafe.add(name)
                record[name] = (ins, _clone(out))
                return out
            return forward

        saved = replace_forwards(self._modules, {b: wrap(b, m.forward) for b, m in self._modules.items()})
        try:
            yield
        finally:
            restore_forwards(self._modules, saved)
        for b, n in calls.items():
            if b not in self.order:
                self.order.append(b)
            if n > 1 or b in unsafe:
                self._never.add(b)
        for b in self._never:
            record.pop(b, None)

    def before(self, layer: str) -> List[str]:
        """The recorded blocks that ran before ``layer``'s block (none if it has no block)."""
        block = self.blocks.get(layer)
        if block not in self.order:
            return []
        return [b for b in self.order[: self.order.index(block)] if b not in self._never]

    @contextmanager
    def replaying(self, i: int, layer: Optional[str]):
        """Inside, the blocks that ran before ``layer``'s block return probe ``i``'s recorded
        outputs (a copy) when their tensor inputs equal the recorded ones."""
        record = self._records.get(i, {})
        todo = [b for b in (self.before(layer) if layer is not None else []) if b in record]
        saved = replace_forwards(self._modules, {b: self._replay(self._modules[b].forward, record[b]) for b in todo})
        try:
            yield
        finally:
            restore_forwards(self._modules, saved)

    def _replay(self, compute, recorded: tuple):
        ins, out = recorded

        def forward(*args, **kwargs):
            if _same(_inputs(args, kwargs), ins):
                self.hits += 1
                return _clone(out)
            self.misses += 1
            return compute(*args, **kwargs)

        return forward
