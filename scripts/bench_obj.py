"""How long reading an OBJ file takes, and how much memory: an icosphere written with
``save_obj`` (the common form, read in bulk) and the same file with a comment after its first
vertex (read line by line), each read in a fresh process.

    python scripts/bench_obj.py [--level 8] [--repeat 2]

Level 8 is 1,310,720 faces (52 MB), level 9 is 5,242,880 (222 MB). Peak is the reading process's
maximum resident set, less that of a process that only imports microDR (torch included).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

READ = """
import resource, sys, time
from microdr.io.mesh import load_obj
start = time.perf_counter()
mesh = load_obj(sys.argv[1])
seconds = time.perf_counter() - start
print(mesh.num_faces, seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
WRITE = """
import sys
from microdr.io.mesh import icosphere, save_obj
save_obj(icosphere(int(sys.argv[1])), sys.argv[2])
"""
IMPORT = """
import resource
import microdr.io.mesh
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def run(code: str, *args: str) -> list[str]:
    command = [sys.executable, "-c", code, *args]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return done.stdout.split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--level", type=int, default=8, help="icosphere subdivisions (20 * 4**level faces)"
    )
    parser.add_argument("--repeat", type=int, default=2, help="reads of each file")
    options = parser.parse_args()

    # Everything runs in child processes: Linux carries a parent's peak resident set over to
    # the children it forks, so a parent that built the mesh would inflate every reading.
    baseline_kb = int(run(IMPORT)[0])
    with tempfile.TemporaryDirectory() as folder:
        common = Path(folder) / "common.obj"
        run(WRITE, str(options.level), str(common))
        text = common.read_text()
        first_vertex = text.index("\nv ") + 1
        end_of_line = text.index("\n", first_vertex)
        line_by_line = Path(folder) / "line_by_line.obj"
        line_by_line.write_text(text[:end_of_line] + " # a comment" + text[end_of_line:])
        print(f"icosphere level {options.level}: {common.stat().st_size / 1e6:.0f} MB")
        for name, path in (("bulk", common), ("line by line", line_by_line)):
            for _ in range(options.repeat):
                faces, seconds, peak_kb = run(READ, str(path))
                print(
                    f"{name}: {int(faces):,} faces in {float(seconds):.2f} s, "
                    f"peak {(int(peak_kb) - baseline_kb) / 1024:.0f} MB above the import's"
                )


if __name__ == "__main__":
    main()
