"""microDR: a differentiable soft rasterizer (the SoftRas model) with hand-written CUDA C kernels
that also run on CPUs.

Load a scene with :func:`microdr.io.scene.load_scene` and render it with
:func:`microdr.render.render_scene`, or use the ``microdr`` command (:mod:`microdr.cli`). This
module stays light: it imports neither torch nor the rasterizer.
"""

import os
import sys
from importlib.metadata import PackageNotFoundError, version

# torch's OpenMP workers spin for milliseconds after each of its parallel operations; on a small
# machine that takes a core from the CPU kernels' threads, which start right after (the backward
# follows torch's own gradient ops). Passive workers sleep instead. The setting is read once,
# when torch loads, so it can only be made here, before torch is imported, and only if the user
# chose nothing (README, "Measured").
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    __version__ = version("microdr")
except PackageNotFoundError:  # a source checkout that was never installed
    __version__ = "0+unknown"
