"""The soft rasterizer's settings: MODEL.md's constants."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..defaults import EPS, EPS_D, FAR, GAMMA, NEAR, SIGMA


@dataclass(frozen=True)
class SoftRasSettings:
    """Everything the rasterizer needs besides geometry and attributes (MODEL.md symbols).

    sigma: sharpness of the coverage sigmoid, in squared screen units.
    gamma: temperature of the depth softmax (in units of normalized inverse depth ``zhat``).
    eps: depth of the background term in the softmax.
    eps_d: outside pairs with ``D_ij < eps_d`` are skipped.
    near, far: the depth range; faces with a corner nearer than ``near`` are skipped, and so
        are pairs whose interpolated depth is outside ``[near, far]``.
    perspective: perspective-correct interpolation (True) or orthographic (False).
    cull_backfaces: skip faces with negative signed screen area (clockwise on screen).
    background: per attribute channel; ``()`` means all zeros, a single value is broadcast.
    texture_wrap: textured renders only: texture coordinates outside [0, 1] wrap around (True)
        or take the edge texels (False, MTL's ``-clamp on``).
    """

    sigma: float = SIGMA
    gamma: float = GAMMA
    eps: float = EPS
    eps_d: float = EPS_D
    near: float = NEAR
    far: float = FAR
    perspective: bool = True
    cull_backfaces: bool = False
    background: tuple[float, ...] = ()
    texture_wrap: bool = True

    @property
    def distance_cutoff(self) -> float:
        """Squared distance beyond which an outside pair has ``D < eps_d``: ``sigma ln(1/eps_d - 1)``."""
        return self.sigma * max(math.log(1.0 / self.eps_d - 1.0), 0.0)

    def background_values(self, channels: int) -> tuple[float, ...]:
        """The background as exactly ``channels`` values."""
        if not self.background:
            return (0.0,) * channels
        if len(self.background) == 1:
            return tuple(self.background) * channels
        if len(self.background) != channels:
            raise ValueError(f"background has {len(self.background)} values for {channels} channels")
        return tuple(self.background)
