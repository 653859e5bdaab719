"""CUDA target: cuda_src/softras.cu compiled by nvcc through PyCUDA, on torch's CUDA tensors.

- Context: PyTorch works in the device's *primary* context; this target retains and pushes that
  same context around every PyCUDA call (``pycuda.autoinit`` would create a second one, in
  which torch's pointers are invalid).
- Streams: kernels are launched on the legacy default stream. When torch's current stream is
  another one, it is synchronized first, so the kernel sees finished inputs; the launch is
  synchronized before returning, so torch's next op sees finished outputs.
- Pointers: torch tensors are passed by address inside the argument block (ARGS_DTYPE).
- The module is compiled once per process and device (PyCUDA also caches the cubin on disk).
"""

from __future__ import annotations

import functools
import importlib.util
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import MicroDRError
from .cpu_build import source_dir
from .kernels import list_chunks_per_texel_tile, sort_by_tile

INSTALL_HINT = "install the CUDA extra: pip install 'microdr[cuda]'"


def cuda_unavailable_reason() -> str | None:
    """Why ``backend="cuda"`` cannot run here, or None when it can: every missing piece."""
    missing = []
    if not torch.cuda.is_available():
        missing.append("no CUDA GPU is visible to PyTorch")
    if importlib.util.find_spec("pycuda") is None:
        missing.append(f"pycuda is not installed ({INSTALL_HINT})")
    return "; ".join(missing) or None


class CudaTarget:
    name = "cuda"
    lanes = 1  # MDR_LANES under nvcc: one pixel per thread
    sort_by_tile = staticmethod(sort_by_tile)  # torch's radix sort on the GPU
    list_chunks_per_texel_tile = staticmethod(list_chunks_per_texel_tile)

    def __init__(self, device_index: int) -> None:
        import pycuda.driver as driver
        from pycuda.compiler import SourceModule

        driver.init()
        torch.cuda.init()  # makes torch create (and own) the primary context first
        self._driver = driver
        self._context = driver.Device(device_index).retain_primary_context()
        self._context.push()
        try:
            source = (source_dir() / "softras.cu").read_text()
            self._module = SourceModule(
                source, no_extern_c=True, include_dirs=[str(source_dir())], options=["-std=c++17"]
            )
        finally:
            self._context.pop()
        self._functions: dict[str, object] = {}

    def launch(self, kernel: str, args: np.ndarray, grid: int, block: int) -> None:
        stream = torch.cuda.current_stream()
        if stream.cuda_stream != 0:
            stream.synchronize()
        self._context.push()
        try:
            if kernel not in self._functions:
                self._functions[kernel] = self._module.get_function(kernel)
            # A 1-element structured array's element (np.void) is passed by value.
            self._functions[kernel](args[0], block=(block, 1, 1), grid=(grid, 1, 1))
            self._driver.Context.synchronize()
        except self._driver.Error as error:
            raise MicroDRError(f"CUDA kernel {kernel} failed: {error}") from error
        finally:
            self._context.pop()


@functools.cache
def cuda_target(device_index: int) -> CudaTarget:
    """The process's CUDA target for one device (compiled on first use)."""
    reason = cuda_unavailable_reason()
    if reason is not None:
        raise MicroDRError(f'backend "cuda" is unavailable: {reason}')
    return CudaTarget(device_index)


@dataclass(frozen=True)
class KernelResources:
    """What ptxas reports for one kernel: registers per thread and bytes spilled to local memory."""

    registers: int
    spill_stores: int
    spill_loads: int


def resource_usage(arch: str) -> dict[str, KernelResources]:
    """Compiles softras.cu with ``nvcc -cubin -arch=<arch> --resource-usage`` and returns each
    kernel's resources. Needs nvcc (not a GPU); raises MicroDRError with nvcc's complaint."""
    with tempfile.TemporaryDirectory() as folder:
        command = ["nvcc", "-cubin", f"-arch={arch}", "--resource-usage", "-std=c++17", "-I", str(source_dir()),
                   "-o", str(Path(folder) / "softras.cubin"), str(source_dir() / "softras.cu")]
        try:
            result = subprocess.run(command, capture_output=True, text=True)
        except FileNotFoundError:
            raise MicroDRError("nvcc is not installed") from None
    if result.returncode != 0:
        raise MicroDRError(f"nvcc failed for {arch}: {result.stderr.strip()}")
    # Per kernel: "Function properties for NAME", then its spill line, then "Used N registers".
    entries = re.findall(
        r"Function properties for (\w+)\s+\d+ bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
        r"\s+ptxas info\s+: Used (\d+) registers",
        result.stdout + result.stderr,
    )
    return {name: KernelResources(int(registers), int(stores), int(loads))
            for name, stores, loads, registers in entries}
