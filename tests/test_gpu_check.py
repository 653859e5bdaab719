"""scripts/gpu_check.py: without a GPU it says so in one line and writes nothing; a report path
it must not write is refused; its steps cover every bundled scene in both dtypes, the bench grid's
cuda rows, the gpu tests and the airplane task; and its step runner and report, run on real
commands that pass, fail, time out or are skipped, say which did what."""

import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
sys.path.insert(0, str(SCRIPT.parent))

import bench  # noqa: E402
import gpu_check  # noqa: E402


def run_script(*args, path=None):
    """The script with PATH limited to the interpreter's folder (no nvidia-smi), so this machine
    looks GPU-less whatever it has."""
    env = dict(os.environ, PATH=path or str(Path(sys.executable).parent))
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_without_a_gpu_one_line_exit_0_and_no_report(tmp_path):
    report = tmp_path / "report.md"
    run = run_script("-o", str(report))
    assert run.returncode == 0, run.stderr
    assert run.stdout == "gpu_check: no NVIDIA GPU here (nvidia-smi not found); nothing to check\n"
    assert run.stderr == ""
    assert not report.exists()


def test_a_report_path_it_must_not_write_is_refused(tmp_path):
    existing = tmp_path / "mine.md"
    existing.write_text("the user's notes\n")
    for path, reason in [(existing, f"-o {existing} exists; not overwritten (--force to replace it)"),
                         (tmp_path, f"-o {tmp_path} is a folder"),
                         (tmp_path / "nowhere" / "r.md", f"-o {tmp_path / 'nowhere' / 'r.md'}: no folder "
                                                         f"{tmp_path / 'nowhere'}")]:
        run = run_script("-o", str(path))
        assert run.returncode == 2
        assert run.stderr == f"gpu_check: {reason}\n"
        assert run.stdout == ""
    assert existing.read_text() == "the user's notes\n"
    # --force lets an existing file through to the next question (here: is there a GPU).
    run = run_script("-o", str(existing), "--force")
    assert run.returncode == 0 and "no NVIDIA GPU here" in run.stdout
    assert existing.read_text() == "the user's notes\n"


def test_steps_cover_every_scene_dtype_bench_row_gpu_test_and_the_airplane(tmp_path):
    listed = gpu_check.steps("PY", tmp_path, tmp_path / "no_data")
    assert len({s.name for s in listed}) == len(listed)
    scenes = [f"scenes/{name}" for name in os.listdir(ROOT / "scenes") if name.endswith(".json")]
    scenes += [f"scenes/tasks/{name}" for name in os.listdir(ROOT / "scenes" / "tasks") if name.endswith(".json")]
    assert len(scenes) >= 11
    checked = set()
    for step in listed:
        if "gradcheck" in step.argv:
            assert step.argv[:3] == ("PY", "-m", "microdr")
            options = dict(zip(step.argv[5::2], step.argv[6::2]))
            assert options["--backend"] == "cuda"
            checked.add((step.argv[4], options["--dtype"]))
    assert checked == set(itertools.product(scenes, ("float32", "float64")))

    rows = set()
    for step in (s for s in listed if "scripts/bench.py" in s.argv):
        assert "--quick" not in step.argv
        options = dict(zip(step.argv[2::2], step.argv[3::2]))
        assert options["--backends"] == "cuda"
        rows |= {case.name for case in bench.cases(quick=False) if options["--only"] in case.name}
    assert rows == {case.name for case in bench.cases(quick=False)}
    assert {"f81920_1024px_b8_silhouette_sigma-1px", "f81920_1024px_b8_rgb_sigma-1px"} <= rows

    gpu_tests = [s for s in listed if "pytest" in s.argv]
    assert len(gpu_tests) == 1 and "-m gpu" in " ".join(gpu_tests[0].argv)
    assert re.search(gpu_tests[0].fails_on, "1 passed, 16 skipped") and not re.search(gpu_tests[0].fails_on,
                                                                                      "17 passed")

    task, fit = (s for s in listed if s.name.startswith("airplane"))
    assert "scripts/softras_airplane.py" in task.argv and "--holdout odd" in " ".join(task.argv)
    assert fit.argv[3] == "optimize" and "--backend cuda" in " ".join(fit.argv) and fit.after == task.name
    assert task.skip == fit.skip == f"no SoftRas data in {tmp_path / 'no_data'} (--data DIR)"
    with_data = tmp_path / "data"
    with_data.mkdir()
    (with_data / "source.npy").write_bytes(b"")
    assert all(s.skip is None for s in gpu_check.steps("PY", tmp_path, with_data))
    # Every step fits the budget on its own, and the sum of what runs is what the budget guards.
    assert all(0 < s.timeout_s < gpu_check.BUDGET_S for s in listed)


def test_runner_and_report_say_what_passed_failed_timed_out_and_was_skipped():
    py = sys.executable
    Step = gpu_check.Step
    listed = [
        Step("says hello", (py, "-c", "print('hello'); print('world')"), 30, show="all"),
        Step("fails", (py, "-c", "import sys; print('first'); print('went wrong', file=sys.stderr); sys.exit(3)"),
             30),
        Step("hangs", (py, "-c", "import time; print('waiting', flush=True); time.sleep(60)"), 1),
        Step("not here", (py, "-c", "raise SystemExit(9)"), 30, skip="no such data"),
        Step("needs fails", (py, "-c", "print('never')"), 30, after="fails"),
        Step("needs hello", (py, "-c", "print('quiet')"), 30, after="says hello"),
        Step("exits 0 but skipped", (py, "-c", "print('3 passed, 2 skipped')"), 30, fails_on=r"\d+ skipped"),
    ]
    seen = []
    outcomes = gpu_check.run_all(listed, 60, seen.append)
    assert [o.step.name for o in seen] == [s.name for s in listed]
    assert [o.status for o in outcomes] == ["pass", "FAIL", "timeout", "skipped", "skipped", "pass",
                                                 "FAIL"]
    assert outcomes[0].output == "hello\nworld\n"
    assert outcomes[1].note == "exit code 3" and "went wrong" in outcomes[1].output
    assert outcomes[2].note == "killed after 1 s" and outcomes[2].seconds >= 1 and outcomes[2].output == "waiting\n"
    assert outcomes[3].note == "no such data"
    assert outcomes[4].note == "'fails' did not pass"
    assert outcomes[6].note == r"the output has '\d+ skipped'"

    text = gpu_check.report([("GPU 0", "Some GPU, 1.0, 80 GiB")], outcomes, 60, "header line")
    assert text.startswith("# microDR GPU check\n\nheader line\n")
    assert "| GPU 0 | Some GPU, 1.0, 80 GiB |" in text
    assert "**2 passed, 2 failed, 1 timed out, 2 skipped**" in text
    table = re.findall(r"^\| ([^|]+) \| (pass|FAIL|timeout|skipped) \| ([0-9.]+) \| (.*) \|$", text, re.M)
    assert [(name, status) for name, status, _, _ in table] == [(o.step.name, o.status) for o in outcomes]
    for (_, _, seconds, note), outcome in zip(table, outcomes):
        assert float(seconds) == pytest.approx(outcome.seconds, abs=0.05) and note == outcome.note
    total = float(re.search(r"in ([0-9.]+) s \(budget 60 s\)", text).group(1))
    assert total == pytest.approx(sum(o.seconds for o in outcomes), abs=0.05)
    # Kept output: all of a passing "all" step, the tail of failures; nothing of quiet passes or skips.
    sections = re.findall(r"^## (.+): (\w+)$", text, re.M)
    assert sections == [("says hello", "pass"), ("fails", "FAIL"), ("hangs", "timeout"),
                        ("exits 0 but skipped", "FAIL")]
    assert "```\nhello\nworld\n```" in text and "went wrong" in text and "waiting" in text
    assert "quiet" not in text and "never" not in text


def test_a_spent_budget_skips_the_rest():
    step = gpu_check.Step("late", (sys.executable, "-c", "print('ran')"), 30)
    (outcome,) = gpu_check.run_all([step], gpu_check.MIN_STEP_S / 2)
    assert outcome.status == "skipped" and outcome.note == f"the {gpu_check.MIN_STEP_S / 2:.0f} s budget is spent"
    assert outcome.output == ""


def test_the_tail_keeps_the_last_lines():
    text = "".join(f"line {i}\n" for i in range(100))
    assert gpu_check.tail(text, 3) == "line 97\nline 98\nline 99"
    assert gpu_check.tail(text).splitlines() == [f"line {i}" for i in range(100 - gpu_check.TAIL_LINES, 100)]
