"""The kernels (cuda_src/softras.cu) against the reference, case by case.

Every case runs the CPU build of the kernels twice: with the native lane width (a SIMD vector of
adjacent pixels per work item) and in the GPU's shape (``MDR_LANES=1``: one pixel per work item,
as on every CUDA thread), so that the GPU's indexing runs without a GPU. The same cases run on
the GPU (marked ``gpu``) where pycuda and a CUDA device exist. Forward values must agree within 1e-5 absolute and every
gradient within 1e-4 of that gradient's largest magnitude; in float64 the agreement is ~1e-12.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess

import pytest
import torch

from microdr.errors import MicroDRError
from microdr.raster import SoftRasSettings, backend_status, rasterize
from microdr.raster.cpu import LANES_VARIABLE, cpu_target
from microdr.raster.cpu_build import cache_path
from microdr.raster.cuda import CudaTarget, resource_usage
from microdr.raster import kernels
from microdr.raster.kernels import STAGES, TEXTURE_STAGES, TEXTURED_BACKWARD, SoftRasterize

from helpers import LANE_SHAPES, Case, assert_matches, run
from helpers import cpu_lanes as lanes_of_cpu_kernels

F32, F64 = torch.float32, torch.float64


def random_faces(generator, batch, count, *, spread=1.2, size=0.5, depth=(1.5, 4.0), channels=3):
    centers = (torch.rand(batch, count, 1, 2, generator=generator, dtype=F64) * 2 - 1) * spread
    corners = centers + (torch.rand(batch, count, 3, 2, generator=generator, dtype=F64) - 0.5) * size
    z = depth[0] + torch.rand(batch, count, 3, 1, generator=generator, dtype=F64) * (depth[1] - depth[0])
    attrs = torch.rand(batch, count, 3, channels, generator=generator, dtype=F64)
    return torch.cat([corners, z], dim=-1), attrs


def slivers(generator, count, *, length=2.0, width=0.02, spread=1.3, depth=(1.5, 4.0), channels=3):
    """Needles: faces ``length`` long and 0.5 to 1.5 ``width`` wide, pointing in random directions,
    centered within ``spread`` of the image's center (so some stick out of it), corner depths
    drawn from ``depth``."""
    centers = (torch.rand(count, 2, generator=generator, dtype=F64) * 2 - 1) * spread
    angle = torch.rand(count, generator=generator, dtype=F64) * 2 * torch.pi
    along = torch.stack([angle.cos(), angle.sin()], -1)
    across = torch.stack([-along[:, 1], along[:, 0]], -1)
    corners = torch.stack([centers - along * length / 2, centers + along * length / 2,
                           centers + across * width * (torch.rand(count, 1, generator=generator, dtype=F64) + 0.5)], 1)
    z = depth[0] + torch.rand(count, 3, 1, generator=generator, dtype=F64) * (depth[1] - depth[0])
    attrs = torch.rand(1, count, 3, channels, generator=generator, dtype=F64)
    return torch.cat([corners, z], -1).unsqueeze(0), attrs


def make_case(name: str) -> Case:
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    default = SoftRasSettings(sigma=1e-3, gamma=1e-2, background=(0.2, 0.4, 0.6))
    if name == "random mesh":
        v, c = random_faces(g, 1, 40)
        return Case(v, c, 24, 24, default)
    if name == "overlapping at different depths":
        v, c = random_faces(g, 1, 12, spread=0.2, size=1.2, depth=(1.0, 1.3))
        return Case(v, c, 20, 20, default)
    if name == "off screen and behind the near plane":
        v, c = random_faces(g, 1, 30, spread=2.0, size=1.0, depth=(-1.0, 3.0))
        return Case(v, c, 24, 20, dataclasses.replace(default, near=0.5))
    if name == "beyond far":
        v, c = random_faces(g, 1, 20, depth=(5.0, 12.0))
        return Case(v, c, 20, 20, dataclasses.replace(default, near=0.5, far=8.0))
    if name == "tiny and screen-filling":
        small, cs = random_faces(g, 1, 20, size=0.03)
        big, cb = random_faces(g, 1, 3, spread=0.1, size=6.0)
        return Case(torch.cat([small, big], 1), torch.cat([cs, cb], 1), 24, 24, default)
    if name == "zero-area":
        v, c = random_faces(g, 1, 10, spread=0.5, size=0.8)
        v[0, :2, 2, :2] = v[0, :2, 0, :2]  # two corners coincide
        v[0, 2:4, :, 1] = v[0, 2:4, :1, 1]  # collinear: one y for all three corners
        return Case(v, c, 16, 16, default)
    if name == "back faces culled":
        v, c = random_faces(g, 1, 30)
        return Case(v, c, 20, 20, dataclasses.replace(default, cull_backfaces=True))
    if name == "batch and non-square":
        v, c = random_faces(g, 3, 15, channels=5)
        return Case(v, c, 31, 17, dataclasses.replace(default, background=(0.5,)))
    if name == "orthographic":
        v, c = random_faces(g, 2, 25)
        return Case(v, c, 20, 24, dataclasses.replace(default, perspective=False))
    if name == "silhouette only":
        v, c = random_faces(g, 2, 20, channels=0)
        return Case(v, c, 16, 16, dataclasses.replace(default, background=()))
    if name == "one channel, tall image":
        v, c = random_faces(g, 1, 10, channels=1)
        return Case(v, c, 5, 40, dataclasses.replace(default, background=()))
    if name.startswith("slivers reaching far"):
        # Boxes far wider than 64 pixels (one-row chunks) and boxes split into bands, whose chunks
        # the backward narrows to the columns the face reaches (softras.cu, reach_columns): a
        # chunk narrowed too far would drop pairs several pixels from a sliver (sigma 3e-3:
        # reach ~0.16 screen units, 5 pixels).
        v, c = slivers(g, 12)
        small, cs = slivers(g, 8, length=0.4, width=0.005, spread=1.0)
        settings = dataclasses.replace(default, sigma=3e-3, perspective="orthographic" not in name)
        return Case(torch.cat([v, small], 1), torch.cat([c, cs], 1), 72, 60, settings)
    match = re.fullmatch(r"sigma (\S+) gamma (\S+)", name)
    if match:
        sigma, gamma = float(match[1]), float(match[2])
        v, c = random_faces(g, 1, 20, size=0.7)
        return Case(v, c, 20, 20, dataclasses.replace(default, sigma=sigma, gamma=gamma))
    raise KeyError(name)


CASES = [
    "random mesh",
    "overlapping at different depths",
    "off screen and behind the near plane",
    "beyond far",
    "tiny and screen-filling",
    "zero-area",
    "back faces culled",
    "batch and non-square",
    "orthographic",
    "silhouette only",
    "one channel, tall image",
    "slivers reaching far",
    "slivers reaching far, orthographic",
    *(f"sigma {s} gamma {g}" for s, g in [(1e-6, 1e-4), (1e-5, 1e-3), (1e-4, 1e-4), (1e-3, 1e-1),
                                          (1e-2, 1.0), (1e-1, 1e-2)]),
]


@pytest.fixture(params=LANE_SHAPES)
def cpu_lanes(request):
    """Makes the test's ``backend="cpu"`` renders run with the native lane width, then in the
    GPU's shape (``MICRODR_CPU_LANES=1``); returns the lanes in use."""
    with lanes_of_cpu_kernels(request.param):
        lanes = cpu_target().lanes
        assert request.param in (None, lanes)
        yield lanes


@pytest.fixture(scope="module")
def reference_results():
    return {name: run(make_case(name), "reference", F64) for name in CASES}


@pytest.mark.parametrize("name", CASES)
def test_cpu_kernels_match_reference_float64(name, reference_results, cpu_lanes):
    assert_matches(run(make_case(name), "cpu", F64), reference_results[name], 1e-10, 1e-8)


@pytest.mark.parametrize("name", CASES)
def test_cpu_kernels_match_reference_float32(name, reference_results, cpu_lanes):
    case = make_case(name)
    if case.settings.gamma < 1e-3:
        # In float32, zhat carries ~6e-8 of rounding; exp(zhat / gamma) turns that into a relative
        # weight error of 6e-8 / gamma, above 1e-5 once gamma < 1e-3. Those cases run in float64.
        pytest.skip("float32 resolution of zhat / gamma; checked in float64")
    assert_matches(run(case, "cpu", F32), reference_results[name], 1e-5, 1e-4)


def test_zero_area_faces_get_no_gradient(cpu_lanes):
    image, grad_verts, grad_attrs = run(make_case("zero-area"), "cpu", F64)
    assert torch.equal(grad_verts[0, :4], torch.zeros_like(grad_verts[0, :4]))
    assert torch.equal(grad_attrs[0, :4], torch.zeros_like(grad_attrs[0, :4]))
    assert grad_verts[0, 4:].abs().max() > 0


def test_kernels_draw_something_in_every_case():
    # Guards the suite itself: a case where nothing is drawn would compare zeros with zeros.
    for name in CASES:
        case = make_case(name)
        alpha = rasterize(case.verts, case.attrs, case.width, case.height, case.settings, backend="cpu")[:, -1]
        assert alpha.max() > 0.5, name


@pytest.mark.parametrize("perspective", [True, False])
def test_gradcheck_cpu_kernels(perspective, cpu_lanes):
    # The hand-written backward against finite differences of the kernel's own forward. The
    # cut-off (a step of eps_d) is pushed below gradcheck's tolerance.
    g = torch.Generator().manual_seed(7)
    verts, attrs = random_faces(g, 2, 5, spread=0.5, size=0.9)
    settings = SoftRasSettings(sigma=2e-2, gamma=5e-2, eps_d=1e-14, perspective=perspective, background=(0.3,))
    torch.autograd.gradcheck(
        lambda v, c: rasterize(v, c, 7, 6, settings, backend="cpu"),
        (verts.requires_grad_(), attrs.requires_grad_()),
    )


@pytest.mark.parametrize("name", ["random mesh", "tiny and screen-filling"])
def test_cpu_kernels_are_deterministic_across_runs_and_thread_counts(name, cpu_lanes):
    # The second case's large faces are split into many backward chunks, added up by the reduce.
    case = make_case(name)
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3, 1):
            torch.set_num_threads(count)
            results.append(run(case, "cpu", F32))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_chunk_pixels_split_boxes_into_bands_of_at_most_64_pixels():
    boxes = torch.tensor([[[0, 11, 0, 10],  # 12 x 11: bands of 5 rows (55 pixels), the last of 2
                           [3, 10, 5, 12],  # 8 x 8: one chunk
                           [0, 0, 0, 129],  # one row of 130: pieces of 44, 44 and 42 columns
                           [1, 0, 1, 0],  # not drawn: no chunk
                           [0, 1, 0, 64]]])  # 2 x 65: one-row pieces of 33 and 32 columns
    assert kernels.chunk_pixels(boxes).tolist() == [55, 55, 22, 64, 44, 44, 42, 33, 32, 33, 32]


def test_setup_counts_the_chunks_the_host_accounts_for(cpu_lanes):
    # softras.cu's chunk_shape (setup's face_chunks) and kernels.chunk_pixels agree, and the
    # chunks cover every pixel of every box exactly once, none more than 64 pixels.
    case = make_case("tiny and screen-filling")
    result = kernels.kernel_forward(cpu_target(), case.verts, case.attrs, case.width, case.height, case.settings)
    pixels = kernels.chunk_pixels(result.face_boxes)
    assert int(result.face_chunks.sum()) == pixels.numel() > result.face_chunks.numel()
    assert int(pixels.sum()) == result.pairs_visited()
    assert result.most_pixels_per_backward_item() == int(pixels.max()) <= 64


def test_too_many_chunks_is_refused_with_the_memory_they_need():
    assert kernels.too_many_chunks(2**20, 2**20, 3, 8) is None
    problem = kernels.too_many_chunks(2**28, 2**28, 3, 4)  # 8 + 72 bytes each: 20 GiB
    assert problem.startswith(f"the backward splits the faces' reach into {2**28} chunks of at most 64 pixels")
    assert "they need 20.0 GiB, more than the limit of 4 GiB" in problem


def test_the_gpu_shape_is_a_library_of_its_own(monkeypatch):
    # The widths are told apart by the build cache (a library built with MDR_LANES=1 has its own
    # key), and the variable selects one for backend="cpu".
    monkeypatch.delenv(LANES_VARIABLE, raising=False)
    native, gpu_shape = cpu_target(), cpu_target(lanes=1)
    assert (native.lanes, gpu_shape.lanes) == (8, 1)  # portability.h's MDR_LANES on CPUs, and the GPU's
    assert gpu_shape.loaded.build.path != native.loaded.build.path
    assert "-DMDR_LANES=1" in gpu_shape.loaded.build.flags
    assert not any(flag.startswith("-DMDR_LANES") for flag in native.loaded.build.flags)
    assert cache_path(defines=("MDR_LANES=1",)) == gpu_shape.loaded.build.path
    assert cache_path() == native.loaded.build.path
    monkeypatch.setenv(LANES_VARIABLE, "1")
    assert cpu_target() is gpu_shape


def test_the_shapes_render_alike():
    # Same math in another order (the backward's lane sums): equal to rounding, far closer than
    # either is to the reference.
    case = make_case("random mesh")
    native, gpu_shape = (run_on(cpu_target(lanes), case) for lanes in (None, 1))
    for a, b in zip(native, gpu_shape, strict=True):
        assert (a - b).abs().max() <= 1e-13 * b.abs().max()


def run_on(target, case):
    """``run(case, "cpu", F64)`` with this CPU target (a lane width) instead of the default."""
    verts, attrs = (t.clone().requires_grad_() for t in (case.verts, case.attrs))
    image = SoftRasterize.apply(verts, attrs, case.width, case.height, case.settings, target)
    projection = torch.randn(image.shape, generator=torch.Generator().manual_seed(0), dtype=F64)
    (image * projection).sum().backward()
    return image.detach(), verts.grad, attrs.grad


@pytest.mark.parametrize("value", ["3", "eight", "0", "-1"])
def test_a_bad_lane_count_is_refused_not_ignored(value, monkeypatch):
    monkeypatch.setenv(LANES_VARIABLE, value)
    case = make_case("random mesh")
    for backend in ("cpu", "auto"):  # auto must not fall back to the reference for a typo
        with pytest.raises(MicroDRError, match=f"MICRODR_CPU_LANES='{value}': expected 1, 2, 4 or 8"):
            rasterize(case.verts, case.attrs, case.width, case.height, case.settings, backend=backend)
    with pytest.raises(MicroDRError, match="lanes=3: the CPU kernels take 1, 2, 4 or 8 adjacent pixels"):
        cpu_target(lanes=3)


# ---------------------------------------------------------------------------------------------
# nvcc: every kernel compiles for the GPU generations we target, without register spills.

ARCHITECTURES = ["sm_70", "sm_75", "sm_80", "sm_90"]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_kernels_compile_with_nvcc_without_spills(arch):
    supported = subprocess.run(["nvcc", "--list-gpu-code"], capture_output=True, text=True).stdout.split()
    if arch not in supported:
        pytest.skip(f"this nvcc cannot target {arch} (CUDA 13 dropped Volta)")
    kernels = resource_usage(arch)
    assert sorted(kernels) == sorted(
        f"softras_{stage}_{suffix}" for stage in (*STAGES, TEXTURED_BACKWARD, *TEXTURE_STAGES) for suffix in ("f32", "f64")
    )
    assert all(k.spill_stores == k.spill_loads == 0 for k in kernels.values()), kernels


# ---------------------------------------------------------------------------------------------
# GPU: the same cases through PyCUDA.

cuda_reason = backend_status("cuda:0" if torch.cuda.is_available() else "cuda")["cuda"] \
    if torch.cuda.is_available() else "no CUDA GPU is visible to PyTorch"


@pytest.mark.gpu
@pytest.mark.skipif(cuda_reason is not None, reason=f"GPU tests need a GPU and pycuda: {cuda_reason}")
@pytest.mark.parametrize("name", CASES)
def test_cuda_kernels_match_reference(name, reference_results):
    assert_matches(run(make_case(name), "cuda", F64, device="cuda"), reference_results[name], 1e-10, 1e-8)
    case = make_case(name)
    if case.settings.gamma >= 1e-3:
        assert_matches(run(case, "cuda", F32, device="cuda"), reference_results[name], 1e-5, 1e-4)
