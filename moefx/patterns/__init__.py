"""The FFN pattern library (see :mod:`moefx.patterns.ffn` for why searches are graph walks)."""
from .activations import FFN_ACTIVATIONS, activation_of, quick_gelu, relu_squared
from .ffn import PATTERNS, Candidate

__all__ = ["FFN_ACTIVATIONS", "PATTERNS", "Candidate", "activation_of", "quick_gelu", "relu_squared"]
