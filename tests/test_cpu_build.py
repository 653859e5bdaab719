"""The CPU kernel build: compiles, caches by content, survives races and broken cache files."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from microdr.errors import MicroDRError
from microdr.raster import cpu_build

REPO = pathlib.Path(__file__).resolve().parents[1]

PROBE = """
#include <omp.h>
extern "C" int probe_add(int a, int b) { return a + b; }
extern "C" int probe_threads() { return omp_get_max_threads(); }
"""

# For the tests that build; the missing-compiler test runs everywhere.
needs_compiler = pytest.mark.skipif(
    cpu_build.build_info()["compiler"] is None, reason="no C++ compiler (g++/c++/$CXX) found"
)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh cache folder, and a process that has loaded nothing yet."""
    monkeypatch.setenv("MICRODR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_build, "_loaded", {})
    return tmp_path / "cache" / "kernels"


@pytest.fixture
def src(tmp_path):
    """A source folder holding the probe kernel."""
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "probe.cu").write_text(PROBE)
    return folder


@needs_compiler
def test_builds_and_calls(cache, src):
    lib = cpu_build.load_library("probe", src_dir=src)
    assert lib.probe_add(2, 3) == 5
    assert lib.probe_threads() >= 1
    assert cpu_build.cache_path("probe", src_dir=src).parent == cache
    # Nothing is written next to the sources: an installed package may be read-only.
    assert [p.name for p in src.iterdir()] == ["probe.cu"]


@needs_compiler
def test_key_follows_sources_and_cache_is_reused(cache, src, monkeypatch, capfd):
    path = cpu_build.cache_path("probe", src_dir=src)
    cpu_build.load_library("probe", src_dir=src)
    assert "compiling CPU kernels" in capfd.readouterr().err
    built = path.stat().st_mtime_ns

    # A new process (simulated by forgetting what was loaded) reuses the file as is.
    monkeypatch.setattr(cpu_build, "_loaded", {})
    cpu_build.load_library("probe", src_dir=src)
    assert capfd.readouterr().err == ""
    assert path.stat().st_mtime_ns == built

    # Any source in the folder counts, headers included, since any may be #included.
    (src / "extra.h").write_text("// changed\n")
    assert cpu_build.cache_path("probe", src_dir=src) != path
    (src / "probe.cu").write_text(PROBE + "// changed\n")
    assert cpu_build.cache_path("probe", src_dir=src) != path


@needs_compiler
def test_concurrent_processes_share_one_build(cache, src):
    script = (
        "from microdr.raster.cpu_build import load_library; "
        f"print(load_library('probe', src_dir={str(src)!r}).probe_add(20, 22))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen([sys.executable, "-c", script], env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    results = [proc.communicate(timeout=120) + (proc.returncode,) for proc in procs]
    for out, err, code in results:
        assert code == 0, err
        assert out.strip() == "42"
    # The lock makes the second process wait and reuse the first one's library.
    if cpu_build.fcntl is not None:
        assert sum("compiling CPU kernels" in err for _, err, _ in results) == 1
    files = sorted(p.name for p in cache.iterdir())
    libraries = [name for name in files if name.endswith(".so")]
    assert libraries == [cpu_build.cache_path("probe", src_dir=src).name]
    assert all(name in libraries or name.endswith(".lock") for name in files), files


@needs_compiler
# Cut points: empty, inside the ELF header, half (dlopen would die of SIGBUS), one byte short.
@pytest.mark.parametrize("keep", [lambda n: 0, lambda n: 40, lambda n: n // 2, lambda n: n - 1],
                         ids=["empty", "header", "half", "one-short"])
def test_truncated_cache_file_is_rebuilt(cache, src, tmp_path, monkeypatch, capfd, keep):
    # Build into another cache, then plant a cut copy of that library where this cache expects
    # it. (Truncating a library this process already loaded would not do: dlopen reuses it.)
    monkeypatch.setenv("MICRODR_CACHE_DIR", str(tmp_path / "other"))
    good = cpu_build.cache_path("probe", src_dir=src)
    cpu_build.load_library("probe", src_dir=src)
    monkeypatch.setenv("MICRODR_CACHE_DIR", str(cache.parent))
    path = cpu_build.cache_path("probe", src_dir=src)
    path.parent.mkdir(parents=True)
    path.write_bytes(good.read_bytes()[: keep(good.stat().st_size)])
    capfd.readouterr()

    lib = cpu_build.load_library("probe", src_dir=src)
    assert lib.probe_add(1, 1) == 2
    assert "compiling CPU kernels" in capfd.readouterr().err
    assert path.stat().st_size == good.stat().st_size


@needs_compiler
def test_compile_error_names_the_file(cache, src):
    (src / "broken.cu").write_text('extern "C" int broken( { return 0; }\n')
    with pytest.raises(MicroDRError, match=r"broken\.cu"):
        cpu_build.load_library("broken", src_dir=src)
    # The failed build leaves neither a library nor a temp file behind.
    assert not any(p.suffix == ".so" for p in cache.iterdir())


def test_missing_compiler_is_explained(cache, src, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    with pytest.raises(MicroDRError, match="need a C\\+\\+20 compiler"):
        cpu_build.load_library("probe", src_dir=src)
    assert cpu_build.build_info()["compiler"] is None


@needs_compiler
def test_unwritable_cache_is_explained(tmp_path, src, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("MICRODR_CACHE_DIR", str(blocker / "cache"))
    with pytest.raises(MicroDRError, match="MICRODR_CACHE_DIR"):
        cpu_build.load_library("probe", src_dir=src)
