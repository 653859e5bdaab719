"""microdr.io.files: what reading a user's file refuses, in one line, before it can hang or fill
memory: named pipes, devices, files over a size limit."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

import pytest
from test_cli import invoke, small_scene

from microdr.errors import InputError
from microdr.io.files import file_problem, read_bytes


@contextlib.contextmanager
def fifo_unblocked(path: Path):
    """A named pipe at ``path``; a reader that opens it is sent end-of-file at once, so that code
    which wrongly reads it fails the test instead of blocking it forever."""
    os.mkfifo(path)
    done = threading.Event()

    def feed_end_of_file():
        while not done.wait(0.05):
            try:  # succeeds only while a reader has it open: then closing gives it EOF
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass

    thread = threading.Thread(target=feed_end_of_file, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        done.set()
        thread.join()


def test_a_named_pipe_is_refused_before_it_is_opened(tmp_path):
    with fifo_unblocked(tmp_path / "pipe") as pipe:
        with pytest.raises(InputError) as caught:
            read_bytes(pipe)
        assert str(caught.value) == f"{pipe}: is a named pipe (FIFO), not a file"
        assert file_problem(pipe) == f"{pipe}: is a named pipe (FIFO), not a file"


def test_a_device_is_refused():
    with pytest.raises(InputError, match="^/dev/zero: is a character device, not a file$"):
        read_bytes("/dev/zero")


def test_a_file_over_the_size_limit_is_refused_before_it_is_read(tmp_path):
    (tmp_path / "big").write_bytes(b"x" * 1001)
    assert read_bytes(tmp_path / "big", max_bytes=1001) == b"x" * 1001
    with pytest.raises(InputError) as caught:
        read_bytes(tmp_path / "big", max_bytes=1000)
    message = "1,001 bytes: more than the limit of 1,000 bytes"
    assert str(caught.value) == f"{tmp_path / 'big'}: {message}"


@pytest.mark.parametrize("role", ["scene", "mesh", "target"])
def test_a_named_pipe_given_to_the_command_is_one_line(tmp_path, role):
    pipe = tmp_path / "pipe"
    sections = {"meshes": [{"file": "pipe"}]} if role == "mesh" else {}
    scene = small_scene(tmp_path, **sections)
    commands = {
        "scene": (["render", pipe, "-o", tmp_path / "out.png"], f"{pipe}"),
        "mesh": (["render", scene, "-o", tmp_path / "out.png"], f"{scene}: meshes[0].file: {pipe}"),
        "target": (["optimize", scene, pipe, "-o", tmp_path / "out"], f"{pipe}"),
    }
    args, where = commands[role]
    with fifo_unblocked(pipe):
        result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert result.stderr == f"{where}: is a named pipe (FIFO), not a file\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe", "scene.json"]
