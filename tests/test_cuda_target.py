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
import sys
import types

import numpy as np
import pytest
import torch

from microdr.errors import MicroDRError
from microdr.io.mesh import MAX_MESH_FACES
from microdr.raster import SoftRasSettings, rasterize
from microdr.raster.cpu import cpu_target
from microdr.raster.cpu_build import build_info, compiler, flags, source_dir
from microdr.raster.cuda import CudaTarget
from microdr.raster.kernels import (ARGS_DTYPE, BYTES_PER_CHUNK, MAX_BACKWARD_BYTES, STAGES, SoftRasterize, launch_size,
                                    work_items)
from microdr.io.scene import MAX_CAMERAS, MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE

from helpers import assert_matches
from test_kernels import make_case

needs_compiler = pytest.mark.skipif(build_info()["compiler"] is None, reason="no C++ compiler (g++/c++/$CXX) found")

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


@needs_compiler
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
    # The most backward chunks a render may have: their faces alone (8 bytes each) fill the limit.
    most_chunks = MAX_BACKWARD_BYTES // BYTES_PER_CHUNK
    n_items = work_items(stage, batch, faces, width, height, CudaTarget.lanes, most_chunks)
    # Independently of work_items: one item per face, per pixel of the padded image, or per chunk.
    padded = -(-width // 8) * 8 * (-(-height // 8) * 8)
    assert n_items == {"forward": batch * padded, "backward": most_chunks}.get(stage, batch * faces)
    grid, block = launch_size(n_items)
    assert 1 <= block <= MAX_THREADS_PER_BLOCK and block % 32 == 0  # whole warps
    assert 1 <= grid <= MAX_GRID_X
    assert (grid - 1) * block < n_items <= grid * block  # every item, and no block without one


# ---------------------------------------------------------------------------------------------
# cuda.py's context and stream rules, against a stand-in for pycuda that records its calls.
# Only pycuda (and torch's CUDA calls, which need a GPU) is stood in for: a launch runs the real
# kernel, the host build in the GPU's shape (one pixel per work item), on the argument block's
# bytes as the driver would get them, so the results are the kernels' own.

MAX_GRID_YZ = 65535


class FakePycuda:
    """``pycuda``, ``pycuda.driver`` and ``pycuda.compiler`` as far as cuda.py uses them; every
    call is appended to :attr:`log`, and :attr:`depth` counts the contexts pushed."""

    def __init__(self, current_stream: int = 0):
        self.log: list[tuple] = []
        self.depth = 0
        self.current_stream = current_stream
        self.fail_compile = self.fail_launch = False
        fake = self

        class Error(Exception):
            pass

        class Context:
            def push(self):
                fake.log.append(("push",))
                fake.depth += 1

            @staticmethod
            def pop():
                assert fake.depth > 0, "pop without a pushed context"
                fake.log.append(("pop",))
                fake.depth -= 1

            @staticmethod
            def synchronize():
                assert fake.depth > 0, "synchronize outside the context"
                fake.log.append(("synchronize",))

        class Device:
            def __init__(self, index):
                self.index = index

            def retain_primary_context(self):
                fake.log.append(("retain primary context", self.index))
                return Context()

            def make_context(self):  # a second context: torch's pointers would be invalid in it
                fake.log.append(("make context", self.index))
                return Context()

        class Function:
            def __init__(self, name):
                self.name = name

            def __call__(self, *args, block, grid, **options):
                assert fake.depth > 0, "launch outside the context"
                fake.log.append(("launch", self.name, block, grid, tuple(sorted(options))))
                if fake.fail_launch:
                    raise Error("cuLaunchKernel failed: too many resources requested for launch")
                (block_x, block_y, block_z), (grid_x, grid_y, grid_z) = block, grid
                assert block_x * block_y * block_z <= MAX_THREADS_PER_BLOCK
                assert grid_x <= MAX_GRID_X and grid_y <= MAX_GRID_YZ and grid_z <= MAX_GRID_YZ
                (value,) = args
                # The driver copies the parameter's bytes: run the kernel on a copy of them.
                assert isinstance(value, np.void) and value.dtype == ARGS_DTYPE
                block_of_args = np.frombuffer(bytes(memoryview(value)), dtype=ARGS_DTYPE).copy()
                cpu_target(lanes=CudaTarget.lanes).launch(self.name, block_of_args, grid_x * grid_y * grid_z,
                                                          block_x * block_y * block_z)

        class SourceModule:
            def __init__(self, source, **options):
                fake.log.append(("compile", source, options))
                if fake.fail_compile:
                    raise Error("nvcc compilation failed")

            def get_function(self, name):
                fake.log.append(("get function", name))
                return Function(name)

        def init():
            fake.log.append(("driver init",))

        self.driver = types.SimpleNamespace(Error=Error, Context=Context, Device=Device, init=init)
        self.compiler = types.SimpleNamespace(SourceModule=SourceModule)

    def calls(self, kind: str) -> list[tuple]:
        return [entry for entry in self.log if entry[0] == kind]


class FakeStream:
    def __init__(self, fake: FakePycuda):
        self.fake = fake
        self.cuda_stream = fake.current_stream

    def synchronize(self):
        self.fake.log.append(("torch stream synchronize", self.cuda_stream))


@pytest.fixture
def pycuda(monkeypatch):
    """A :class:`FakePycuda` in place of the pycuda package, and torch's CUDA calls recorded."""
    fake = FakePycuda()
    package = types.ModuleType("pycuda")
    driver, compiler_module = types.ModuleType("pycuda.driver"), types.ModuleType("pycuda.compiler")
    driver.__dict__.update(vars(fake.driver))
    compiler_module.__dict__.update(vars(fake.compiler))
    package.driver, package.compiler = driver, compiler_module
    for name, module in (("pycuda", package), ("pycuda.driver", driver), ("pycuda.compiler", compiler_module)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(torch.cuda, "init", lambda: fake.log.append(("torch init",)))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream(fake))
    return fake


def test_compiles_in_torchs_primary_context(pycuda):
    target = CudaTarget(3)
    assert [entry[0] for entry in pycuda.log] == [
        "driver init", "torch init", "retain primary context", "push", "compile", "pop",
    ]
    assert pycuda.calls("retain primary context") == [("retain primary context", 3)]
    assert pycuda.calls("make context") == [] and "pycuda.autoinit" not in sys.modules
    (_, source, options), = pycuda.calls("compile")
    assert source == (source_dir() / "softras.cu").read_text()
    assert options == {"no_extern_c": True, "include_dirs": [str(source_dir())], "options": ["-std=c++17"]}
    assert target.lanes == 1 and pycuda.depth == 0


def test_a_failed_compile_leaves_no_context_pushed(pycuda):
    pycuda.fail_compile = True
    with pytest.raises(pycuda.driver.Error):
        CudaTarget(0)
    assert pycuda.depth == 0 and pycuda.log[-1] == ("pop",)


def launches(pycuda: FakePycuda, stream: int) -> list[list[tuple]]:
    """The calls of each kernel launch (up to its pop) of a small render through CudaTarget,
    with torch's current stream ``stream``."""
    target = CudaTarget(0)
    pycuda.current_stream = stream
    del pycuda.log[:]
    verts = torch.tensor([[[[-0.5, -0.5, 2.0], [0.5, -0.5, 2.0], [0.0, 0.5, 2.0]]] * 3], dtype=torch.float64)
    SoftRasterize.apply(verts, torch.ones(1, 3, 3, 1, dtype=torch.float64), 4, 4, SoftRasSettings(), target)
    ends = [i + 1 for i, entry in enumerate(pycuda.log) if entry == ("pop",)]
    assert ends[-1] == len(pycuda.log)
    return [pycuda.log[begin:end] for begin, end in zip([0, *ends], ends)]


@needs_compiler
def test_launches_on_the_default_stream_and_returns_when_done(pycuda):
    # Per launch: push the context, launch with no stream argument (the legacy default stream),
    # wait for the kernel, pop; each function is looked up once.
    setup, *others = launches(pycuda, stream=0)
    assert setup == [("push",), ("get function", "softras_setup_f64"),
                     ("launch", "softras_setup_f64", (128, 1, 1), (1, 1, 1), ()), ("synchronize",), ("pop",)]
    assert [[entry[0] for entry in calls] for calls in others] == [
        ["push", "get function", "launch", "synchronize", "pop"]] * 2
    assert [calls[2][1] for calls in others] == ["softras_bin_f64", "softras_forward_f64"]


@needs_compiler
def test_waits_for_torchs_own_stream_first(pycuda):
    # Before each launch torch's current stream is drained, so the kernel reads finished inputs.
    calls = launches(pycuda, stream=0x7F00)
    assert len(calls) == 3
    for launch in calls:
        assert launch[:2] == [("torch stream synchronize", 0x7F00), ("push",)]
        assert [entry[0] for entry in launch[-3:]] == ["launch", "synchronize", "pop"]


@needs_compiler
def test_a_failed_launch_is_one_line_and_pops_the_context(pycuda):
    target = CudaTarget(0)
    pycuda.fail_launch = True
    with pytest.raises(MicroDRError, match="^CUDA kernel softras_setup_f32 failed: cuLaunchKernel failed: too many"):
        SoftRasterize.apply(torch.ones(1, 1, 3, 3), torch.ones(1, 1, 3, 1), 4, 4, SoftRasSettings(), target)
    assert pycuda.depth == 0 and pycuda.log[-1] == ("pop",)


@needs_compiler
@pytest.mark.parametrize("name", ["batch and non-square", "one channel, tall image"])
def test_the_cuda_adapter_renders_what_the_reference_does(pycuda, name):
    # The whole adapter (its argument block passed by value, its grid and block, the torch sort
    # it uses for binning) around the real kernels, forward and backward, against the reference.
    case = make_case(name)
    target = CudaTarget(0)
    results = []
    for render in (lambda v, c: SoftRasterize.apply(v, c, case.width, case.height, case.settings, target),
                   lambda v, c: rasterize(v, c, case.width, case.height, case.settings, backend="reference")):
        verts, attrs = (t.clone().requires_grad_() for t in (case.verts, case.attrs))
        image = render(verts, attrs)
        projection = torch.randn(image.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        (image * projection).sum().backward()
        results.append((image.detach(), verts.grad, attrs.grad))
    assert_matches(*results, 1e-10, 1e-8)
    assert [entry[1] for entry in pycuda.calls("launch")] == [f"softras_{stage}_f64" for stage in STAGES]
    assert pycuda.depth == 0
