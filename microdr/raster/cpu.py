"""CPU target: cuda_src/softras.cu compiled by the host C++ compiler, launched through ctypes.

The launch grid runs on ``torch.get_num_threads()`` OpenMP threads (cuda_src/portability.h).
Every work item owns its outputs, so results are bitwise identical for any thread count.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np
import torch

from ..errors import MicroDRError
from .cpu_build import load_library
from .kernels import ARGS_DTYPE, FACE_RECORD


class CpuTarget:
    name = "cpu"

    def __init__(self) -> None:
        self._library = load_library("softras")
        for name, expected in (("softras_args_size", ARGS_DTYPE.itemsize), ("softras_face_record", FACE_RECORD)):
            function = getattr(self._library, name)
            function.restype = ctypes.c_longlong
            if function() != expected:
                raise MicroDRError(f"kernels.py disagrees with softras.cu: {name} is {function()}, expected {expected}")
        self._launchers: dict[str, ctypes._CFuncPtr] = {}

    def _launcher(self, kernel: str):
        if kernel not in self._launchers:
            function = getattr(self._library, f"launch_{kernel}")
            function.argtypes = [ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_int]
            function.restype = None
            self._launchers[kernel] = function
        return self._launchers[kernel]

    def launch(self, kernel: str, args: np.ndarray, grid: int, block: int) -> None:
        # ctypes releases the GIL for the call; the OpenMP threads do the work.
        self._launcher(kernel)(args.ctypes.data, grid, block, torch.get_num_threads())


@functools.cache
def cpu_target() -> CpuTarget:
    """The process's CPU target (compiled on first use, then cached on disk)."""
    return CpuTarget()
