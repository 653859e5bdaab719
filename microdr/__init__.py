"""microDR: a differentiable soft rasterizer (the SoftRas model) with hand-written CUDA C kernels
that also run on CPUs.

Load a scene with :func:`microdr.scene.load_scene` and render it with
:func:`microdr.render.render_scene`, or use the ``microdr`` command (:mod:`microdr.cli`). This
module stays light: it imports neither torch nor the rasterizer.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("microdr")
except PackageNotFoundError:  # a source checkout that was never installed
    __version__ = "0+unknown"
