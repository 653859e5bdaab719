"""What the CUDA target relies on besides the kernels' math, checked without a GPU.

- The argument block: ``ARGS_DTYPE`` (kernels.py) has ``RasterArgs``'s layout (softras.cu) as
  nvcc compiles it, on its device side and its host side, and as the host C++ compiler does.
- The launch sizes the adapter computes for the largest renders fit CUDA's launch limits.
- The context and stream rules ``cuda.py`` promises, with a recording stand-in for the pycuda
  module whose launches run the real kernels, built for the host in the GPU's shape.

The kernels' results on the GPU itself are tests/test_kernels.py's ``gpu`` cases.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from microdr.mesh import MAX_MESH_FACES
from microdr.raster.cpu_build import build_info, compiler, flags, source_dir
from microdr.raster.cuda import CudaTarget
from microdr.raster.kernels import ARGS_DTYPE, STAGES, launch_size, work_items
from microdr.scene import MAX_CAMERAS, MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE

# ---------------------------------------------------------------------------------------------
# The argument block's layout.

# What each ARGS_DTYPE kind must be in C: pointers travel as uint64.
C_KIND = {"u": "std::is_pointer_v<{member}>", "i": "std::is_integral_v<{member}> && std::is_signed_v<{member}>",
          "f": "std::is_floating_point_v<{member}>"}


def layout_assertions() -> str:
    """A translation unit that includes softras.cu and asserts, at compile time, that every field
    of ARGS_DTYPE has the offset, size and kind of the same field of ``RasterArgs<float>`` and
    ``RasterArgs<double>``, and that the structs are ARGS_DTYPE's size (so no field is missing)."""
    lines = ["#include <cstddef>", "#include <type_traits>", '#include "softras.cu"']
    for scalar in ("float", "double"):
        struct = f"RasterArgs<{scalar}>"
        size = ARGS_DTYPE.itemsize
        lines.append(f'static_assert(sizeof({struct}) == {size}, "sizeof({struct}) != ARGS_DTYPE.itemsize {size}");')
        for name, (dtype, offset) in ARGS_DTYPE.fields.items():
            member = f"decltype({struct}::{name})"
            checks = [f"offsetof({struct}, {name}) == {offset}", f"sizeof({member}) == {dtype.itemsize}",
                      C_KIND[dtype.kind].format(member=member)]
            message = f"{struct}::{name} is not ARGS_DTYPE's {name}: {dtype} at offset {offset}"
            lines += [f'static_assert({check}, "{message}");' for check in checks]
    return "\n".join(lines) + "\n"


def compile_layout_check(tmp_path, command: list[str]) -> None:
    """Compiles :func:`layout_assertions` with ``command`` (the file and -o are appended)."""
    source = tmp_path / "layout.cu"
    source.write_text(layout_assertions())
    result = subprocess.run([*command, "-I", str(source_dir()), str(source), "-o", str(tmp_path / "layout.o")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed (CUDA toolkit)")
def test_args_layout_under_nvcc(tmp_path):
    # As cuda.py compiles softras.cu (-std=c++17); nvcc evaluates the assertions on the device
    # side and again on the host side.
    compile_layout_check(tmp_path, ["nvcc", "-c", "-std=c++17"])


@pytest.mark.skipif(build_info()["compiler"] is None, reason="no C++ compiler (g++/c++/$CXX) found")
def test_args_layout_under_the_host_compiler(tmp_path):
    compile_layout_check(tmp_path, [*compiler(), *flags(), "-fsyntax-only"])


def test_layout_assertions_can_fail(tmp_path):
    # Guards the check itself: a field moved in ARGS_DTYPE must break the compile.
    if shutil.which("nvcc") is None and build_info()["compiler"] is None:
        pytest.skip("neither nvcc nor a C++ compiler is installed")
    command = ["nvcc", "-c", "-std=c++17"] if shutil.which("nvcc") else [*compiler(), *flags(), "-fsyntax-only"]
    source = tmp_path / "layout.cu"
    offset = ARGS_DTYPE.fields["sigma"][1]
    source.write_text(layout_assertions().replace(f"sigma) == {offset}", f"sigma) == {offset + 8}"))
    result = subprocess.run([*command, "-I", str(source_dir()), str(source), "-o", str(tmp_path / "layout.o")],
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "RasterArgs<float>::sigma is not ARGS_DTYPE's sigma" in result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# Launch sizes against CUDA's limits (all compute capabilities the kernels target).

MAX_THREADS_PER_BLOCK = 1024
MAX_GRID_X = 2**31 - 1

# (batch, faces, width, height): the README's largest benchmark, then the most a scene allows
# (every camera rasterized as one batch, the largest mesh, images of 2**26 pixels, the widest
# sides, and sides that are no whole number of tiles).
LARGEST_RENDERS = [
    (8, 81_920, 1024, 1024),
    *((MAX_CAMERAS, MAX_MESH_FACES, width, MAX_IMAGE_PIXELS // width)
      for width in (MAX_IMAGE_SIDE, MAX_IMAGE_PIXELS // MAX_IMAGE_SIDE, 8192)),
    (MAX_CAMERAS, MAX_MESH_FACES, MAX_IMAGE_SIDE - 1, MAX_IMAGE_PIXELS // MAX_IMAGE_SIDE - 1),
]


@pytest.mark.parametrize("render", LARGEST_RENDERS, ids=lambda r: "B{} F{} {}x{}".format(*r))
@pytest.mark.parametrize("stage", STAGES)
def test_launch_sizes_fit_cuda_limits(stage, render):
    batch, faces, width, height = render
    n_items = work_items(stage, batch, faces, width, height, CudaTarget.lanes)
    # Independently of work_items: one item per face, or per pixel of the padded image.
    padded = -(-width // 8) * 8 * (-(-height // 8) * 8)
    assert n_items == (batch * padded if stage == "forward" else batch * faces)
    grid, block = launch_size(n_items)
    assert 1 <= block <= MAX_THREADS_PER_BLOCK and block % 32 == 0  # whole warps
    assert 1 <= grid <= MAX_GRID_X
    assert (grid - 1) * block < n_items <= grid * block  # every item, and no block without one
