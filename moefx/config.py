"""Configurations of the two MoE layer kinds.

Both are frozen dataclasses validated at construction, so a bad value fails where the user
wrote it, with a message that names the argument and says what would be valid. Checks that
need the model's widths (``num_slices`` dividing ``d_model``, more experts than neurons) live
in :meth:`validate_for`, which the layers and the rewrite passes call with the module path.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "quick_gelu", "relu2", "identity")
XMOE_SPLITS = ("contiguous", "random", "kmeans", "coactivation", "kmeans-coactivation")
COACTIVATION_SPLITS = ("coactivation", "kmeans-coactivation")
"""The splits that count which neurons fire together on calibration data."""
XMOE_ROUTERS = ("centroid", "fitted", "random")
COMBINES = ("unit", "prob")
GATES = ("input", "output")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the argument and the fix."""


class _DefaultThreshold(float):
    """The default ``threshold`` (0.9), recognisable by its type: ``XMoEConfig(top_k=4)`` means
    top-k routing without making the caller also write ``threshold=None``, while an explicit
    ``threshold=0.9, top_k=4`` is still the contradiction it looks like."""

    def __repr__(self) -> str:
        return "0.9"


_DEFAULT_THRESHOLD = _DefaultThreshold(0.9)


def _where(path: Optional[str]) -> str:
    return f" (at module '{path}')" if path else ""


def check_widths(owner: str, **widths) -> None:
    """Raise a ConfigError naming ``owner`` unless every width is a positive integer."""
    for name, value in widths.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{owner}: {name} must be a positive integer, got {value!r}")


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class XMoEConfig:
    """XMoE: many small experts picked per token by a threshold router (SPEC.md §1).

    Exactly one of ``threshold`` (keep the fewest experts whose probability mass reaches it)
    and ``top_k`` (keep a fixed number) is set. ``combine=None`` resolves to ``"unit"`` for a
    layer converted from a dense FFN (all experts kept reproduces the dense output) and to
    ``"prob"`` (the paper) for a freshly initialised layer; see :meth:`resolved_combine`.
    ``num_shared`` experts are always on, outside routing. ``split`` and ``router`` choose how
    conversion partitions the dense neurons and builds the router.
    """

    num_experts: int = 16
    threshold: Optional[float] = _DEFAULT_THRESHOLD
    top_k: Optional[int] = None
    max_experts: Optional[int] = None
    capacity_factor: Optional[float] = None
    combine: Optional[str] = None
    num_shared: int = 0
    split: str = "kmeans"
    router: str = "centroid"
    aux_loss_coef: float = 0.01

    def __post_init__(self) -> None:
        _check_int("num_experts", self.num_experts, 1)
        if self.top_k is not None and type(self.threshold) is _DefaultThreshold:
            object.__setattr__(self, "threshold", None)
        if (self.threshold is None) == (self.top_k is None):
            raise ConfigError(
                "XMoEConfig needs exactly one of threshold= and top_k= "
                f"(got threshold={self.threshold!r}, top_k={self.top_k!r}); "
                "pass top_k=K together with threshold=None for fixed top-k routing"
            )
        if self.threshold is not None:
            t = self.threshold
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= float(t) <= 1.0:
                raise ConfigError(f"threshold must be a number in [0, 1], got {t!r}")
        if self.top_k is not None:
            _check_int("top_k", self.top_k, 1)
            if self.top_k > self.num_experts:
                raise ConfigError(
                    f"top_k={self.top_k} is larger than num_experts={self.num_experts}"
                )
        if self.max_experts is not None:
            _check_int("max_experts", self.max_experts, 1)
            if self.max_experts > self.num_experts:
                raise ConfigError(
                    f"max_experts={self.max_experts} is larger than num_experts={self.num_experts}"
                )
        if self.capacity_factor is not None and not (
            isinstance(self.capacity_factor, (int, float)) and self.capacity_factor > 0
        ):
            raise ConfigError(
                f"capacity_factor must be a positive number or None (dropless), got {self.capacity_factor!r}"
            )
        if self.combine is not None and self.combine not in COMBINES:
            raise ConfigError(f"combine must be one of {COMBINES} or None, got {self.combine!r}")
        _check_int("num_shared", self.num_shared, 0)
        if self.split not in XMOE_SPLITS:
            raise ConfigError(f"split must be one of {XMOE_SPLITS}, got {self.split!r}")
        if self.router not in XMOE_ROUTERS:
            raise ConfigError(f"router must be one of {XMOE_ROUTERS}, got {self.router!r}")
        if not isinstance(self.aux_loss_coef, (int, float)) or self.aux_loss_coef < 0:
            raise ConfigError(f"aux_loss_coef must be >= 0, got {self.aux_loss_coef!r}")

    @property
    def max_selected(self) -> int:
        """The most experts one token can use: the static width of routing tensors."""
        if self.top_k is not None:
            return self.top_k
        return self.max_experts if self.max_experts is not None else self.num_experts

    def resolved_combine(self, converted: bool) -> str:
        if self.combine is not None:
            return self.combine
        return "unit" if converted else "prob"

    def validate_for(self, d_model: int, d_ff: int, path: Optional[str] = None) -> None:
        groups = self.num_experts + self.num_shared
        if groups > d_ff:
            raise ConfigError(
                f"num_experts + num_shared = {groups} is more than the d_ff = {d_ff} hidden neurons"
                f"{_where(path)}: each expert needs at least one neuron; use at most {d_ff} experts"
            )

    def replace(self, **changes) -> "XMoEConfig":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class SliceMoEConfig:
    """SliceMoE: each token cut into ``num_slices`` contiguous slices, each routed to its
    ``top_k`` of ``num_experts`` small experts by one shared router (SPEC.md §2).

    ``expert_hidden=None`` means ``d_ff // top_k``, which matches the dense FFN in FLOPs per
    token (and in parameters when ``num_experts == num_slices * top_k``). ``gate="input"``
    scales each slice by its routing weight before the expert (the paper's eq. 1);
    ``gate="output"`` scales the expert's output instead.
    """

    num_slices: int = 8
    num_experts: int = 16
    top_k: int = 2
    router_hidden: int = 256
    expert_hidden: Optional[int] = None
    gate: str = "input"
    slice_dropout: float = 0.0
    capacity_loss_coef: float = 0.1

    def __post_init__(self) -> None:
        _check_int("num_slices", self.num_slices, 1)
        _check_int("num_experts", self.num_experts, 1)
        _check_int("top_k", self.top_k, 1)
        if self.top_k > self.num_experts:
            raise ConfigError(f"top_k={self.top_k} is larger than num_experts={self.num_experts}")
        _check_int("router_hidden", self.router_hidden, 1)
        if self.expert_hidden is not None:
            _check_int("expert_hidden", self.expert_hidden, 1)
        if self.gate not in GATES:
            raise ConfigError(f"gate must be one of {GATES}, got {self.gate!r}")
        if not isinstance(self.slice_dropout, (int, float)) or not 0.0 <= self.slice_dropout < 1.0:
            raise ConfigError(f"slice_dropout must be in [0, 1), got {self.slice_dropout!r}")
        if not isinstance(self.capacity_loss_coef, (int, float)) or self.capacity_loss_coef < 0:
            raise ConfigError(f"capacity_loss_coef must be >= 0, got {self.capacity_loss_coef!r}")

    def hidden_for(self, d_ff: int) -> int:
        return self.expert_hidden if self.expert_hidden is not None else max(1, d_ff // self.top_k)

    def validate_for(self, d_model: int, d_ff: int, path: Optional[str] = None) -> None:
        if d_model % self.num_slices != 0:
            valid = [s for s in range(1, min(d_model, 64) + 1) if d_model % s == 0]
            raise ConfigError(
                f"num_slices={self.num_slices} does not divide d_model={d_model}{_where(path)}; "
                f"valid choices include {valid}"
            )

    def replace(self, **changes) -> "SliceMoEConfig":
        return dataclasses.replace(self, **changes)
