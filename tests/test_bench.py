"""scripts/bench.py runs end to end on its smallest case: the CSV has the documented columns and
consistent values, and the plot is drawn. (Speed is the script's to measure, not a test's.)"""

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["case", "backend", "faces", "width", "height", "batch", "channels", "threads",
           "forward_ms", "forward_backward_ms", "peak_mb", "pairs_visited", "backward_item_max_pixels"]
CASE = "f1280_64px_b1_rgb_sigma-softras"


def test_bench_writes_its_table_and_plot(tmp_path):
    table, figure = tmp_path / "bench.csv", tmp_path / "bench.png"
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--only", CASE, "--threads", "1",
         "--csv", str(table), "--plot", str(figure)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    with open(table, newline="") as stream:
        reader = csv.DictReader(stream)
        assert reader.fieldnames == COLUMNS
        rows = {row["backend"]: row for row in reader}
    assert set(rows) == {"cpu", "reference"}
    for row in rows.values():
        assert row["case"] == CASE
        assert (row["faces"], row["width"], row["height"], row["batch"], row["channels"], row["threads"]) == (
            "1280", "64", "64", "1", "3", "1")
        assert 0 < float(row["forward_ms"]) and 0 < float(row["forward_backward_ms"])
        assert float(row["peak_mb"]) >= 0
    dense = 64 * 64 * 1280
    assert int(rows["reference"]["pairs_visited"]) == dense
    # SoftRas's sigma reaches about a third of a pixel: the tiles cull all but a few percent.
    assert 0 < int(rows["cpu"]["pairs_visited"]) < 0.05 * dense
    # A face's box reaches a third of a pixel past it: boxes of a few pixels, none split.
    assert 0 < int(rows["cpu"]["backward_item_max_pixels"]) < 64 and rows["reference"]["backward_item_max_pixels"] == ""
    assert f"# {CASE}: cpu kernels" in run.stdout
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_refuses_a_backend_that_cannot_run_here():
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--backends", "cpu,nonesuch"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.splitlines()[-1] == "bench.py: error: --backends: nonesuch cannot run here (see: microdr info)"
    assert run.stdout == ""


def test_bench_runs_only_the_backends_asked_for():
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--only", CASE,
                          "--threads", "1", "--backends", "reference"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = [line.split(",") for line in run.stdout.splitlines() if line.startswith(CASE)]
    assert [row[1] for row in rows] == ["reference"]


def test_bench_runs_each_thread_count_and_caps_the_backward_items():
    # Two faces filling a 1024 x 1024 image: each box is the whole image, yet no backward work
    # item visits more than 8 x 8 pixels.
    case = "f2_1024px_b1_rgb_sigma-1px"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--only", case,
                          "--threads", "1,2", "--backends", "cpu"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = [dict(zip(COLUMNS, line.split(","))) for line in run.stdout.splitlines() if line.startswith(case)]
    assert [row["threads"] for row in rows] == ["1", "2"]
    assert all(row["pairs_visited"] == str(2 * 1024 * 1024) for row in rows)
    assert all(row["backward_item_max_pixels"] == "64" for row in rows)
    assert f"# {case}: cpu 2 threads " in run.stdout
    assert f"# backward: the most pixels any work item visited: 64 ({case})" in run.stdout


def test_bench_refuses_a_thread_count_that_is_not_a_number():
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--threads", "1,two"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.splitlines()[-1] == "bench.py: error: --threads: expected counts separated by commas, got '1,two'"
