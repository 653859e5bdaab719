"""Recovering scenes from images: the optimizer loop and what it needs.

Imports the layers below it (:mod:`microdr.io`, :mod:`microdr.view`, :mod:`microdr.raster`,
:mod:`microdr.render`); the CLI imports it.
"""
