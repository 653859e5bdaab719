"""Benchmark the rasterizer backends: forward and forward + backward time, peak memory.

    python scripts/bench.py [--quick] [--csv FILE] [--plot FILE] [--threads N[,N...]] [--only TEXT]
                            [--backends NAMES] [--texture]

Cases: icospheres of 1,280 / 5,120 / 20,480 / 81,920 faces filling about half the image,
square images of 64 / 256 / 1024 pixels, batch 1 and 8, silhouette only (no attribute channel)
and RGB, with ``sigma`` chosen so the soft edge is about one pixel wide at each resolution --
``sqrt(sigma)`` (the distance at which ``D = sigmoid(-1)``) equals one pixel, ``2 / H`` screen
units, so ``sigma = 4 / H**2`` -- and with SoftRas's fixed ``sigma = 1e-4``. Then a few large
faces at 1024 x 1024 (RGB, one-pixel edge): a square of 2 faces filling the image, and the
12-face cube (its front face overfills the image), where a backward work item per face would
walk a million pixels alone.

``backward_item_max_pixels`` is the most pixels one backward work item visits (softras.cu splits
every face's box into chunks of at most 64); ``--threads 1,2`` runs each case with each count and
prints how many times faster the most threads are.

Each timing is the median of several runs after a warm-up (fewer for slow cases). Peak memory
is the largest resident-set growth above the level before the case (CPU) or
``torch.cuda.max_memory_allocated`` (CUDA). The reference is skipped where its dense
``pixels x faces`` evaluation would take too long; the script says so.

``--texture`` runs the textured rows instead (CPU kernels): the cow of the ``cow_texture`` task
(``scenes/meshes/spot_triangulated.obj``, 5,856 faces) through its first camera at 256 x 256,
sampling its 1024 x 1024 texture, against the same faces with per-corner RGB colors, for both
sigma rules; then the textured / colored forward + backward ratio.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import itertools
import math
import shutil
import statistics
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import microdr  # noqa: E402, F401  (before torch: it sets torch's OpenMP wait policy)
import torch  # noqa: E402

from microdr.view.camera import CameraTensors, project  # noqa: E402
from microdr.io.mesh import Mesh, cube, icosphere  # noqa: E402
from microdr.raster import SoftRasSettings, backend_status, rasterize  # noqa: E402
from microdr.raster.kernels import kernel_forward  # noqa: E402
from microdr.raster.cpu import cpu_target  # noqa: E402
from microdr.raster.cuda import resource_usage  # noqa: E402
from microdr.view.camera import project_views  # noqa: E402
from microdr.render import raster_settings, scene_faces  # noqa: E402
from microdr.io.scene import Camera, load_scene  # noqa: E402

COLUMNS = ["case", "backend", "faces", "width", "height", "batch", "channels", "threads",
           "forward_ms", "forward_backward_ms", "peak_mb", "pairs_visited", "backward_item_max_pixels"]
SUBDIVISIONS = {1280: 3, 5120: 4, 20480: 5, 81920: 6}
#: The reference evaluates every (pixel, face) pair densely; beyond this many it is skipped.
REFERENCE_MAX_PAIRS = {"quick": 2e7, "full": 1e8}
#: Distance and field of view that make a unit sphere cover about half of a square image.
CAMERA = Camera("perspective", eye=(0.0, 0.0, 3.0), target=(0.0, 0.0, 0.0), up=(0.0, 1.0, 0.0),
                fov=48.0, half_height=None, near=0.1, far=100.0)


@dataclass(frozen=True)
class Case:
    faces: int
    size: int
    batch: int
    channels: int
    sigma_rule: str  # "1px" or "softras"

    @property
    def sigma(self) -> float:
        return 4.0 / self.size**2 if self.sigma_rule == "1px" else 1e-4

    @property
    def name(self) -> str:
        kind = "rgb" if self.channels else "silhouette"
        return f"f{self.faces}_{self.size}px_b{self.batch}_{kind}_sigma-{self.sigma_rule}"


#: The cases of a few large faces at 1024 x 1024 (see the module's docstring).
LARGE_FACES = [Case(2, 1024, 1, 3, "1px"), Case(12, 1024, 1, 3, "1px")]


def case_mesh(faces: int) -> Mesh:
    """The mesh of a case of ``faces`` faces: an icosphere, or for 2 faces a square (side 3 in
    the plane z = 0, wider than the view there: it fills the image), for 12 the cube of edge 2."""
    if faces == 2:
        square = torch.tensor([[-1.5, -1.5, 0.0], [1.5, -1.5, 0.0], [1.5, 1.5, 0.0], [-1.5, 1.5, 0.0]])
        return Mesh(square, torch.tensor([[0, 1, 2], [0, 2, 3]]))
    if faces == 12:
        return cube()
    return icosphere(SUBDIVISIONS[faces])


def inputs(case: Case, device: str, mesh=None):
    """Screen-space corners, attributes and settings of ``case``; ``mesh`` replaces the case's
    own (:func:`case_mesh`; scripts/gpu_cost_model.py: meshes of other face counts, seen the
    same way)."""
    mesh = mesh if mesh is not None else case_mesh(case.faces)
    corners = mesh.vertices[mesh.faces].to(device)
    # Each batch element sees the sphere turned a little, so the elements differ.
    screens = []
    for b in range(case.batch):
        angle = 2 * math.pi * b / max(case.batch, 1) / 10
        rotation = torch.tensor([[math.cos(angle), 0, math.sin(angle)], [0, 1, 0],
                                 [-math.sin(angle), 0, math.cos(angle)]], device=device)
        screens.append(project(corners @ rotation.T, CAMERA, CameraTensors.of(CAMERA, device=device)))
    verts = torch.stack(screens).contiguous()
    generator = torch.Generator().manual_seed(0)
    attrs = torch.rand(case.batch, case.faces, 3, case.channels, generator=generator).to(device)
    settings = SoftRasSettings(sigma=case.sigma)
    return verts, attrs, settings


class PeakMemory:
    """Peak memory above the level before the block: torch's CUDA allocations, or on the CPU
    the resident set's high-water mark (Linux resets it through /proc/self/clear_refs; where
    that is refused, the resident set is sampled every millisecond instead)."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        _release_free_memory()
        self.base = self.peak = _status_bytes("VmRSS")
        self.thread = None
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # resets VmHWM to the current resident set
        except OSError:
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, _status_bytes("VmRSS"))
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device == "cuda":
            self.peak = torch.cuda.max_memory_allocated()
        elif self.thread is not None:
            self.running = False
            self.thread.join()
        else:
            self.peak = _status_bytes("VmHWM")

    @property
    def megabytes(self) -> float:
        return max(self.peak - self.base, 0) / 2**20


def _release_free_memory() -> None:
    """Hands the heap's free pages back to the system (glibc's malloc_trim), so that a case's
    allocations show as growth instead of reusing pages an earlier case left resident."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: growth may then read low
        pass


def _status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (``VmRSS``, ``VmHWM``) in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def timed(fn, device: str, budget_s: float, max_runs: int = 21) -> float:
    """Median milliseconds of ``fn`` after one warm-up; fewer runs when each is slow (up to 21:
    cases of a few milliseconds vary by about 10 % from run to run on a shared VM)."""
    def once():
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    first = once()  # warm-up (kernels are compiled before any case: see main)
    if first > budget_s:  # too slow to repeat: the warm-up is the measurement
        return 1e3 * first
    runs = max(1, min(max_runs, int(budget_s / max(first, 1e-6))))
    return 1e3 * statistics.median(once() for _ in range(runs))


def pairs_visited(case: Case, backend: str, verts, attrs, settings) -> int:
    """(pixel, face) pairs evaluated: all of them for the reference; for the kernels, each face
    with the pixels of its box (see ForwardResult.pairs_visited)."""
    if backend == "reference":
        return case.batch * case.size * case.size * case.faces
    return kernel_forward(cpu_target(), verts, attrs, case.size, case.size, settings).pairs_visited()


def backward_item_max_pixels(case: Case, verts, attrs, settings) -> int:
    """The most pixels one work item of the kernels' backward visits (see
    ForwardResult.most_pixels_per_backward_item)."""
    result = kernel_forward(cpu_target(), verts, attrs, case.size, case.size, settings)
    return result.most_pixels_per_backward_item()


def run_case(case: Case, backend: str, device: str, budget_s: float) -> dict:
    verts, attrs, settings = inputs(case, device)

    def forward():
        with torch.no_grad():
            rasterize(verts, attrs, case.size, case.size, settings, backend=backend)

    def forward_backward():
        v = verts.clone().requires_grad_()
        c = attrs.clone().requires_grad_()
        image = rasterize(v, c, case.size, case.size, settings, backend=backend)
        image.sum().backward()

    forward_ms = timed(forward, device, budget_s)
    with PeakMemory(device) as memory:
        forward_backward_ms = timed(forward_backward, device, budget_s)
    return {
        "case": case.name, "backend": backend, "faces": case.faces, "width": case.size,
        "height": case.size, "batch": case.batch, "channels": case.channels,
        "threads": torch.get_num_threads(), "forward_ms": round(forward_ms, 3),
        "forward_backward_ms": round(forward_backward_ms, 3), "peak_mb": round(memory.megabytes, 1),
        "pairs_visited": pairs_visited(case, backend, verts, attrs, settings) if backend != "cuda" else "",
        "backward_item_max_pixels": backward_item_max_pixels(case, verts, attrs, settings) if backend == "cpu" else "",
    }


TEXTURE_SCENE = Path(__file__).resolve().parents[1] / "scenes" / "tasks" / "cow_texture_truth.json"


def texture_rows(budget_s: float) -> list[dict]:
    """The ``--texture`` rows: textured and colored, per sigma rule (see the module)."""
    scene = load_scene(TEXTURE_SCENE)
    soup = scene_faces(scene)
    camera = scene.cameras[0]
    verts = project_views(soup.corners, [camera]).contiguous()
    size = scene.render.width
    colors = torch.rand(1, *soup.albedo.shape[:2], 3, generator=torch.Generator().manual_seed(0))
    rows = []
    for rule, sigma in (("1px", 4.0 / size**2), ("softras", 1e-4)):
        settings = replace(raster_settings(scene.render, camera), sigma=sigma, texture_wrap=soup.texture.wrap)
        for kind, attrs, texture in (("textured", soup.albedo[None].contiguous(), soup.texture.image),
                                     ("rgb", colors, None)):
            def forward_backward():
                # Fresh leaves on the same storage: a clone would add a copy of the 12 MB texture
                # (2.4 ms here) that neither rendering nor an optimizer step makes.
                inputs = [t.detach().requires_grad_() for t in (verts, attrs)]
                image = rasterize(*inputs, size, size, settings, backend="cpu",
                                  texture=None if texture is None else texture.detach().requires_grad_())
                image.sum().backward()

            def forward():
                with torch.no_grad():
                    rasterize(verts, attrs, size, size, settings, backend="cpu", texture=texture)

            forward_ms = timed(forward, "cpu", budget_s)
            with PeakMemory("cpu") as memory:
                forward_backward_ms = timed(forward_backward, "cpu", budget_s)
            result = kernel_forward(cpu_target(), verts, attrs, size, size, settings, texture)
            rows.append({
                "case": f"cow{soup.faces.shape[0]}_{size}px_b1_{kind}_sigma-{rule}", "backend": "cpu",
                "faces": soup.faces.shape[0], "width": size, "height": size, "batch": 1, "channels": 3,
                "threads": torch.get_num_threads(), "forward_ms": round(forward_ms, 3),
                "forward_backward_ms": round(forward_backward_ms, 3), "peak_mb": round(memory.megabytes, 1),
                "pairs_visited": result.pairs_visited(),
                "backward_item_max_pixels": result.most_pixels_per_backward_item(),
            })  # fmt: skip
    return rows


def print_texture_ratios(rows: list[dict]) -> None:
    """Textured over colored forward + backward time, per sigma rule (issue 16's floor: 2x)."""
    by_case = {row["case"]: row for row in rows}
    for row in rows:
        if "_textured_" in row["case"]:
            colored = by_case[row["case"].replace("_textured_", "_rgb_")]
            ratio = row["forward_backward_ms"] / colored["forward_backward_ms"]
            print(f"# {row['case']}: textured / colored forward + backward {ratio:.2f}x, forward "
                  f"{row['forward_ms'] / colored['forward_ms']:.2f}x")


def cases(quick: bool) -> list[Case]:
    if quick:
        return [Case(f, s, 1, 3, "1px") for f, s in [(1280, 64), (5120, 256), (20480, 256), (81920, 1024)]] + [
            Case(5120, 64, 8, 0, "softras"), Case(1280, 64, 1, 3, "softras"), *LARGE_FACES]
    grid = itertools.product(SUBDIVISIONS, (64, 256, 1024), (1, 8), (0, 3), ("1px", "softras"))
    return [Case(*values) for values in grid] + LARGE_FACES


def backends() -> list[tuple[str, str]]:
    available = [("cpu", "cpu"), ("reference", "cpu")]
    if torch.cuda.is_available():
        if backend_status("cuda")["cuda"] is None:
            available.append(("cuda", "cuda"))
        available.append(("reference", "cuda"))
    return available


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_faces, by_pixels) = plt.subplots(1, 2, figsize=(10, 4))
    for backend in sorted({r["backend"] for r in rows}):
        for size in sorted({r["width"] for r in rows}):
            points = sorted((r["faces"], r["forward_backward_ms"]) for r in rows
                            if r["backend"] == backend and r["width"] == size and r["batch"] == 1
                            and r["channels"] == 3 and r["case"].endswith("1px"))
            if len(points) > 1:
                by_faces.plot(*zip(*points), marker="o", label=f"{backend}, {size}x{size}")
        for faces in sorted({r["faces"] for r in rows}):
            points = sorted((r["width"] * r["height"], r["forward_backward_ms"]) for r in rows
                            if r["backend"] == backend and r["faces"] == faces and r["batch"] == 1
                            and r["channels"] == 3 and r["case"].endswith("1px"))
            if len(points) > 1:
                by_pixels.plot(*zip(*points), marker="o", label=f"{backend}, {faces} faces")
    for axes, label in ((by_faces, "faces"), (by_pixels, "pixels")):
        axes.set(xscale="log", yscale="log", xlabel=label, ylabel="forward + backward (ms)")
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=7)
    figure.suptitle(f"microDR, RGB, batch 1, one-pixel soft edge, {rows[0]['threads']} threads")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def print_speedups(rows: list[dict]) -> None:
    """How many times faster the kernels are than the reference, case by case (same run)."""
    for row in rows:
        if row["backend"] == "reference":
            continue
        ref = next((r for r in rows if r["case"] == row["case"] and r["backend"] == "reference"
                    and r["threads"] == row["threads"]), None)
        if ref:
            print(f"# {row['case']}: {row['backend']} kernels {ref['forward_backward_ms'] / row['forward_backward_ms']:.0f}x "
                  f"faster than the reference (forward + backward, {row['threads']} threads)")


def print_thread_speedups(rows: list[dict]) -> None:
    """Per case and backend run with several thread counts: how many times faster the most
    threads are than the fewest (forward + backward)."""
    for row in rows:
        runs = [r for r in rows if r["case"] == row["case"] and r["backend"] == row["backend"]]
        fewest, most = min(runs, key=lambda r: r["threads"]), max(runs, key=lambda r: r["threads"])
        if row is most and most is not fewest:
            print(f"# {row['case']}: {row['backend']} {most['threads']} threads "
                  f"{fewest['forward_backward_ms'] / most['forward_backward_ms']:.2f}x faster than {fewest['threads']} "
                  f"(forward + backward)")


def print_backward_items(rows: list[dict]) -> None:
    """The most pixels any backward work item visited, over the cases run."""
    visited = [(r["backward_item_max_pixels"], r["case"]) for r in rows if r["backward_item_max_pixels"] != ""]
    if visited:
        pixels, case = max(visited)
        print(f"# backward: the most pixels any work item visited: {pixels} ({case})")


def print_time_per_pair(rows: list[dict]) -> None:
    """Forward + backward nanoseconds per visited pair, across face counts at a fixed image,
    batch, channel count, sigma rule and thread count: flat means the cost follows the pairs,
    not the faces."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["backend"] == "cpu":
            rule = row["case"].rsplit("_", 1)[1]
            groups.setdefault((row["width"], row["batch"], row["channels"], rule, row["threads"]), []).append(row)
    for (size, batch, channels, rule, threads), members in groups.items():
        if len(members) < 2:
            continue
        per_pair = {r["faces"]: 1e6 * r["forward_backward_ms"] / r["pairs_visited"] for r in members}
        spread = max(per_pair.values()) / min(per_pair.values())
        listed = ", ".join(f"{faces} faces {ns:.1f}" for faces, ns in sorted(per_pair.items()))
        print(f"# ns per pair, {size}px b{batch} c{channels} {rule} {threads} threads: {listed} (max / min {spread:.2f})")


def print_gpu_resources(archs=("sm_80", "sm_90")) -> None:
    """ptxas registers per thread and spill bytes of every kernel, where nvcc exists."""
    if shutil.which("nvcc") is None:
        print("# ptxas: nvcc not found, register counts skipped")
        return
    for arch in archs:
        for kernel, use in resource_usage(arch).items():
            print(f"# ptxas {arch} {kernel}: {use.registers} registers, "
                  f"{use.spill_stores} bytes spill stores, {use.spill_loads} bytes spill loads")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few cases, under 2 minutes")
    parser.add_argument("--csv", type=Path, help="write the table as CSV")
    parser.add_argument("--plot", type=Path, help="write a log-log plot (needs matplotlib: pip install -e '.[bench]')")
    parser.add_argument("--threads", default="2", help="CPU threads (default 2); several, comma-separated: "
                                                        "each case runs with each")
    parser.add_argument("--only", default="", help="run only the cases whose name contains this")
    parser.add_argument("--backends", help="comma-separated: run only these backends (cpu, reference, cuda; "
                                           "default: all that run here)")
    parser.add_argument("--texture", action="store_true",
                        help="run the textured rows (the cow, 1024^2 texture, against per-corner colors) instead")
    parser.add_argument("--reference-max-pairs", type=float,
                        help="run the reference up to this many (pixel, face) pairs (default 2e7 quick, 1e8 full; "
                             "256 x 256 with 5,120 faces is 3.4e8 and takes about 10 minutes)")
    args = parser.parse_args()
    chosen = backends()
    if args.backends:
        wanted = args.backends.split(",")
        missing = sorted(set(wanted) - {backend for backend, _ in chosen})
        if missing:
            parser.error(f"--backends: {', '.join(missing)} cannot run here (see: microdr info)")
        chosen = [(backend, device) for backend, device in chosen if backend in wanted]
    try:
        thread_counts = [int(count) for count in args.threads.split(",")]
    except ValueError:
        parser.error(f"--threads: expected counts separated by commas, got {args.threads!r}")
    if min(thread_counts) < 1:
        parser.error(f"--threads: counts must be at least 1, got {args.threads!r}")
    limit = args.reference_max_pairs or REFERENCE_MAX_PAIRS["quick" if args.quick else "full"]
    budget = 1.0 if args.quick else 3.0
    print_gpu_resources()
    cpu_target()  # compiles the kernels (once per source and flags), so no timing includes the compiler
    rows = []
    print(",".join(COLUMNS), flush=True)
    for threads in thread_counts if args.texture else ():
        torch.set_num_threads(threads)
        texture_case_rows = texture_rows(budget)
        for row in texture_case_rows:
            print(",".join(str(row[c]) for c in COLUMNS), flush=True)
        print_texture_ratios(texture_case_rows)
        rows += texture_case_rows
    for case in (c for c in cases(args.quick) if args.only in c.name and not args.texture):
        for backend, device in chosen:
            pairs = case.batch * case.size**2 * case.faces
            if backend == "reference" and pairs > limit:
                print(f"# {case.name}: reference skipped ({pairs:.2g} pairs > {limit:.2g})", flush=True)
                continue
            for threads in thread_counts:
                torch.set_num_threads(threads)
                row = run_case(case, backend, device, budget)
                rows.append(row)
                print(",".join(str(row[c]) for c in COLUMNS), flush=True)
    print_speedups(rows)
    print_thread_speedups(rows)
    print_backward_items(rows)
    print_time_per_pair(rows)
    if args.csv:
        with open(args.csv, "w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    if args.plot:
        plot([row for row in rows if row["threads"] == max(thread_counts)], args.plot)


if __name__ == "__main__":
    main()
