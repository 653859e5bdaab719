"""Speed on paper: the expected GPU forward + backward time of the bench's 1024 x 1024 cases.

    python scripts/gpu_cost_model.py [--only TEXT]

No GPU is needed, only nvcc (for the instruction counts and registers) and the CPU kernels (for
the work counts). Per case and GPU (A100, H100), the model is

    time = launch overhead + max(issue-bound, memory-bound)          per kernel
    issue-bound = warp instructions / (SMs * 4 schedulers * clock * EFFICIENCY * occupancy factor)

Warp instructions come from the kernels' own numbers:

- instructions per pair: softras.cu's forward_lanes and backward_chunk (float32, RGB, perspective)
  compiled to PTX for sm_80 / sm_90; the per-pair loop is the innermost loop (a label and a
  backward branch to it) whose body holds an ``ex2`` (the exp of D). Its whole body counts for a
  pair that meets its face's box (every path, an upper bound: the rare rescale of the online
  softmax too); a pair that misses costs the path from the loop head through its first branch
  to the loop's end. PTX, not SASS: this machine's CUDA has no cuobjdump or nvdisasm; ptxas drops
  some PTX moves and address arithmetic and expands IEEE divisions into several instructions.
- registers per thread: ptxas (``microdr.raster.cuda.resource_usage``) for the launched kernels,
  which give the warps an SM holds with blocks of 128 threads (``kernels.BLOCK``).
- pairs: the bench's own inputs (``bench.inputs``) run through setup on the CPU kernels; a warp
  is 32 consecutive work items. Forward: a warp is 4 rows of an 8 x 8 tile, and goes through
  every face listed for its tile; the face's box meets its rows (full body) or not (skip path).
  Backward (softras.cu today, issue 14 item 1): a warp is 32 consecutive chunks (at most 64
  pixels of one face's box each, ``kernels.chunk_pixels``), each looping over its pixels one at a
  time, so a warp takes as many iterations as its largest chunk; then the reduce, one thread per
  face, adds a face's partials: the face of the most chunks takes (chunks - 1) x (9 + 3C) x
  LONE_WARP_CPI cycles alone. For comparison, the backward before it, one work item per face:
  a warp is 32 consecutive faces, each looping over its whole box, and the largest box takes
  at least (its pixels) x (body) x LONE_WARP_CPI cycles on one warp alone.
"""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench  # noqa: E402  (the bench's cases and inputs: one place for them)
import torch  # noqa: E402

from microdr.io.mesh import Mesh  # noqa: E402
from microdr.raster.cpu import cpu_target  # noqa: E402
from microdr.raster.cuda import resource_usage, source_dir  # noqa: E402
from microdr.raster.kernels import BLOCK, TILE, chunk_pixels, kernel_forward  # noqa: E402


@dataclass(frozen=True)
class Gpu:
    """Public specifications (assumptions of the model, not measured)."""

    name: str
    arch: str
    sms: int
    clock_ghz: float  # boost
    dram_tb_s: float
    registers_per_sm: int = 65536
    threads_per_sm: int = 2048


GPUS = (Gpu("A100", "sm_80", sms=108, clock_ghz=1.41, dram_tb_s=1.56),  # 40 GB SXM, 19.5 TFLOP/s fp32
        Gpu("H100", "sm_90", sms=132, clock_ghz=1.98, dram_tb_s=3.35))  # SXM, 67 TFLOP/s fp32
WARP = 32
SCHEDULERS_PER_SM = 4
#: Fraction of the peak issue rate the loops reach with enough warps to hide latency (dependent
#: MUFU ops, L1 loads of the face records, divergence inside a warp). An assumption.
EFFICIENCY = 0.5
#: Warps per scheduler needed to reach EFFICIENCY; fewer scale it down in proportion.
WARPS_TO_HIDE_LATENCY = 4
#: Cycles per instruction of a warp running alone (dependent arithmetic has ~4 cycles latency;
#: MUFU ops and loads more, independent instructions in the body less). An assumption.
LONE_WARP_CPI = 4.0
#: Per kernel launch or small torch op (forward: setup, 2 cumsums, bin, sort, bincount,
#: forward, allocations; backward: the kernel and its allocations).
LAUNCH_US = 5.0
LAUNCHES = {"forward": 8, "backward": 7}  # backward: cumsums and repeat_interleave, backward, reduce, allocations
#: The sort of the (tile, face) list: a fixed cost plus a rate, both assumptions (CUB radix sort).
SORT_US, SORT_KEYS_PER_S = 20.0, 2e9
#: The anchors: jrender's README, forward + backward ms at 1024 x 1024.
ANCHORS = {280: {"SoftRas": 9.2, "PyTorch3D": 48.3, "jrender": 7.3},
           3300: {"SoftRas": 44.1, "PyTorch3D": 53.3, "jrender": 11.5},
           39000: {"SoftRas": 404.9, "PyTorch3D": 82.9, "jrender": 35.5}}
#: UV spheres with exactly the anchors' face counts: faces = 2 * segments * (rings - 1).
UV_SPHERES = {280: (14, 11), 3300: (55, 31), 39000: (150, 131)}

_PROBE = """#include "softras.cu"
extern "C" __global__ void probe_forward(const RasterArgs<float> a) {
    forward_lanes<float, CHANNEL_CHUNK, true, false>(a, (long long)blockIdx.x * blockDim.x + threadIdx.x);
}
extern "C" __global__ void probe_backward(const RasterArgs<float> a) {
    backward_chunk<float, CHANNEL_CHUNK, true, false>(a, (long long)blockIdx.x * blockDim.x + threadIdx.x);
}
"""


@dataclass(frozen=True)
class LoopCount:
    """PTX instructions of a per-pair loop: the whole body, and the path of a pair that is skipped."""

    body: int
    skip: int


def ptx_of_probes(arch: str) -> str:
    """PTX of forward_lanes and backward_chunk (float32, RGB, perspective) as kernels of their own."""
    with tempfile.TemporaryDirectory() as folder:
        probe, ptx = Path(folder) / "probe.cu", Path(folder) / "probe.ptx"
        probe.write_text(_PROBE)
        command = ["nvcc", "-ptx", f"-arch={arch}", "-std=c++17", "-I", str(source_dir()), "-o", str(ptx), str(probe)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"nvcc failed for {arch}: {result.stderr.strip()}")
        return ptx.read_text()


def function_lines(ptx: str, entry: str) -> list[str]:
    """The lines of one ``.entry`` of ``ptx``, stripped."""
    match = re.search(rf"\.entry {entry}\(.*?\n}}", ptx, re.S)
    if match is None:
        raise ValueError(f"no .entry {entry} in the PTX")
    return [line.strip() for line in match.group(0).splitlines()]


def _is_instruction(line: str) -> bool:
    return line.endswith(";") and not line.startswith((".", "//", "{", "}"))


def per_pair_loop(lines: list[str]) -> LoopCount:
    """The innermost loop holding an ``ex2``: a label ``$L`` and a later branch back to it."""
    labels = {line[:-1]: i for i, line in enumerate(lines) if line.startswith("$L") and line.endswith(":")}
    loops = []
    for i, line in enumerate(lines):
        target = re.search(r"\bbra(?:\.uni)?\s+(\$L\w+);", line)
        if target and labels.get(target.group(1), i) < i:
            head = labels[target.group(1)]
            if any(" ex2." in f" {body}" for body in lines[head:i]):
                loops.append((i - head, head, i))
    if not loops:
        raise ValueError("no loop with an ex2 in the PTX")
    _, head, end = min(loops)
    body = sum(_is_instruction(line) for line in lines[head:end + 1])
    # The skip path: from the head through the first conditional branch to a label inside the loop,
    # then from that label to the back branch.
    for i in range(head, end):
        branch = re.search(r"^@%p\d+ bra(?:\.uni)?\s+(\$L\w+);", lines[i])
        if branch and head < labels[branch.group(1)] <= end:
            skip_to = labels[branch.group(1)]
            skip = sum(_is_instruction(line) for line in lines[head:i + 1] + lines[skip_to:end + 1])
            return LoopCount(body, skip)
    return LoopCount(body, body)


def loop_counts(arch: str) -> dict[str, LoopCount]:
    """Forward and backward per-pair PTX instruction counts for ``arch``."""
    ptx = ptx_of_probes(arch)
    return {stage: per_pair_loop(function_lines(ptx, f"probe_{stage}")) for stage in ("forward", "backward")}


def warps_per_sm(registers: int, gpu: Gpu) -> int:
    """Resident warps per SM for blocks of BLOCK threads (registers allocated per warp in 256s)."""
    per_warp = -(-registers * WARP // 256) * 256
    warps_per_block = BLOCK // WARP
    blocks = min(gpu.registers_per_sm // (per_warp * warps_per_block), gpu.threads_per_sm // BLOCK)
    return blocks * warps_per_block


@dataclass(frozen=True)
class Work:
    """What a render asks of the GPU kernels, counted on the CPU."""

    faces: int
    pixels: int
    channels: int
    pairs: int  # (pixel, face) pairs in the faces' boxes (the bench's pairs_visited)
    tile_pairs: int  # listed (tile, face) pairs
    warp_hits: int  # (warp, face) pairs of the forward whose box meets the warp's rows
    chunks: int  # backward work items
    partial_chunks: int  # chunks but each face's first: slots of partial gradients
    chunk_warp_iterations: int  # per 32 consecutive chunks, the largest chunk's pixels
    most_chunks: int  # of one face (its reduce thread's partials, plus one)
    face_warp_iterations: int  # one work item per face, as before: per 32 consecutive faces, the largest box
    largest_box: int  # pixels


def count_work(verts: torch.Tensor, attrs: torch.Tensor, size: int, settings) -> Work:
    """Runs the CPU kernels' setup (and the rest of the forward) and counts the GPU's work."""
    result = kernel_forward(cpu_target(), verts.contiguous(), attrs.contiguous(), size, size, settings)
    boxes = result.face_boxes.long().flatten(0, 1)
    row0, row1, col0, col1 = boxes.unbind(-1)
    drawn = (row0 <= row1) & (col0 <= col1)
    area = torch.where(drawn, (row1 - row0 + 1) * (col1 - col0 + 1), 0)
    rows_per_warp = WARP // TILE
    warp_hits = torch.where(drawn, (row1 // rows_per_warp - row0 // rows_per_warp + 1) * (col1 // TILE - col0 // TILE + 1), 0)
    chunks = chunk_pixels(result.face_boxes)
    return Work(faces=verts.shape[0] * verts.shape[1], pixels=verts.shape[0] * size * size, channels=attrs.shape[-1],
                pairs=int(area.sum()), tile_pairs=int(result.bins.tile_items.numel()), warp_hits=int(warp_hits.sum()),
                chunks=chunks.numel(), partial_chunks=int((result.face_chunks.long() - 1).clamp(min=0).sum()),
                chunk_warp_iterations=warp_iterations(chunks),
                most_chunks=int(result.face_chunks.max()), face_warp_iterations=warp_iterations(area),
                largest_box=int(area.max()))


def warp_iterations(pixels: torch.Tensor) -> int:
    """Loop iterations of the warps of 32 consecutive work items, each looping over its ``pixels``:
    per warp, its largest item's."""
    padded = torch.nn.functional.pad(pixels, (0, -pixels.numel() % WARP))
    return int(padded.view(-1, WARP).amax(1).sum()) if padded.numel() else 0


def issue_ms(warp_instructions: float, gpu: Gpu, registers: int) -> float:
    per_scheduler = warps_per_sm(registers, gpu) / SCHEDULERS_PER_SM
    efficiency = EFFICIENCY * min(1.0, per_scheduler / WARPS_TO_HIDE_LATENCY)
    return warp_instructions / (gpu.sms * SCHEDULERS_PER_SM * gpu.clock_ghz * 1e6 * efficiency)


def memory_ms(dram_bytes: float, gpu: Gpu) -> float:
    return dram_bytes / (gpu.dram_tb_s * 1e9)


@dataclass(frozen=True)
class Estimate:
    forward_ms: float
    backward_ms: float  # per chunk, then the reduce (softras.cu)
    backward_per_face_ms: float  # one work item per face, as before

    @property
    def total_ms(self) -> float:
        return self.forward_ms + self.backward_ms

    @property
    def total_per_face_ms(self) -> float:
        return self.forward_ms + self.backward_per_face_ms


def estimate(work: Work, gpu: Gpu, loops: dict[str, LoopCount], registers: dict[str, int]) -> Estimate:
    """Forward, backward (per chunk) and backward per face milliseconds of one render on ``gpu``."""
    word = 4  # float32
    warps_listed = work.tile_pairs * TILE * TILE // WARP
    misses = warps_listed - work.warp_hits
    fwd, bwd = loops["forward"], loops["backward"]
    # DRAM: the face records, boxes and corners once; the pair list written, sorted and read;
    # image (C + 1) and aux (3) planes written; the backward reads them and grad_image and
    # writes the gradients.
    face_bytes = work.faces * (17 + 4 + 9 + 3 * work.channels) * word  # record, box, corners, colors
    planes = work.pixels * (work.channels + 1 + 3) * word
    sort_ms = (SORT_US + 1e6 * work.tile_pairs / SORT_KEYS_PER_S) / 1e3
    forward = (LAUNCHES["forward"] * LAUNCH_US / 1e3 + sort_ms + max(
        issue_ms(work.warp_hits * fwd.body + misses * fwd.skip, gpu, registers["forward"]),
        memory_ms(face_bytes + 4 * work.tile_pairs * 16 + planes, gpu)))
    backward_memory = memory_ms(face_bytes + planes + work.pixels * (work.channels + 1) * word, gpu)
    overhead = LAUNCHES["backward"] * LAUNCH_US / 1e3
    # Per chunk: its face (8 bytes) and, but for a face's first, partials written and read back.
    values = 9 + 3 * work.channels
    chunk_bytes = work.chunks * 8 + 2 * work.partial_chunks * values * word
    reduce_ms = (work.most_chunks - 1) * values * LONE_WARP_CPI / (gpu.clock_ghz * 1e6)
    chunked = overhead + reduce_ms + max(issue_ms(work.chunk_warp_iterations * bwd.body, gpu, registers["backward"]),
                                         memory_ms(chunk_bytes, gpu) + backward_memory)
    lone_warp_ms = work.largest_box * bwd.body * LONE_WARP_CPI / (gpu.clock_ghz * 1e6)
    per_face = (LAUNCHES["backward"] - 4) * LAUNCH_US / 1e3 + max(
        issue_ms(work.face_warp_iterations * bwd.body, gpu, registers["backward"]), lone_warp_ms, backward_memory)
    return Estimate(forward, chunked, per_face)


def uv_sphere(segments: int, rings: int) -> Mesh:
    """A unit UV sphere: ``rings`` rows of vertices from pole to pole (the poles single), each
    row of ``segments``; ``2 * segments * (rings - 1)`` faces, outward counter-clockwise."""
    polar = torch.linspace(0, math.pi, rings + 1, dtype=torch.float64)[1:-1]
    azimuth = torch.arange(segments, dtype=torch.float64) * (2 * math.pi / segments)
    ring = torch.stack([torch.sin(polar)[:, None] * torch.cos(azimuth), torch.cos(polar)[:, None].expand(-1, segments),
                        -torch.sin(polar)[:, None] * torch.sin(azimuth)], -1).reshape(-1, 3)
    vertices = torch.cat([torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64), ring,
                          torch.tensor([[0.0, -1.0, 0.0]], dtype=torch.float64)])
    south = len(vertices) - 1
    faces = []
    for s in range(segments):
        t = (s + 1) % segments
        faces.append((0, 1 + s, 1 + t))
        for r in range(rings - 2):
            a, b = 1 + r * segments + s, 1 + r * segments + t
            faces += [(a, a + segments, b + segments), (a, b + segments, b)]
        faces.append((1 + (rings - 2) * segments + s, south, 1 + (rings - 2) * segments + t))
    return Mesh(vertices.float(), torch.tensor(faces, dtype=torch.int64))


def model_cases() -> list[tuple[str, bench.Case, Mesh | None]]:
    """The bench's 1024 x 1024 RGB cases, then the anchors' face counts as UV spheres (RGB,
    batch 1), each with both sigma rules."""
    chosen = [(case.name, case, None) for case in bench.cases(quick=False)
              if case.size == 1024 and case.channels == 3]
    for faces, (segments, rings) in UV_SPHERES.items():
        for rule in ("softras", "1px"):
            case = bench.Case(faces, 1024, 1, 3, rule)
            chosen.append((f"uv{faces}_1024px_b1_rgb_sigma-{rule}", case, uv_sphere(segments, rings)))
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="model only the cases whose name contains this")
    args = parser.parse_args()
    loops = {gpu.arch: loop_counts(gpu.arch) for gpu in GPUS}
    usage = {gpu.arch: resource_usage(gpu.arch) for gpu in GPUS}
    registers = {arch: {stage: kernels[f"softras_{stage}_f32"].registers for stage in ("forward", "backward")}
                 for arch, kernels in usage.items()}
    for gpu in GPUS:
        fwd, bwd = loops[gpu.arch]["forward"], loops[gpu.arch]["backward"]
        print(f"# {gpu.name} ({gpu.arch}): forward {registers[gpu.arch]['forward']} registers, "
              f"{warps_per_sm(registers[gpu.arch]['forward'], gpu)} warps/SM, {fwd.body} PTX per pair ({fwd.skip} skipped); "
              f"backward {registers[gpu.arch]['backward']} registers, {warps_per_sm(registers[gpu.arch]['backward'], gpu)} "
              f"warps/SM, {bwd.body} PTX per pair ({bwd.skip} skipped)")
    print("gpu,case,faces,pairs,tile_pairs,chunks,largest_box,forward_ms,backward_ms,backward_per_face_ms,"
          "total_ms,total_per_face_ms,jrender_ms", flush=True)
    for name, case, mesh in model_cases():
        if args.only not in name:
            continue
        verts, attrs, settings = bench.inputs(case, "cpu", mesh)
        work = count_work(verts, attrs, case.size, settings)
        anchor = ANCHORS.get(case.faces, {}).get("jrender", "") if case.batch == 1 else ""
        for gpu in GPUS:
            e = estimate(work, gpu, loops[gpu.arch], registers[gpu.arch])
            print(f"{gpu.name},{name},{case.faces},{work.pairs},{work.tile_pairs},{work.chunks},{work.largest_box},"
                  f"{e.forward_ms:.3f},{e.backward_ms:.3f},{e.backward_per_face_ms:.3f},"
                  f"{e.total_ms:.3f},{e.total_per_face_ms:.3f},{anchor}", flush=True)


if __name__ == "__main__":
    main()
