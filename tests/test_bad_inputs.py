"""The corpus of bad inputs in ``tests/bad_inputs``, each run through the ``microdr`` command.

Every case must end with exit code 2 and exactly one line on stderr that names the file (or
flag) and the place in it, with no traceback; ``--debug`` must raise the same error with its
traceback instead; and no file may be written, changed or removed.

A case is a folder holding its input files and ``case.json``:

- ``about``: what is wrong;
- ``args``: the command line, run inside a copy of the folder (so paths are relative to it);
- ``where``: how the line starts: the file or flag, then the place (JSON path, OBJ line), if any;
- ``message``: a fragment of the rest of the line.

Commands run in-process through :func:`test_cli.invoke`; one also runs as a real process, which
prints what the user would see.
"""

from __future__ import annotations

import json
import shutil
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_cli import invoke, run_module

from microdr.errors import InputError

CORPUS = Path(__file__).parent / "bad_inputs"
CASES = sorted(path.name for path in CORPUS.iterdir() if path.is_dir())
#: What the corpus must cover, by the prefix of the case names.
CATEGORIES = (
    "json", "type", "missing", "unknown", "image", "camera", "nonfinite", "mesh", "obj", "target",
    "output", "flag",
)  # fmt: skip


@dataclass(frozen=True)
class Case:
    """One case's ``case.json`` and the copy of its folder that it runs in."""

    about: str
    args: list[str]
    where: str
    message: str
    folder: Path


def prepare(name: str, tmp_path: Path) -> Case:
    """Copy case ``name`` into ``tmp_path`` and read its ``case.json``."""
    folder = tmp_path / name
    shutil.copytree(CORPUS / name, folder)
    fields = json.loads((folder / "case.json").read_text(encoding="utf-8"))
    return Case(**fields, folder=folder)


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every folder (``None``) under ``folder``, by relative path."""
    return {
        str(path.relative_to(folder)): None if path.is_dir() else path.read_bytes()
        for path in folder.rglob("*")
    }


def check_line(case: Case, stderr: str) -> str:
    """The one line of ``stderr``, checked against the case: it starts with the case's ``where``
    and holds its ``message``."""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    line = lines[0]
    assert line.startswith(case.where + ": "), line
    assert case.message in line[len(case.where) + 2 :], line
    return line


def test_the_corpus_covers_every_category():
    assert len(CASES) >= 45
    for category in CATEGORIES:
        assert any(name.startswith(category + "_") for name in CASES), category
    assert all(name.split("_")[0] in CATEGORIES for name in CASES)


@pytest.mark.parametrize("name", CASES)
def test_bad_input_gives_one_line_and_exit_code_2(name, tmp_path, monkeypatch):
    case = prepare(name, tmp_path)
    monkeypatch.chdir(case.folder)
    before = snapshot(case.folder)

    result = invoke(*case.args)
    assert result.exit_code == 2, result.output
    line = check_line(case, result.stderr)
    assert result.stdout == ""
    assert "Traceback" not in result.output
    assert snapshot(case.folder) == before

    # --debug: the same error, not caught, so that Python prints its traceback.
    result = invoke("--debug", *case.args)
    assert result.exit_code == 1
    assert isinstance(result.exception, InputError)
    assert str(result.exception) == line
    printed = "".join(traceback.format_exception(*result.exc_info))
    assert printed.startswith("Traceback (most recent call last)")
    assert snapshot(case.folder) == before


def absolute_args(case: Case) -> list[str]:
    """The case's arguments for a process that runs elsewhere: the files of the case, and the
    output (``-o``), as absolute paths."""
    args = case.args
    return [
        str(case.folder / arg) if (case.folder / arg).exists() or args[i - 1 : i] == ["-o"] else arg
        for i, arg in enumerate(args)
    ]


def test_a_real_process_prints_one_line_or_with_debug_a_traceback(tmp_path):
    # A flag value that is not its type: typer's own check, whose report is made one line.
    case = prepare("flag_iterations_not_integer", tmp_path)
    before = snapshot(case.folder)

    result = run_module(*absolute_args(case))
    assert result.returncode == 2, result.stderr
    line = check_line(case, result.stderr)

    result = run_module("--debug", *absolute_args(case))
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.rstrip().splitlines()[-1] == f"microdr.errors.InputError: {line}"
    assert snapshot(case.folder) == before
