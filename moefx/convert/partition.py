"""Splitting a dense FFN's hidden neurons into XMoE experts (SPEC.md §1, "converted").

A partition is an integer tensor ``groups [num_shared + num_experts, h]`` of neuron indices,
``-1`` marking a padding slot (a zero neuron, which contributes exactly zero). The first
``num_shared`` rows are the always-on shared experts, the rest are routed experts in router
order. ``h = ceil(d_ff / (num_experts + num_shared))`` as in docs/ARCHITECTURE.md; padding sits
at the end of the last routed group, so every other group is full. The tensor is what the
save recipe stores, so a converted model can be rebuilt and audited.

Splits of the routed neurons:

- ``contiguous``: neuron order; ``random``: a seeded permutation (baselines).
- ``kmeans``: balanced k-means on the L2-normalised W1 (or W_gate) rows, MoEfication's choice:
  neurons whose input directions agree fire for the same tokens, so an expert is a coherent
  "topic". Balance is enforced by a capacity-constrained greedy assignment each iteration.
- ``coactivation``: a graph with neurons as nodes and edges weighted by how often two neurons
  are active on the same calibration token (top-16 neighbours per neuron keep it sparse),
  cut by recursive Kernighan-Lin bisection from networkx. Kernighan-Lin swaps pairs, so the
  sizes of the starting split are kept, which makes the groups exactly balanced.
- ``kmeans-coactivation``: balanced k-means on each neuron's co-activation profile (how often it
  fires with every other neuron, :func:`coactivation_profiles`): the statistics ``coactivation``
  counts, clustered at ``kmeans``' cost (counting them added 12-15 s to SmolLM2's conversion, where
  ``coactivation``'s networkx partition had not finished in 7 minutes). Neurons that fire for
  the same tokens share an expert, so an expert's neurons tend to matter for the same tokens,
  and the number of experts a token needs moves less from one text to another. On SmolLM2
  (256 + 64 experts, 75%, the layer-wise fit alone) it kept 0.751 of the groups on held-out text
  where ``kmeans`` kept 0.736 at the same calibration ratio, and ended 11% closer to the dense
  model (KL) and 0.85% better in perplexity. After end-to-end distillation the gain was gone:
  1.110x and 1.127x dense perplexity in two 10-minute runs, against 1.095-1.116x for ``kmeans``
  (bench/results-quality.md, seventeenth session). A choice for conversions without
  distillation.

Shared neurons (CMoE's observation): a few neurons are active for nearly every token; routing
them wastes router capacity, so the ``num_shared * h`` most frequently active neurons form the
shared experts. "Active" for a smooth activation (SiLU, GELU) means: among the top quarter of
that token's neurons by contribution ``|h_i| * ||W2[:, i]||``, and nonzero.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, List, Optional

import torch
import torch.nn.functional as F

from ..config import XMOE_SPLITS, ConfigError
from .dense import DenseFFN

ACTIVE_FRACTION = 0.25


@dataclass
class NeuronStats:
    """Per-neuron activation statistics gathered on calibration tokens."""

    tokens: int
    frequency: torch.Tensor  # [d_ff] fraction of tokens where the neuron is active
    coactivation: Optional[torch.Tensor]  # [d_ff, d_ff] fraction of tokens where both are active
    mean_contribution: torch.Tensor  # [d_ff] mean |h_i| * ||W2[:, i]||


def contribution(dense: DenseFFN, x: torch.Tensor) -> torch.Tensor:
    """``|h_i(x)| * ||W2[:, i]||`` per token and neuron: how much neuron i moves the output."""
    return dense.hidden(x.float()).abs() * dense.w2.float().norm(dim=0)


def active_mask(score: torch.Tensor, fraction: float = ACTIVE_FRACTION) -> torch.Tensor:
    k = max(1, int(round(score.shape[-1] * fraction)))
    kth = score.topk(k, dim=-1).values[..., -1:]
    return (score >= kth) & (score > 0)


class StatsAccumulator:
    """Streams calibration inputs of one FFN into :class:`NeuronStats` (no activations kept)."""

    def __init__(self, dense: DenseFFN, chunk: int = 2048, coactivation: bool = True):
        d_ff = dense.d_ff
        self.dense, self.chunk, self.n = dense, chunk, 0
        self.freq = torch.zeros(d_ff, dtype=torch.float64)
        self.coact = torch.zeros(d_ff, d_ff, dtype=torch.float32) if coactivation else None
        self.contrib = torch.zeros(d_ff, dtype=torch.float64)

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1]).float()
        for s in range(0, x2.shape[0], self.chunk):
            score = contribution(self.dense, x2[s : s + self.chunk])
            act = active_mask(score).float()
            self.freq += act.sum(0).double()
            if self.coact is not None:
                self.coact += act.t() @ act
            self.contrib += score.sum(0).double()
            self.n += act.shape[0]

    def result(self) -> NeuronStats:
        if self.n == 0:
            raise ValueError("neuron statistics got no calibration tokens")
        n = self.n
        coact = None if self.coact is None else self.coact / n
        return NeuronStats(n, (self.freq / n).float(), coact, (self.contrib / n).float())


def neuron_stats(dense: DenseFFN, inputs: Iterable[torch.Tensor], chunk: int = 2048) -> NeuronStats:
    """Activation frequency and co-activation of every hidden neuron over ``inputs`` ([..., d])."""
    acc = StatsAccumulator(dense, chunk)
    for x in inputs:
        acc.add(x)
    return acc.result()


def group_width(d_ff: int, num_experts: int, num_shared: int) -> int:
    return math.ceil(d_ff / (num_experts + num_shared))


def partition(
    dense: DenseFFN,
    num_experts: int,
    split: str = "kmeans",
    num_shared: int = 0,
    stats: Optional[NeuronStats] = None,
    seed: int = 0,
    path: Optional[str] = None,
) -> torch.Tensor:
    """Partition ``dense``'s neurons into ``num_shared`` shared and ``num_experts`` routed groups.

    Returns ``groups [num_shared + num_experts, h]`` (see the module docstring). ``stats`` is
    needed by ``split="coactivation"``; for shared neurons it is preferred, and without it the
    weight-only proxy ``||W1_i|| * ||W2[:, i]||`` ranks neurons instead.
    """
    d_ff = dense.d_ff
    total = num_experts + num_shared
    if num_experts < 1:
        raise ConfigError(f"num_experts must be >= 1, got {num_experts}")
    if total > d_ff:
        where = f" at module '{path}'" if path else ""
        raise ConfigError(
            f"num_experts + num_shared = {total} is more than the d_ff = {d_ff} hidden neurons{where}; "
            f"use at most {d_ff} experts in all"
        )
    h = group_width(d_ff, num_experts, num_shared)
    if num_shared * h >= d_ff:
        raise ConfigError(
            f"num_shared={num_shared} shared experts of width {h} take all {d_ff} neurons; "
            "use fewer shared experts"
        )
    gen = torch.Generator().manual_seed(seed)
    all_neurons = torch.arange(d_ff)
    if num_shared:
        if stats is not None:
            rank = stats.frequency + 1e-6 * stats.mean_contribution / (stats.mean_contribution.max() + 1e-12)
        else:
            rank = dense.w1.float().norm(dim=1) * dense.w2.float().norm(dim=0)
        shared = rank.topk(num_shared * h).indices.sort().values
        keep = torch.ones(d_ff, dtype=torch.bool)
        keep[shared] = False
        routed = all_neurons[keep]
    else:
        shared = torch.empty(0, dtype=torch.long)
        routed = all_neurons
    sizes = _routed_sizes(routed.numel(), num_experts, h)
    if split == "contiguous":
        groups = _chunks(routed, sizes)
    elif split == "random":
        groups = _chunks(routed[torch.randperm(routed.numel(), generator=gen)], sizes)
    elif split == "coactivation":
        groups = coactivation_groups(_with_coactivation(stats, split, path).coactivation, routed, sizes, seed=seed)
    elif split in ("kmeans", "kmeans-coactivation"):
        if split == "kmeans":
            feats = F.normalize(dense.w1.float()[routed], dim=1)
        else:
            feats = coactivation_profiles(_with_coactivation(stats, split, path), routed)
        labels = balanced_kmeans(feats, sizes, generator=gen)
        groups = [routed[labels == g] for g in range(num_experts)]
    else:
        raise ConfigError(f"split must be one of {', '.join(XMOE_SPLITS)}; got {split!r}")
    out = torch.full((total, h), -1, dtype=torch.long)
    if num_shared:
        out[:num_shared] = shared.view(num_shared, h)
    for g, members in enumerate(groups):
        members = members.sort().values
        out[num_shared + g, : members.numel()] = members
    check_partition(out, d_ff, num_shared)
    return out


def _with_coactivation(stats: Optional[NeuronStats], split: str, path: Optional[str]) -> NeuronStats:
    """``stats`` if they hold the co-activation counts a co-activation split needs; a clear
    error otherwise."""
    if stats is None or stats.coactivation is None:
        raise ConfigError(
            f"split={split!r} needs calibration data to count co-activations"
            f"{' at module ' + repr(path) if path else ''}: pass calibration batches to "
            "convert(..., calibration_batches=...) or choose split='kmeans'"
        )
    return stats


def coactivation_profiles(stats: NeuronStats, neurons: torch.Tensor) -> torch.Tensor:
    """``[len(neurons), d_ff]``: row ``i`` holds ``P(i and j) / sqrt(P(i) P(j))`` for every neuron
    ``j``: how often the two fire on the same token, scaled by how often each fires (1 for two
    neurons that always fire together), L2-normalised, so the cosine of two rows compares whom
    the two neurons fire with. A neuron never active on the calibration tokens gets a zero row
    (no cluster prefers it; the balanced assignment places it)."""
    freq = stats.frequency.float().clamp_min(1.0 / max(1, stats.tokens))
    co = stats.coactivation[neurons].float()
    return F.normalize(co / torch.sqrt(freq[neurons].unsqueeze(1) * freq.unsqueeze(0)), dim=1)


def check_partition(groups: torch.Tensor, d_ff: int, num_shared: int) -> None:
    """Every neuron exactly once; padding only at the end of a row; shared rows full."""
    flat = groups[groups >= 0]
    if flat.numel() != d_ff or not torch.equal(flat.sort().values, torch.arange(d_ff)):
        raise ValueError("a partition must hold every hidden neuron exactly once")
    if num_shared and (groups[:num_shared] < 0).any():
        raise ValueError("shared groups must be full (no padding)")


def _routed_sizes(n: int, groups: int, h: int) -> List[int]:
    sizes = [h] * groups
    sizes[-1] = n - h * (groups - 1)
    if sizes[-1] <= 0:
        # Too many groups for the neurons left: spread evenly instead of padding one group to empty.
        base, extra = divmod(n, groups)
        sizes = [base + (1 if i < extra else 0) for i in range(groups)]
    return sizes


def _chunks(order: torch.Tensor, sizes: List[int]) -> List[torch.Tensor]:
    return list(torch.split(order, sizes))


def balanced_kmeans(
    feats: torch.Tensor, sizes: List[int], iters: int = 15, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """k-means with cluster ``g`` holding exactly ``sizes[g]`` points (cosine similarity).

    Each iteration assigns greedily: all (point, cluster) pairs by similarity, best first, a
    point going to its best cluster that still has room. Exact balance matters because every
    expert has the same width ``h`` in the layer.
    """
    n, k = feats.shape[0], len(sizes)
    assert sum(sizes) == n
    cap = torch.tensor(sizes)
    centroids = feats[torch.randperm(n, generator=generator)[:k]].clone()
    labels = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        sim = feats @ centroids.t()
        order = sim.flatten().argsort(descending=True)
        room = cap.tolist()
        assigned = [-1] * n
        left = n
        for flat in order.tolist():
            p, c = divmod(flat, k)
            if assigned[p] < 0 and room[c] > 0:
                assigned[p] = c
                room[c] -= 1
                left -= 1
                if not left:
                    break
        new = torch.tensor(assigned, dtype=torch.long)
        if torch.equal(new, labels):
            break
        labels = new
        for c in range(k):
            members = feats[labels == c]
            if members.numel():
                centroids[c] = F.normalize(members.mean(0), dim=0)
    return labels


def coactivation_groups(coact: torch.Tensor, routed: torch.Tensor, sizes: List[int], seed: int = 0, neighbours: int = 16):
    """Recursive Kernighan-Lin bisection of the sparse co-activation graph of ``routed``."""
    import networkx as nx
    from networkx.algorithms.community import kernighan_lin_bisection

    sub = coact[routed][:, routed].clone()
    sub.fill_diagonal_(0)
    k = min(neighbours, max(1, sub.shape[0] - 1))
    top = sub.topk(k, dim=1)
    graph = nx.Graph()
    graph.add_nodes_from(range(sub.shape[0]))
    for i in range(sub.shape[0]):
        for w, j in zip(top.values[i].tolist(), top.indices[i].tolist()):
            if w > 0:
                prev = graph.get_edge_data(i, j, {"weight": 0.0})["weight"]
                graph.add_edge(i, j, weight=max(prev, w))

    def split(nodes: List[int], want: List[int]) -> List[List[int]]:
        if len(want) == 1:
            return [nodes]
        half = len(want) // 2
        n_left = sum(want[:half])
        sg = graph.subgraph(nodes)
        start = (set(nodes[:n_left]), set(nodes[n_left:]))
        a, b = start
        if a and b and sg.number_of_edges():
            try:
                a, b = kernighan_lin_bisection(sg, partition=start, max_iter=4, weight="weight", seed=seed)
            except ValueError:  # networkx finds no swap to evaluate on degenerate graphs
                a, b = start
            a, b = rebalance(sg, set(a), set(b), n_left)
        return split(sorted(a), want[:half]) + split(sorted(b), want[half:])

    def rebalance(g, a, b, n_a):
        # networkx's Kernighan-Lin may move single nodes; restore the exact sizes by moving the
        # nodes that lose least (weight to the other side minus weight to their own side).
        def gain(v, own, other):
            w = g.adj[v]
            return sum(d["weight"] for u, d in w.items() if u in other) - sum(
                d["weight"] for u, d in w.items() if u in own)

        while len(a) > n_a:
            v = max(sorted(a), key=lambda v: gain(v, a, b))
            a.remove(v)
            b.add(v)
        while len(a) < n_a:
            v = max(sorted(b), key=lambda v: gain(v, b, a))
            b.remove(v)
            a.add(v)
        return a, b

    parts = split(list(range(sub.shape[0])), sizes)
    return [routed[torch.tensor(p, dtype=torch.long)] for p in parts]
