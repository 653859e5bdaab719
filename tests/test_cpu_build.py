"""The CPU kernel build: compiles, caches by content, survives races and broken cache files."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time

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
    lib = cpu_build.load("probe", src_dir=src).library
    assert lib.probe_add(2, 3) == 5
    assert lib.probe_threads() >= 1
    assert cpu_build.cache_path("probe", src_dir=src).parent == cache
    # Nothing is written next to the sources: an installed package may be read-only.
    assert [p.name for p in src.iterdir()] == ["probe.cu"]


@needs_compiler
def test_key_follows_sources_and_cache_is_reused(cache, src, monkeypatch, capfd):
    path = cpu_build.cache_path("probe", src_dir=src)
    cpu_build.load("probe", src_dir=src)
    assert "compiling CPU kernels" in capfd.readouterr().err
    built = path.stat().st_mtime_ns

    # A new process (simulated by forgetting what was loaded) reuses the file as is.
    monkeypatch.setattr(cpu_build, "_loaded", {})
    cpu_build.load("probe", src_dir=src)
    assert capfd.readouterr().err == ""
    assert path.stat().st_mtime_ns == built

    # Any source in the folder counts, headers included, since any may be #included.
    (src / "extra.h").write_text("// changed\n")
    assert cpu_build.cache_path("probe", src_dir=src) != path
    (src / "probe.cu").write_text(PROBE + "// changed\n")
    assert cpu_build.cache_path("probe", src_dir=src) != path


@needs_compiler
def test_defined_macros_are_part_of_the_key(cache, src):
    # How the GPU's lane shape is built on the host (MDR_LANES=1): one library per value, each
    # compiled with its macro, none loaded in place of another.
    (src / "probe.cu").write_text(PROBE + "#ifndef PROBE_BIAS\n#define PROBE_BIAS 0\n#endif\n"
                                  'extern "C" int probe_bias() { return PROBE_BIAS; }\n')
    builds = {bias: cpu_build.load("probe", src_dir=src, defines=() if bias is None else (f"PROBE_BIAS={bias}",))
              for bias in (None, 1, 7)}
    assert {bias: loaded.library.probe_bias() for bias, loaded in builds.items()} == {None: 0, 1: 1, 7: 7}
    assert len({loaded.build.path for loaded in builds.values()}) == 3
    assert builds[7].build.flags == (*cpu_build.flags(), "-DPROBE_BIAS=7")
    assert builds[7].build.path == cpu_build.cache_path("probe", src_dir=src, defines=("PROBE_BIAS=7",))
    assert builds[None].build.path == cpu_build.cache_path("probe", src_dir=src)


@needs_compiler
def test_concurrent_processes_share_one_build(cache, src):
    script = (
        "from microdr.raster.cpu_build import load; "
        f"print(load('probe', src_dir={str(src)!r}).library.probe_add(20, 22))"
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
    checksums = [cpu_build.checksum_path(cache / name).name for name in libraries]
    assert all(name in libraries + checksums or name.endswith(".lock") for name in files), files


def build_elsewhere(src: pathlib.Path, monkeypatch, folder: pathlib.Path) -> pathlib.Path:
    """Build the probe in the cache ``folder``, then point this process back at an empty
    memo: a library to plant in another cache (damaging a library this process has loaded
    would not do, as dlopen reuses it)."""
    monkeypatch.setenv("MICRODR_CACHE_DIR", str(folder))
    path = cpu_build.load("probe", src_dir=src).build.path
    monkeypatch.setattr(cpu_build, "_loaded", {})
    return path


def plant(cache: pathlib.Path, src: pathlib.Path, monkeypatch, library: bytes, checksum: bytes | None) -> pathlib.Path:
    """``library`` (and ``checksum``, if any, as its checksum file) where ``cache`` expects the probe."""
    monkeypatch.setenv("MICRODR_CACHE_DIR", str(cache.parent))
    path = cpu_build.cache_path("probe", src_dir=src)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(library)
    if checksum is not None:
        cpu_build.checksum_path(path).write_bytes(checksum)
    return path


def overwrite(data: bytes, start: int) -> bytes:
    """int3 (0xCC) from ``start`` to the middle of ``data``; the size stays."""
    return data[:start] + b"\xcc" * (len(data) // 2 - start) + data[len(data) // 2 :]


OTHER_LIBRARY = 'extern "C" int other_function() { return 7; }\n'

# How a cached library goes bad: its bytes (from the good ones), and whether its checksum file stays.
DAMAGES = {
    # Cut points: empty, inside the ELF header, half (dlopen would die of SIGBUS), one byte short.
    "empty": (lambda data, other: b"", True),
    "header": (lambda data, other: data[:40], True),
    "half": (lambda data, other: data[: len(data) // 2], True),
    "one-short": (lambda data, other: data[:-1], True),
    "overwritten": (lambda data, other: overwrite(data, len(data) // 4), True),
    "another library": (lambda data, other: other, True),
    "no checksum file": (lambda data, other: data, False),
}


@needs_compiler
@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_cache_file_is_rebuilt(cache, src, tmp_path, monkeypatch, capfd, damage):
    good = build_elsewhere(src, monkeypatch, tmp_path / "other")
    other_src = tmp_path / "other_src"
    other_src.mkdir()
    (other_src / "other.cu").write_text(OTHER_LIBRARY)
    other = cpu_build.load("other", src_dir=other_src).build.path
    damaged, keep_checksum = DAMAGES[damage]
    checksum = cpu_build.checksum_path(good).read_bytes() if keep_checksum else None
    path = plant(cache, src, monkeypatch, damaged(good.read_bytes(), other.read_bytes()), checksum)
    capfd.readouterr()

    loaded = cpu_build.load("probe", src_dir=src)
    assert loaded.library.probe_add(1, 1) == 2
    assert not loaded.from_cache
    notes = capfd.readouterr().err.splitlines()
    assert len(notes) == 1 and notes[0].startswith(f"microdr: rebuilding CPU kernels: the cached {path} ")
    assert path.read_bytes() == good.read_bytes()
    assert cpu_build.checksum_path(path).read_bytes() == cpu_build.checksum_path(good).read_bytes()


def run_microdr(args: list[str], cache: pathlib.Path, **env: str) -> subprocess.CompletedProcess:
    """``python -m microdr ARGS`` in a fresh process, with ``cache`` as its kernel cache."""
    env = {**os.environ, "MICRODR_CACHE_DIR": str(cache), "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, "-m", "microdr", *args], env=env, capture_output=True, text=True)


@needs_compiler
def test_damaged_cache_file_does_not_kill_commands(tmp_path):
    """The user's view: a library with code overwritten, the right size and its checksum file,
    under the name the commands load; before checksums, every command died of SIGTRAP."""
    assert run_microdr(["info"], tmp_path / "cache").returncode == 0
    (library,) = (tmp_path / "cache" / "kernels").glob("softras-*.so")
    # From 8 KiB, where g++ puts .init and .text: loading it used to die of SIGTRAP.
    library.write_bytes(overwrite(library.read_bytes(), 8192))
    for _ in range(2):  # rebuilt once, then fine
        result = run_microdr(["info"], tmp_path / "cache")
        assert result.returncode == 0, result.stderr
        assert re.search(r"^ +cpu: +ok$", result.stdout, re.MULTILINE), result.stdout
    assert result.stderr == ""


@needs_compiler
def test_a_build_removes_temps_of_writers_that_are_gone(cache, src):
    """A process killed while compiling leaves its temp file (and its orphaned compiler may
    write it after); the next build deletes those whose writer is dead or that are old."""
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid, host = int(finished.stdout), socket.gethostname()
    cache.mkdir(parents=True)
    temps = {
        f".probe-0.so~{host}~{dead_pid}~x1": False,  # this host, writer dead
        f".probe-0.so~{host}~{os.getpid()}~x2": True,  # this host, writer alive
        ".probe-0.so~other-host~1~x3": True,  # another host's, new
        ".probe-0.so~other-host~1~x4": False,  # another host's, old
        ".softras-0123456789abcdef-x5.so": False,  # an older microDR's, old
        "notes.txt": True,  # not a temp
    }
    for name in temps:
        (cache / name).write_text("partial")
    for name in (".probe-0.so~other-host~1~x4", ".softras-0123456789abcdef-x5.so"):
        days_ago = time.time() - 2 * 86400  # past cpu_build.ORPHAN_SECONDS
        os.utime(cache / name, (days_ago, days_ago))

    cpu_build.load("probe", src_dir=src)
    assert {name: (cache / name).exists() for name in temps} == {name: kept for name, kept in temps.items()}
    # The build's own temps are gone too.
    assert not [p.name for p in cache.glob(".*") if p.name not in temps]


@needs_compiler
def test_compile_error_names_the_file_and_is_remembered(cache, src, monkeypatch, capfd):
    (src / "broken.cu").write_text('extern "C" int broken( { return 0; }\n')
    with pytest.raises(MicroDRError, match=r"broken\.cu") as first:
        cpu_build.load("broken", src_dir=src)
    assert "compiling CPU kernels" in capfd.readouterr().err
    # The failed build leaves neither a library nor a temp file behind.
    assert not any(p.suffix == ".so" for p in cache.iterdir())

    # The next run fails alike without compiling again, and says how to retry.
    monkeypatch.setattr(cpu_build, "_loaded", {})
    with pytest.raises(MicroDRError) as again:
        cpu_build.load("broken", src_dir=src)
    assert capfd.readouterr().err == ""
    failed = cpu_build.failure_path(cpu_build.cache_path("broken", src_dir=src))
    assert str(again.value) == f"{first.value} [an earlier run's failure; delete {failed} to try again]"
    failed.unlink()
    with pytest.raises(MicroDRError, match=r"broken\.cu"):
        cpu_build.load("broken", src_dir=src)
    assert "compiling CPU kernels" in capfd.readouterr().err


@needs_compiler
def test_warm_cache_loads_without_a_compiler(cache, src, monkeypatch, capfd):
    built = cpu_build.load("probe", src_dir=src).build
    monkeypatch.setattr(cpu_build, "_loaded", {})
    capfd.readouterr()
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    loaded = cpu_build.load("probe", src_dir=src)
    assert (loaded.library.probe_add(2, 2), loaded.build, loaded.from_cache) == (4, built, True)
    assert capfd.readouterr().err == ""

    # Only a verified library from the same sources will do.
    monkeypatch.setattr(cpu_build, "_loaded", {})
    # A new file renamed over it: cutting the loaded library itself short would crash this
    # process at exit (its pages are mapped).
    cut = built.path.with_name("cut.so")
    cut.write_bytes(built.path.read_bytes()[:-1])
    cut.replace(built.path)
    with pytest.raises(MicroDRError, match="no cached build of these kernels"):
        cpu_build.load("probe", src_dir=src)
    (src / "probe.cu").write_text(PROBE + "// changed\n")
    with pytest.raises(MicroDRError, match="no cached build of these kernels"):
        cpu_build.load("probe", src_dir=src)


def info_rows(stdout: str) -> dict[str, str]:
    """The ``key: value`` rows of ``microdr info``'s CPU kernels section."""
    section = stdout.partition("CPU kernels:\n")[2].partition("backends for")[0]
    pairs = (line.split(":", 1) for line in section.splitlines())
    return {key.strip(): value.strip() for key, value in pairs}


@needs_compiler
def test_info_tells_the_build_in_use(tmp_path):
    first, second = (run_microdr(["info"], tmp_path / "cache") for _ in range(2))
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    built, cached = info_rows(first.stdout), info_rows(second.stdout)
    assert (built["from cache"], cached["from cache"]) == ("no (built now)", "yes")
    library = pathlib.Path(cached["library"])
    assert library.parent == tmp_path / "cache" / "kernels"
    assert cached["sha256"] == hashlib.sha256(library.read_bytes()).hexdigest()
    levels = {f"-march={level}": words for level, _, words in cpu_build.X86_64_LEVELS}
    chosen = [flag for flag in cached["flags"].split() if flag in levels]
    assert cached["simd"] == (levels[chosen[0]] if chosen else cpu_build.simd_level())
    assert len(chosen) <= 1
    assert cached["lanes"] == "8 pixels per work item"  # portability.h's MDR_LANES on CPUs


@needs_compiler
def test_the_command_line_runs_the_gpu_shape_on_request(tmp_path):
    # MICRODR_CPU_LANES=1: the commands' CPU kernels in the GPU's shape, a library of its own.
    cache = cpu_build.cache_dir().parent  # the user's: the libraries may be built already
    native, gpu_shape = (info_rows(run_microdr(["info"], cache, **env).stdout)
                         for env in ({"MICRODR_CPU_LANES": ""}, {"MICRODR_CPU_LANES": "1"}))
    assert (native["lanes"], gpu_shape["lanes"]) == ("8 pixels per work item", "1 pixels per work item")
    assert native["library"] != gpu_shape["library"]
    scene = tmp_path / "scene.json"
    scene.write_text(json.dumps(SCENE))
    result = run_microdr(["render", str(scene), "-o", str(tmp_path / "a.png")], cache, MICRODR_CPU_LANES="1")
    assert result.returncode == 0, result.stderr
    assert "microdr: backend cpu: C++ kernels, " in result.stderr and ", 1 lanes" in result.stderr
    # A bad value is one line and exit code 2, not a silent fall-back to the reference backend.
    result = run_microdr(["render", str(scene), "-o", str(tmp_path / "b.png")], cache, MICRODR_CPU_LANES="16")
    assert result.returncode == 2
    assert result.stderr == ("MICRODR_CPU_LANES='16': expected 1, 2, 4 or 8, the adjacent pixels per CPU work "
                             "item (1 is the GPU's shape), or unset for the native width\n")


SCENE = {
    "image": {"width": 16, "height": 12},
    "meshes": [{"primitive": "cube", "color": [0.9, 0.5, 0.2]}],
    "cameras": [{"orbit": {"distance": 5, "elevation": 25, "azimuth": 35}}],
}


@pytest.mark.parametrize("cxx", ["no-such-compiler-xyz", "false"], ids=["missing", "broken"])
def test_falling_back_to_the_reference_says_why_at_start(tmp_path, cxx):
    """Without a usable compiler, render and optimize start with a line saying why they run
    the reference backend and what to install, then the line naming the backend."""
    scene = tmp_path / "scene.json"
    scene.write_text(json.dumps({**SCENE, "optimize": {"iterations": 1}}))
    image = tmp_path / "target.png"
    runs = [["render", str(scene), "-o", str(image)], ["optimize", str(scene), str(image), "-o", str(tmp_path / "out")]]
    for args in runs:
        result = run_microdr(args, tmp_path / "cache", CXX=cxx)
        assert result.returncode == 0, result.stderr
        assert "backend reference" in result.stdout
        warning, started = result.stderr.splitlines()[:2]
        assert warning.startswith("microdr: falling back to the reference backend, about a hundred times slower or more ")
        assert "install g++ (e.g. apt install g++) or set CXX" in warning
        assert started == "microdr: backend reference: PyTorch autograd, slow"


def test_missing_compiler_is_explained(cache, src, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    with pytest.raises(MicroDRError, match="need a C\\+\\+20 compiler"):
        cpu_build.load("probe", src_dir=src)
    assert cpu_build.build_info()["compiler"] is None


@needs_compiler
def test_unwritable_cache_is_explained(tmp_path, src, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("MICRODR_CACHE_DIR", str(blocker / "cache"))
    with pytest.raises(MicroDRError, match="MICRODR_CACHE_DIR"):
        cpu_build.load("probe", src_dir=src)


@pytest.mark.parametrize("cpu, level", [
    (cpu_build.X86_64_V4 | {"sse2"}, "x86-64-v4"),
    (cpu_build.X86_64_V3 | {"avx512f"}, "x86-64-v3"),  # AVX-512 foundation alone is not the level
    (cpu_build.X86_64_V3 - {"fma"}, None),
])
def test_the_build_takes_the_highest_x86_level_the_cpu_has(monkeypatch, cpu, level):
    monkeypatch.setattr(cpu_build.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu_build, "_cpu_flags", lambda: set(cpu))
    cpu_build.flags.cache_clear()
    try:
        marches = [flag for flag in cpu_build.flags() if flag.startswith("-march=")]
        assert marches == ([f"-march={level}"] if level else [])
        assert cpu_build.simd_level().startswith({"x86-64-v4": "AVX-512", "x86-64-v3": "AVX2", None: "SSE2"}[level])
    finally:
        cpu_build.flags.cache_clear()
