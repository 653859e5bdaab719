"""scripts/gpu_cost_model.py: its loop finder on PTX written here and on the kernels (with nvcc),
its occupancy and time arithmetic against hand computations, its work counts, its UV spheres."""

import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import bench  # noqa: E402
import gpu_cost_model as model  # noqa: E402

A100, H100 = model.GPUS

# Two nested loops; only the inner one holds an ex2. Inner body: 5 instructions from its head
# to its back branch; its skip path: the head's 2 instructions through the first conditional
# branch, then the latch's 2.
PTX = """
.visible .entry probe_forward(
    .param .u64 p
)
{
    .reg .pred %p<3>;
    mov.u32 %r1, 0;
$L__BB0_1:
    add.s32 %r2, %r1, 1;
$L__BB0_2:
    setp.eq.s32 %p1, %r2, 0;
    @%p1 bra $L__BB0_3;
    ex2.approx.ftz.f32 %f1, %f2;
$L__BB0_3:
    setp.lt.s32 %p2, %r2, 9;
    @%p2 bra $L__BB0_2;
    @%p1 bra $L__BB0_1;
    ret;
}
"""


def test_per_pair_loop_is_the_innermost_loop_with_an_exp():
    lines = model.function_lines(PTX, "probe_forward")
    assert model.per_pair_loop(lines) == model.LoopCount(body=5, skip=4)
    with pytest.raises(ValueError):
        model.per_pair_loop(model.function_lines(PTX.replace("ex2", "mul"), "probe_forward"))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed (CUDA toolkit)")
def test_finds_the_per_pair_loops_of_the_kernels():
    loops = model.loop_counts("sm_80")
    for loop in loops.values():
        # The loops evaluate a pair (three edges, barycentrics, an exp): hundreds of instructions;
        # a skipped pair far fewer.
        assert 100 < loop.body < 3000 and 0 < loop.skip < loop.body / 2


def test_warps_per_sm_from_registers():
    # 64 registers: 2048 per warp, 8192 per block of 4 warps, 8 blocks in 65536 -> 32 warps.
    assert model.warps_per_sm(64, A100) == 32
    # 150 registers: 4800 -> 4864 per warp (256s), 19456 per block, 3 blocks -> 12 warps.
    assert model.warps_per_sm(150, A100) == 12
    # 32 registers: the thread limit binds, 2048 / 128 = 16 blocks -> 64 warps.
    assert model.warps_per_sm(32, H100) == 64


def work(scale: int = 1, largest_box: int = 100, most_chunks: int = 2) -> model.Work:
    return model.Work(faces=1000, pixels=2**20, channels=3, pairs=scale * 10**6, tile_pairs=scale * 2 * 10**4,
                      warp_hits=scale * 3 * 10**4, chunks=scale * 3000, partial_chunks=scale * 2000,
                      chunk_warp_iterations=scale * 4 * 10**4, most_chunks=most_chunks,
                      face_warp_iterations=scale * 10**5, largest_box=largest_box)


def test_times_are_positive_and_grow_with_the_pairs():
    loops = {"forward": model.LoopCount(300, 10), "backward": model.LoopCount(400, 100)}
    registers = {"forward": 64, "backward": 150}
    small, large = (model.estimate(work(scale), A100, loops, registers) for scale in (1, 10))
    for field in ("forward_ms", "backward_ms", "backward_per_face_ms"):
        assert 0 < getattr(small, field) < getattr(large, field)
    # Issue-bound forward, by hand: warps of the listed tiles 2e4 * 2 = 4e4, 3e4 of them full
    # (300) and 1e4 skipped (10); A100 issues 108 * 4 * 1.41e9 * 0.5 per second (32 warps/SM).
    issue_ms = (3e4 * 300 + 1e4 * 10) / (108 * 4 * 1.41e9 * 0.5) * 1e3
    overhead_ms = (8 * 5 + 20 + 2e4 / 2e9 * 1e6) / 1e3
    assert small.forward_ms == pytest.approx(overhead_ms + issue_ms)
    # Backward, issue-bound: 4e4 warp iterations of 400 instructions, 12 warps/SM (150 registers:
    # 3 per scheduler of the 4 that hide latency), 7 launches, and the reduce of the face of 2
    # chunks: one partial of 9 + 3 * 3 values at 4 cycles each.
    backward_issue_ms = 4e4 * 400 / (108 * 4 * 1.41e9 * 0.5 * 3 / 4) * 1e3
    assert small.backward_ms == pytest.approx(7 * 5e-3 + 18 * 4 / 1.41e9 * 1e3 + backward_issue_ms)
    # One face with a huge box: the per-face backward is one warp's walk over it; the per-chunk
    # one is not, and its reduce (a million pixels: 16,384 chunks of 64) stays small.
    lopsided = model.estimate(work(largest_box=10**6, most_chunks=16384), A100, loops, registers)
    assert lopsided.backward_per_face_ms == pytest.approx(15e-3 + 1e6 * 400 * 4 / 1.41e9 * 1e3)
    assert lopsided.backward_ms < lopsided.backward_per_face_ms / 100


def test_count_work_agrees_with_the_bench():
    case = bench.Case(1280, 64, 1, 3, "1px")
    verts, attrs, settings = bench.inputs(case, "cpu")
    counted = model.count_work(verts, attrs, case.size, settings)
    assert counted.pairs == bench.pairs_visited(case, "cpu", verts, attrs, settings)
    # Each listed (tile, face) pair is two warps, of which the box meets one or both.
    assert counted.tile_pairs <= counted.warp_hits <= 2 * counted.tile_pairs
    assert 0 < counted.largest_box <= counted.face_warp_iterations <= counted.pairs
    # Chunks: at most 64 pixels each, at least one per drawn face.
    assert counted.faces <= counted.chunks == counted.partial_chunks + counted.faces
    assert counted.chunk_warp_iterations <= 64 * -(-counted.chunks // 32)
    assert 1 <= counted.most_chunks <= counted.chunks


def test_few_large_faces_split_into_chunks():
    # The bench's 2 faces filling 1024 x 1024: each box is the whole image, 16,384 chunks of 64.
    case = bench.LARGE_FACES[0]
    verts, attrs, settings = bench.inputs(case, "cpu")
    counted = model.count_work(verts, attrs, case.size, settings)
    assert (counted.chunks, counted.most_chunks, counted.largest_box) == (2 * 16384, 16384, 1024 * 1024)
    assert counted.chunk_warp_iterations == 64 * 1024


@pytest.mark.parametrize("faces", sorted(model.UV_SPHERES))
def test_uv_spheres_are_closed_outward_unit_spheres(faces):
    mesh = model.uv_sphere(*model.UV_SPHERES[faces])
    assert mesh.faces.shape[0] == faces
    assert torch.allclose(mesh.vertices.norm(dim=1), torch.ones(len(mesh.vertices)), atol=1e-6)
    corners = mesh.vertices[mesh.faces].double()
    normals = torch.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0], dim=1)
    assert ((normals * corners.mean(1)).sum(1) > 0).all()
    # Closed and consistently wound: every directed edge once, and its reverse once.
    edges = mesh.faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2).tolist()
    assert len(set(map(tuple, edges))) == len(edges)
    assert {(b, a) for a, b in edges} == set(map(tuple, edges))
