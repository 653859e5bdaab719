"""Recovering scenes from images: the optimizer loop and what it needs.

Imports the layers below it (:mod:`microdr.io`, :mod:`microdr.view`, :mod:`microdr.raster`,
:mod:`microdr.render`); the CLI imports it. The loop's entry points are re-exported here, so
``from microdr.optimize import Optimization, optimize`` is the API (:mod:`.loop` holds them).
"""

from .loop import NonFiniteError, Optimization, optimize

__all__ = ["NonFiniteError", "Optimization", "optimize"]
