"""Routing statistics of the MoE layers, gathered on request, and the sum of their aux losses.

    with moefx.metrics.collect(model) as stats:
        model(batch)
    print(stats)                 # one line per MoE layer
    stats["model.layers.0.mlp"].ele

Layers report only while a :func:`collect` block is open (a ``None`` check otherwise), so the
statistics cost nothing in normal runs. Counts accumulate over every forward inside the block.

Definitions (SPEC.md §2 for ELE, shared by both layer kinds; a "row" is a token for XMoE and a
slice for SliceMoE):

- ``load[e]``: routed rows that expert e processed (after capacity and dropout);
- ``ele``: entropy of ``load / load.sum()`` divided by ``log E`` (1.0 = perfect balance);
- ``cv2``: ``(std(load) / mean(load))²``, population std, on the hard counts;
- ``activation_ratio``: mean fraction of a row's experts used, ``kept / (rows · E)`` (XMoE: kept
  experts / E per token; SliceMoE: k / E, less under cross-slice dropout);
- ``drop_rate``: fraction of selected (row, expert) pairs removed by the capacity limit.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from torch import nn


def expert_load_entropy(load: torch.Tensor) -> float:
    """Normalised entropy of a per-expert load vector; NaN when nothing was routed."""
    load = load.detach().to(torch.float64).reshape(-1)
    E = load.numel()
    total = float(load.sum())
    if total <= 0:
        return float("nan")
    if E == 1:
        return 1.0
    share = load / total
    share = share[share > 0]
    return float(-(share * share.log()).sum()) / math.log(E)


def cv_squared(load: torch.Tensor) -> float:
    """``(std / mean)²`` of a load vector with the population std; NaN for an all-zero load."""
    load = load.detach().to(torch.float64).reshape(-1)
    mean = float(load.mean())
    if mean <= 0:
        return float("nan")
    return float(load.var(correction=0)) / (mean * mean)


@dataclass
class LayerStats:
    """Accumulated routing statistics of one MoE layer."""

    path: str
    kind: str
    num_experts: int
    rows: int = 0
    selected: int = 0
    kept: int = 0
    calls: int = 0
    load: torch.Tensor = field(default=None)

    def __post_init__(self) -> None:
        if self.load is None:
            self.load = torch.zeros(self.num_experts, dtype=torch.long)

    def add(self, rows: int, pre_capacity: torch.Tensor, idx: torch.Tensor) -> None:
        kept = idx[idx >= 0]
        self.load += torch.bincount(kept.cpu(), minlength=self.num_experts)[: self.num_experts]
        self.rows += rows
        self.selected += int((pre_capacity >= 0).sum())
        self.kept += int(kept.numel())
        self.calls += 1

    @property
    def ele(self) -> float:
        return expert_load_entropy(self.load)

    @property
    def cv2(self) -> float:
        return cv_squared(self.load)

    @property
    def activation_ratio(self) -> float:
        return self.kept / (self.rows * self.num_experts) if self.rows else float("nan")

    @property
    def drop_rate(self) -> float:
        return 1.0 - self.kept / self.selected if self.selected else 0.0

    def as_dict(self) -> dict:
        return {
            "kind": self.kind, "rows": self.rows, "load": self.load.tolist(), "ele": self.ele,
            "cv2": self.cv2, "activation_ratio": self.activation_ratio, "drop_rate": self.drop_rate,
        }

    def __str__(self) -> str:
        return (
            f"{self.path} [{self.kind}, E={self.num_experts}]: rows={self.rows} ELE={self.ele:.3f} "
            f"CV²={self.cv2:.3f} active={self.activation_ratio:.3f} dropped={self.drop_rate:.3f} "
            f"load={self.load.tolist()}"
        )


class RoutingStats(dict):
    """``{module path: LayerStats}`` with a readable ``str`` and whole-model means."""

    def mean(self, name: str) -> float:
        values = [getattr(s, name) for s in self.values()]
        values = [v for v in values if not math.isnan(v)]
        return sum(values) / len(values) if values else float("nan")

    def __str__(self) -> str:
        if not self:
            return "RoutingStats(no MoE layer ran)"
        lines = [str(s) for s in self.values()]
        lines.append(
            f"mean over {len(self)} layers: ELE={self.mean('ele'):.3f} CV²={self.mean('cv2'):.3f} "
            f"active={self.mean('activation_ratio'):.3f} dropped={self.mean('drop_rate'):.3f}"
        )
        return "\n".join(lines)

    __repr__ = __str__


class _Sink:
    """What a layer's ``_stats_sink`` points at while :func:`collect` is open."""

    def __init__(self, stats: RoutingStats, path: str) -> None:
        self.stats = stats
        self.path = path

    def _entry(self, kind: str, num_experts: int) -> LayerStats:
        if self.path not in self.stats:
            self.stats[self.path] = LayerStats(self.path, kind, num_experts)
        return self.stats[self.path]

    @torch.no_grad()
    def record_xmoe(self, layer, probs, pre_capacity, idx) -> None:
        self._entry("XMoE", layer.config.num_experts).add(int(idx.shape[0]), pre_capacity, idx)

    @torch.no_grad()
    def record_slicemoe(self, layer, probs, idx) -> None:
        self._entry("SliceMoE", layer.config.num_experts).add(int(idx.shape[0]), idx, idx)


def moe_layers(model: nn.Module) -> Iterator[tuple]:
    """``(path, layer)`` for every XMoE / SliceMoE module of ``model``."""
    from moefx.layers import SliceMoE, XMoE

    for path, module in model.named_modules():
        if isinstance(module, (XMoE, SliceMoE)):
            yield path, module


@contextlib.contextmanager
def collect(model: nn.Module):
    """Gather per-layer routing statistics for every forward run inside the block."""
    layers = list(moe_layers(model))
    if not layers:
        raise ValueError(
            f"moefx.metrics.collect: {type(model).__name__} holds no XMoE or SliceMoE layer; "
            "convert the model first (moefx.convert) or pass the module that contains them"
        )
    stats = RoutingStats()
    previous = [(layer, layer._stats_sink) for _, layer in layers]
    for path, layer in layers:
        layer._stats_sink = _Sink(stats, path or "<root>")
    try:
        yield stats
    finally:
        for layer, sink in previous:
            layer._stats_sink = sink


def aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the aux losses (XMoE balance, SliceMoE capacity) left by the last training-mode
    forward of every MoE layer; a zero tensor when there are none (eval mode, no layers)."""
    total: Optional[torch.Tensor] = None
    for _, layer in moe_layers(model):
        if layer.aux_loss is not None:
            total = layer.aux_loss if total is None else total + layer.aux_loss
    if total is None:
        return torch.zeros(())
    return total
