"""Cameras and shading: world geometry to screen-space faces and shaded colors.

Imports only :mod:`microdr.io` (and the base modules).
"""
