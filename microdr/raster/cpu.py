"""CPU target: cuda_src/softras.cu compiled by the host C++ compiler, launched through ctypes.

The launch grid runs on ``torch.get_num_threads()`` threads (cuda_src/portability.h), or on
the count :func:`kernels_own_the_cores` saved. Every work item owns its outputs, so results are
bitwise identical for any thread count.

A work item takes :attr:`CpuTarget.lanes` adjacent pixels: by default a SIMD vector's width
(portability.h's ``MDR_LANES``, 8), and on request 1, the GPU's shape, where every work item is
one pixel as every CUDA thread is. The GPU's indexing (lane masks, row ends, tile columns of one
lane) then runs, and is tested against the reference, on a machine without a GPU, through the
same launch code (kernels.py reads the width from the target). Select it with
``cpu_target(lanes=1)``, or for ``backend="cpu"`` and the command line with the environment
variable ``MICRODR_CPU_LANES=1``; each width is its own library in the build cache. The GPU's
shape runs about 3.4 times slower (no SIMD: forward and backward of 5,000 small float32 faces at
256 x 256 took 46 + 49 ms against 13 + 15 ms); results agree with the native width's to rounding.

torch's OpenMP workers (libgomp) spin for a while after each of torch's parallel operations
unless ``OMP_WAIT_POLICY=PASSIVE`` was set when torch loaded. ``import microdr`` sets it when it
comes first; when torch came first, the spinning workers take cores from the kernels' threads,
which start right after torch's ops (an optimization of a bundled task took 109 s instead of 7 s
on 2 cores). :func:`kernels_own_the_cores` avoids that for a whole run, and a kernel launched
outside it, while workers spin, logs one warning that says what to do.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
from collections.abc import Iterator

import numpy as np
import torch

from ..errors import MicroDRError
from .cpu_build import load
from .kernels import ARGS_DTYPE, FACE_RECORD, TEXEL_TILE, TILE, TileBins

#: The environment variable that picks the CPU kernels' lanes (see :func:`cpu_target`).
LANES_VARIABLE = "MICRODR_CPU_LANES"

logger = logging.getLogger(__name__)

#: The kernels' thread count while :func:`kernels_own_the_cores` runs, else ``None``.
_kernel_threads: int | None = None
_warned_of_spinning = False


def torch_workers_spin() -> bool:
    """Whether torch's OpenMP workers spin between torch's operations: libgomp reads
    ``OMP_WAIT_POLICY`` once, when torch loads, and anything but ``PASSIVE`` spins for a while."""
    return os.environ.get("OMP_WAIT_POLICY", "").strip().upper() != "PASSIVE"


@contextlib.contextmanager
def kernels_own_the_cores() -> Iterator[None]:
    """While the block runs, the CPU kernels use torch's thread count from before it, and, if
    torch's workers would spin (:func:`torch_workers_spin`), torch's own operations run on one
    thread, so that no worker wakes to spin (an optimizer loop's torch operations are small next
    to the kernels). The caller's thread count is restored after."""
    global _kernel_threads
    threads, saved = torch.get_num_threads(), _kernel_threads
    _kernel_threads = threads if saved is None else saved
    if torch_workers_spin():
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        _kernel_threads = saved


def _launch_threads() -> int:
    """The kernels' thread count; warns once when torch's workers spin and take cores."""
    global _warned_of_spinning
    if _kernel_threads is not None:
        return _kernel_threads
    threads = torch.get_num_threads()
    if threads > 1 and torch_workers_spin() and not _warned_of_spinning:
        _warned_of_spinning = True
        logger.warning(
            "torch was imported before microdr without OMP_WAIT_POLICY=PASSIVE: its OpenMP "
            "workers spin between operations and can slow the CPU kernels many times over; "
            "import microdr before torch, or set OMP_WAIT_POLICY=PASSIVE in the environment"
        )
    return threads


class CpuTarget:
    name = "cpu"

    def __init__(self, lanes: int | None = None) -> None:
        """The kernels built with ``lanes`` adjacent pixels per work item (``MDR_LANES``), or
        portability.h's default width when ``None``."""
        defines = () if lanes is None else (f"MDR_LANES={lanes}",)
        # The library, its build, and whether it came from the cache.
        self.loaded = load("softras", defines=defines)
        self._library = self.loaded.library
        for name, expected in (("softras_args_size", ARGS_DTYPE.itemsize), ("softras_face_record", FACE_RECORD),
                               ("softras_tile", TILE), ("softras_texel_tile", TEXEL_TILE)):
            if self._constant(name) != expected:
                raise MicroDRError(f"kernels.py disagrees with softras.cu: {name} is {self._constant(name)}, expected {expected}")
        self.lanes = self._constant("softras_lanes")
        if lanes is not None and self.lanes != lanes:
            raise MicroDRError(f"softras.cu built with MDR_LANES={lanes} reports {self.lanes} lanes")
        self._library.softras_sort_by_tile.restype = None
        self._library.softras_sort_by_tile.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_longlong] * 2
        self._library.softras_list_chunks_per_texel_tile.restype = ctypes.c_longlong
        self._library.softras_list_chunks_per_texel_tile.argtypes = [ctypes.c_void_p] + [ctypes.c_longlong] * 3 + [ctypes.c_void_p] * 2
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
        tile_faces = torch.empty(bin_keys.numel(), dtype=torch.int32)
        tile_ends = torch.empty(tiles, dtype=torch.int64)
        pointers = (t.data_ptr() for t in (bin_keys, bin_faces, tile_faces, tile_ends))
        self._library.softras_sort_by_tile(*pointers, ctypes.c_longlong(bin_keys.numel()), ctypes.c_longlong(tiles))
        return TileBins(tile_faces, tile_ends)

    def list_chunks_per_texel_tile(self, texel_boxes: torch.Tensor, tiles_down: int, tiles_across: int) -> TileBins:
        """kernels.list_chunks_per_texel_tile in two passes over the boxes (count, then list)."""
        tiles = tiles_down * tiles_across
        tile_ends = torch.empty(tiles, dtype=torch.int64)
        sizes = (ctypes.c_longlong(texel_boxes.shape[0]), ctypes.c_longlong(tiles_across), ctypes.c_longlong(tiles))
        listed = self._library.softras_list_chunks_per_texel_tile(texel_boxes.data_ptr(), *sizes, None, tile_ends.data_ptr())
        tile_chunks = torch.empty(listed, dtype=torch.int32)
        if listed:
            self._library.softras_list_chunks_per_texel_tile(texel_boxes.data_ptr(), *sizes, tile_chunks.data_ptr(),
                                                             tile_ends.data_ptr())
        return TileBins(tile_chunks, tile_ends)

    def launch(self, kernel: str, args: np.ndarray, grid: int, block: int) -> None:
        # ctypes releases the GIL for the call; the launch's threads do the work.
        self._launcher(kernel)(args.ctypes.data, grid, block, _launch_threads())


def cpu_target(lanes: int | None = None) -> CpuTarget:
    """The process's CPU target with ``lanes`` adjacent pixels per work item (compiled on first
    use, then cached on disk). ``None``: ``$MICRODR_CPU_LANES`` where it is set, else the
    native width. ``lanes=1`` is the GPU's shape (see the module's docstring); any divisor of
    the tile side (1, 2, 4, 8) builds."""
    if lanes is None:
        lanes = requested_lanes()
    elif lanes not in _LANE_WIDTHS:
        raise MicroDRError(f"lanes={lanes!r}: the CPU kernels take {_WIDTHS_IN_WORDS} adjacent pixels per work item")
    return _cpu_target(lanes)


#: The widths a tile row (TILE pixels) splits into whole lane groups.
_LANE_WIDTHS = tuple(lanes for lanes in range(1, TILE + 1) if TILE % lanes == 0)
_WIDTHS_IN_WORDS = ", ".join(map(str, _LANE_WIDTHS[:-1])) + f" or {_LANE_WIDTHS[-1]}"


def requested_lanes() -> int | None:
    """The lanes ``$MICRODR_CPU_LANES`` asks for, or ``None`` (the native width) when it is unset
    or empty; raises :class:`MicroDRError` naming the variable when it is not a valid width."""
    value = os.environ.get(LANES_VARIABLE, "").strip()
    if not value:
        return None
    if value.isdigit() and int(value) in _LANE_WIDTHS:
        return int(value)
    raise MicroDRError(
        f"{LANES_VARIABLE}={value!r}: expected {_WIDTHS_IN_WORDS}, the adjacent pixels per CPU work item "
        f"(1 is the GPU's shape), or unset for the native width"
    )


@functools.cache
def _cpu_target(lanes: int | None) -> CpuTarget:
    return CpuTarget(lanes)
