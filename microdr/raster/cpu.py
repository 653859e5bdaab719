"""CPU target: cuda_src/softras.cu compiled by the host C++ compiler, launched through ctypes.

The launch grid runs on ``torch.get_num_threads()`` threads (cuda_src/portability.h).
Every work item owns its outputs, so results are bitwise identical for any thread count.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np
import torch

from ..errors import MicroDRError
from .cpu_build import load_library
from .kernels import ARGS_DTYPE, FACE_RECORD, TILE, TileBins


class CpuTarget:
    name = "cpu"

    def __init__(self) -> None:
        self._library = load_library("softras")
        for name, expected in (("softras_args_size", ARGS_DTYPE.itemsize), ("softras_face_record", FACE_RECORD),
                               ("softras_tile", TILE)):
            if self._constant(name) != expected:
                raise MicroDRError(f"kernels.py disagrees with softras.cu: {name} is {self._constant(name)}, expected {expected}")
        self.lanes = self._constant("softras_lanes")
        self._library.softras_sort_by_tile.restype = None
        self._library.softras_sort_by_tile.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_longlong] * 2
        self._launchers: dict[str, ctypes._CFuncPtr] = {}

    def _constant(self, name: str) -> int:
        function = getattr(self._library, name)
        function.restype = ctypes.c_longlong
        return function()

    def _launcher(self, kernel: str):
        if kernel not in self._launchers:
            function = getattr(self._library, f"launch_{kernel}")
            function.argtypes = [ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_int]
            function.restype = None
            self._launchers[kernel] = function
        return self._launchers[kernel]

    def sort_by_tile(self, bin_keys: torch.Tensor, bin_faces: torch.Tensor, tiles: int) -> TileBins:
        """kernels.sort_by_tile as one counting sort (O(pairs + tiles)) instead of torch's
        comparison sort, which took most of the binning time."""
        tile_faces = torch.empty_like(bin_faces)
        tile_ends = torch.empty(tiles, dtype=torch.int64)
        pointers = (t.data_ptr() for t in (bin_keys, bin_faces, tile_faces, tile_ends))
        self._library.softras_sort_by_tile(*pointers, ctypes.c_longlong(bin_keys.numel()), ctypes.c_longlong(tiles))
        return TileBins(tile_faces, tile_ends)

    def launch(self, kernel: str, args: np.ndarray, grid: int, block: int) -> None:
        # ctypes releases the GIL for the call; the launch's threads do the work.
        self._launcher(kernel)(args.ctypes.data, grid, block, torch.get_num_threads())


@functools.cache
def cpu_target() -> CpuTarget:
    """The process's CPU target (compiled on first use, then cached on disk)."""
    return CpuTarget()
