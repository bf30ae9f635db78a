"""Graph passes over one FX graph: canonicalisation, FFN discovery, and (in other rooms) the
MoE rewrites, lowering and fusion. Every pass is a ``PassBase`` with ``call(gm) -> PassResult``
and is run by :class:`moefx.passes.manager.PassManager`, which lints the graph after each one.

Submodules are imported lazily so that importing one pass does not pull in the others.
"""
from __future__ import annotations

from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .manager import PassManager

__all__ = ["PassBase", "PassResult", "PassManager"]
