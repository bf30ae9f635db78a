"""The MoE layers every moefx pass emits: :class:`XMoE` and :class:`SliceMoE` (SPEC.md §1-§2)."""
from moefx.layers.slicemoe import SliceMoE
from moefx.layers.xmoe import XMoE

__all__ = ["SliceMoE", "XMoE"]
