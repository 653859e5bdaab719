"""Compile the CUDA C kernels with the host C++ compiler and load them with ctypes.

On machines without a GPU the same ``cuda_src/*.cu`` files are built as an ordinary shared
library (``cuda_src/portability.h`` maps the CUDA keywords to host code when ``__CUDACC__`` is
undefined). Builds are cached per user in ``<cache>/kernels/<name>-<sources>-<compiler>.so``:
``<sources>`` hashes the sources, flags (with the macros a caller defines, such as
``MDR_LANES``) and architecture, ``<compiler>`` the compiler and its version, so a stale
library is never loaded and an unchanged one is never rebuilt. Next to each library,
``<stem>.json`` (written after it) records its sha256: a library whose bytes differ (a damaged
disk, a partial copy, another file under its name) is rebuilt, never loaded, since loading it
can kill the process. Without a compiler, a verified library of the same sources
and flags is loaded whatever compiler built it. A failed compile leaves ``<stem>.failed``, so
later runs fail at once with its message instead of compiling again. The source tree is only
read, so an installed (read-only) package works.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import importlib.util
import json
import os
import pathlib
import platform
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Iterator

from microdr.errors import MicroDRError
from microdr.io.files import process_exists

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the atomic rename alone keeps the cache sound
    fcntl = None

# No -ffast-math: the kernels rely on IEEE inf/NaN behaviour. -x c++ because the sources are
# named .cu. The lane loops (MDR_SIMD) only vectorize when the compiler may evaluate both sides
# of a select: -fno-trapping-math lets it compare floats unconditionally (nothing here reads the
# FP exception flags), and -fallow-store-data-races lets it store to a lane's running sums
# unconditionally (they are the work item's own). g++ fuses multiply-adds by default
# (-ffp-contract=fast). -fno-tree-loop-distribute-patterns keeps the zeroing of a work item's
# small lane arrays as vector stores: as memset calls (rep stos) they took a tenth of the
# backward for faces a few pixels wide.
BASE_FLAGS = (
    "-x", "c++", "-O3", "-std=c++20", "-fopenmp-simd", "-pthread", "-shared", "-fPIC", "-fno-math-errno",
    "-fno-trapping-math", "-fallow-store-data-races", "-fno-tree-loop-distribute-patterns", "-Wall",
    "-Werror=return-type",
)
# The highest x86-64 level this CPU has: x86-64-v3 (AVX2, FMA) doubles the SIMD width of the
# baseline (SSE2); x86-64-v4 (AVX-512) adds 16 more vector registers and mask registers, so the
# lane loops (the backward's hold some 20 vectors of pairs' values) spill less: on an AVX-512
# Xeon the float32 backward took 15-23 % less time than with x86-64-v3, the forward 16-40 % less
# (scripts/bench_compare.py, 1 thread).
# Not -march=native: the cache may be shared between machines (NFS homes, containers), and a
# library built for one CPU can crash on another; the level is part of the flags, hence of the
# cache key, so each machine builds and loads a library of a level it has.
X86_64_V3 = {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
X86_64_V4 = X86_64_V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
#: The levels, highest first: (-march value, the CPU flags it needs, its vector instructions in words).
X86_64_LEVELS = (("x86-64-v4", X86_64_V4, "AVX-512 (x86-64-v4)"), ("x86-64-v3", X86_64_V3, "AVX2 + FMA (x86-64-v3)"))


@functools.cache
def flags() -> tuple[str, ...]:
    """The compiler flags: :data:`BASE_FLAGS`, plus ``-march=`` the highest of
    :data:`X86_64_LEVELS` this CPU has."""
    if platform.machine() in ("x86_64", "AMD64"):
        cpu = _cpu_flags()
        for level, needs, _ in X86_64_LEVELS:
            if needs <= cpu:
                return (*BASE_FLAGS, f"-march={level}")
    return BASE_FLAGS


def build_flags(defines: tuple[str, ...] = ()) -> tuple[str, ...]:
    """:func:`flags` plus ``-D<define>`` for each of ``defines`` (``"NAME=VALUE"`` or ``"NAME"``):
    the whole command line but the files, and so part of the cache key."""
    return (*flags(), *(f"-D{define}" for define in defines))


def _cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (empty elsewhere: baseline build)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


NO_COMPILER = "the CPU kernels need a C++20 compiler: install g++ (e.g. apt install g++) or set CXX to one"

# How many lines of the compiler's stderr a build error quotes.
ERROR_LINES = 6
# Compiler output a one-line error message can do without: the echoed source and caret lines
# (`` 12 | x = ;``, ``    |   ^``), warnings and notes. Errors and linker complaints remain.
_NOISE = re.compile(r"^\s*\d*\s*\||\b(warning|note):")

# A temp file older than this is an orphan whoever wrote it: a build takes about a minute.
ORPHAN_SECONDS = 3600
_TEMP_NAME = re.compile(r"\.(?P<name>.+)~(?P<host>[^~]*)~(?P<pid>\d+)~[^~]*")

# Libraries loaded by this process, by path; the path embeds the key, so this memo can never
# hand back a library built from other sources.
_loaded: dict[pathlib.Path, ctypes.CDLL] = {}
# Threads of one process build one at a time, so they don't compile the same library twice.
_build_lock = threading.Lock()


def source_dir() -> pathlib.Path:
    """The folder holding the kernel sources (``*.cu``, ``*.h``).

    Installed, that is the package ``microdr.cuda_src``; in a source checkout that was not
    installed, the top-level ``cuda_src/`` next to the ``microdr`` package.
    """
    # find_spec rather than importlib.resources.files: cuda_src/ may have no __init__.py, and
    # for such a namespace package files() gives a MultiplexedPath, not a directory.
    try:
        spec = importlib.util.find_spec("microdr.cuda_src")
    except ModuleNotFoundError:
        spec = None
    for location in (spec and spec.submodule_search_locations) or ():
        # A zipped install lists a path that is no directory: the compiler needs real files.
        if pathlib.Path(location).is_dir():
            return pathlib.Path(location)
    return pathlib.Path(__file__).resolve().parents[2] / "cuda_src"


def cache_dir() -> pathlib.Path:
    """Where compiled kernels go: ``$MICRODR_CACHE_DIR``, else the user's XDG cache."""
    explicit = os.environ.get("MICRODR_CACHE_DIR")
    if explicit:
        return pathlib.Path(explicit).expanduser() / "kernels"
    # The XDG spec says an empty value counts as unset.
    xdg = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(xdg) / "microdr" / "kernels"


def compiler() -> list[str]:
    """The C++ compiler command: ``$CXX`` (which may carry words, e.g. ``ccache g++``), else
    ``g++``, else ``c++``. Raises :class:`MicroDRError` when none is installed."""
    chosen = os.environ.get("CXX")
    if chosen:
        words = shlex.split(chosen)
        if words and shutil.which(words[0]):
            return words
        # An explicit CXX is honoured, not silently replaced by another compiler.
        raise MicroDRError(f"{NO_COMPILER} (CXX={chosen!r} was not found)")
    for candidate in ("g++", "c++"):
        if shutil.which(candidate):
            return [candidate]
    raise MicroDRError(NO_COMPILER)


@functools.cache
def _compiler_version(command: tuple[str, ...]) -> str:
    """``command --version``: part of the cache key, as another compiler makes another binary."""
    result = subprocess.run([*command, "--version"], capture_output=True, text=True)
    if result.returncode != 0:
        raise MicroDRError(f"{NO_COMPILER} ({shlex.join(command)} --version failed)")
    return result.stdout


def _digest(parts: list[bytes]) -> str:
    """sha256 (hex) of ``parts``, each length-prefixed so two different lists never hash alike."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "little") + part)
    return digest.hexdigest()


def _sources_key(src_dir: pathlib.Path, defines: tuple[str, ...] = ()) -> str:
    """16 hex digits over the sources, the flags (:func:`build_flags`) and the CPU architecture:
    what the binary depends on besides the compiler."""
    # Every source, not only the entry file: any of them may be #included.
    sources = sorted([*src_dir.glob("*.cu"), *src_dir.glob("*.h")], key=lambda p: p.name)
    parts = [part for path in sources for part in (path.name.encode(), path.read_bytes())]
    parts += [" ".join(build_flags(defines)).encode(), platform.machine().encode()]
    return _digest(parts)[:16]


def _compiler_key(command: list[str]) -> str:
    """8 hex digits over the compiler command and its version. The command counts too: words
    in $CXX (``g++ -m32``) change the binary but not ``--version``."""
    return _digest([shlex.join(command).encode(), _compiler_version(tuple(command)).encode()])[:8]


def cache_path(name: str = "softras", *, src_dir: pathlib.Path | None = None,
               defines: tuple[str, ...] = ()) -> pathlib.Path:
    """Where the compiled library for ``<src_dir>/<name>.cu`` (built with ``defines``, see
    :func:`build_flags`) is, or would be once built."""
    src_dir = pathlib.Path(src_dir) if src_dir is not None else source_dir()
    return cache_dir() / f"{name}-{_sources_key(src_dir, defines)}-{_compiler_key(compiler())}.so"


def checksum_path(library: pathlib.Path) -> pathlib.Path:
    """The checksum file of a cached library: ``<stem>.json``."""
    return library.with_suffix(".json")


@dataclass(frozen=True)
class Build:
    """A library in the cache, as its checksum file describes it."""

    path: pathlib.Path
    sha256: str  # of the library's bytes
    compiler: str  # the command that built it, e.g. "g++"
    compiler_version: str  # the first line of its --version
    flags: tuple[str, ...]


@dataclass(frozen=True)
class Loaded:
    """A library this process has loaded: the handle, its build, and whether the build was
    found in the cache (else this process compiled it)."""

    library: ctypes.CDLL
    build: Build
    from_cache: bool


class _Unusable(Exception):
    """A cached library that must not be loaded; the message says why (for a note on stderr)."""


def load(name: str = "softras", *, src_dir: pathlib.Path | None = None, defines: tuple[str, ...] = ()) -> Loaded:
    """Build ``<src_dir>/<name>.cu`` (default: :func:`source_dir`) with the macros ``defines``
    (see :func:`build_flags`) unless cached; load it.

    Compiles at most once per machine and sources: concurrent processes wait on a lock file
    and reuse the first one's result. A cached library is loaded only if its bytes match its
    checksum file; any other (damaged, cut short, replaced) is rebuilt, with a note on stderr.
    """
    src_dir = pathlib.Path(src_dir) if src_dir is not None else source_dir()
    source = src_dir / f"{name}.cu"
    if not source.is_file():
        raise MicroDRError(f"{source}: kernel source not found (is microDR installed completely?)")
    with _build_lock:
        try:
            path = cache_path(name, src_dir=src_dir, defines=defines)
        except MicroDRError as no_compiler:
            # Without a compiler, a library built from these sources and flags by any compiler
            # will do: the key of the compiler is only known by running it.
            path = _built_by_any_compiler(name, src_dir, defines)
            if path is None:
                raise MicroDRError(f"{no_compiler}; no cached build of these kernels to use instead") from None
        if path not in _loaded:
            _loaded[path] = _load_or_build(source, path, defines)
        return _loaded[path]


def _built_by_any_compiler(name: str, src_dir: pathlib.Path, defines: tuple[str, ...]) -> pathlib.Path | None:
    """The newest cached library of ``<src_dir>/<name>.cu`` with the current flags and
    ``defines``, whatever compiler built it, whose bytes match its checksum; None if there is none."""
    candidates = cache_dir().glob(f"{name}-{_sources_key(src_dir, defines)}-*.so")
    for path in sorted(candidates, key=lambda path: path.stat().st_mtime_ns, reverse=True):
        with contextlib.suppress(_Unusable, OSError):
            return _verified(path).path
    return None


def _load_or_build(source: pathlib.Path, path: pathlib.Path, defines: tuple[str, ...]) -> Loaded:
    """Load ``path``; (re)build it from ``source`` with ``defines`` first if it is missing or
    unusable."""
    try:
        return _load_cached(path)
    except _Unusable:
        pass
    _raise_remembered_failure(path)
    _make_writable_folder(path.parent)
    with _file_lock(path.with_suffix(".lock")):
        # Another process may have built it while we waited for the lock.
        try:
            return _load_cached(path)
        except _Unusable as problem:
            _remove_orphaned_temps(path.parent)
            _compile(source, path, None if not path.exists() else str(problem), defines)
        try:
            return Loaded(ctypes.CDLL(str(path)), _verified(path), from_cache=False)
        except (OSError, _Unusable) as error:
            raise MicroDRError(f"{path}: freshly built kernels fail to load: {error}") from None


def failure_path(library: pathlib.Path) -> pathlib.Path:
    """Where a failed build of ``library`` leaves its error message: ``<stem>.failed``."""
    return library.with_suffix(".failed")


def _raise_remembered_failure(path: pathlib.Path) -> None:
    """Raise the error of an earlier build of ``path`` that failed, if there was one: the
    library's name keys the sources, flags and compiler, so compiling again would fail again
    (and would say "compiling" on every run)."""
    try:
        message = failure_path(path).read_text().strip()
    except OSError:
        return
    raise MicroDRError(f"{message} [an earlier run's failure; delete {failure_path(path)} to try again]")


def _load_cached(path: pathlib.Path) -> Loaded:
    """The cached library at ``path``, loaded after checking its bytes; raises
    :class:`_Unusable` when it is missing, damaged or fails to load."""
    build = _verified(path)
    try:
        return Loaded(ctypes.CDLL(str(path)), build, from_cache=True)
    except OSError as error:
        raise _Unusable(f"fails to load ({error})") from None


def _verified(path: pathlib.Path) -> Build:
    """The build at ``path`` if its bytes have the sha256 its checksum file records; raises
    :class:`_Unusable` otherwise. Checked before dlopen because dlopen maps whatever is there:
    overwritten code traps (SIGTRAP), bad relocations fail ld.so's assertions, a file cut short
    dies of SIGBUS, and none of these can be caught."""
    if not path.is_file():
        raise _Unusable("is missing")
    try:
        record = json.loads(checksum_path(path).read_text())
        build = Build(path, record["sha256"], record["compiler"], record["compiler_version"],
                      tuple(record["flags"]))
    except FileNotFoundError:
        raise _Unusable(f"has no checksum file ({checksum_path(path).name})") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise _Unusable(f"has an unreadable checksum file ({checksum_path(path).name})") from None
    if _file_sha256(path) != build.sha256:
        raise _Unusable("does not match its checksum (damaged or replaced)")
    return build


def _file_sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _make_writable_folder(folder: pathlib.Path) -> None:
    """Create the cache folder, or say how to pick another one instead of a raw OSError."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        problem = None if os.access(folder, os.W_OK) else "not writable"
    except OSError as error:
        problem = error.strerror
    if problem:
        raise MicroDRError(f"{folder}: unusable kernel cache ({problem}): set MICRODR_CACHE_DIR")


@contextlib.contextmanager
def _file_lock(path: pathlib.Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (a no-op where fcntl is missing)."""
    if fcntl is None:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, even on a crash
        yield


def _compile(source: pathlib.Path, path: pathlib.Path, problem: str | None, defines: tuple[str, ...]) -> None:
    """Compile ``source`` with ``defines`` into ``path`` atomically (readers see the old file or
    all of the new), then write its checksum file. ``problem``: what is wrong with the library
    there, if any."""
    command = compiler()
    if problem is None:
        print(f"microdr: compiling CPU kernels (once; cached in {path.parent})", file=sys.stderr)
    else:
        print(f"microdr: rebuilding CPU kernels: the cached {path} {problem}", file=sys.stderr)
    temp = _temp_file(path)
    try:
        argv = [*command, *build_flags(defines), "-I", str(source.parent), str(source), "-o", temp]
        result = subprocess.run(argv, capture_output=True, text=True)
        if result.returncode != 0:
            message = _compile_error(source, argv, result.stderr)
            # A compiler killed by a signal (out of memory, Ctrl-C) may do better next time.
            if result.returncode > 0:
                _write_atomically(failure_path(path), message.encode())
            raise MicroDRError(message)
        _flush(temp)
        build = Build(path, _file_sha256(pathlib.Path(temp)), shlex.join(command),
                      _compiler_version(tuple(command)).partition("\n")[0], build_flags(defines))
        # mkstemp made it private (0600); a cache folder may be shared between users.
        os.chmod(temp, 0o755)
        os.replace(temp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
    record = {"sha256": build.sha256, "compiler": build.compiler,
              "compiler_version": build.compiler_version, "flags": list(build.flags)}
    _write_atomically(checksum_path(path), json.dumps(record, indent=1).encode())


def _temp_file(path: pathlib.Path) -> str:
    """A new empty file to write ``path`` through: in the same folder, so os.replace is a rename
    on one file system, and named after this host and process (``.<name>~<host>~<pid>~<random>``),
    so that :func:`_remove_orphaned_temps` knows when its writer is gone."""
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}~{_host()}~{os.getpid()}~")
    os.close(handle)
    return temp


def _remove_orphaned_temps(folder: pathlib.Path) -> None:
    """Delete the temp files in ``folder`` whose writer is gone: a process killed while it
    compiled never deletes its temp file, and the compiler it orphaned may write it after. A
    writer is gone when it ran on this host and its pid is dead, or (another host, a reused
    pid, a temp of an older microDR) when the file is older than :data:`ORPHAN_SECONDS`."""
    now = time.time()
    for temp in folder.glob(".*"):
        match = _TEMP_NAME.fullmatch(temp.name)
        if match is None and temp.suffix != ".so":
            continue  # not a temp of ours
        with contextlib.suppress(OSError):  # gone already, or not ours to delete
            dead = match is not None and match["host"] == _host() and not process_exists(int(match["pid"]))
            if dead or now - temp.stat().st_mtime > ORPHAN_SECONDS:
                temp.unlink()


def _host() -> str:
    """This machine's name as it appears in temp file names."""
    return re.sub(r"[^\w.-]", "_", socket.gethostname())


def _flush(path: str) -> None:
    """fsync ``path``: before a rename, or a power cut can leave the final name on a partial file."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _write_atomically(path: pathlib.Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file and a rename, readable by all."""
    temp = _temp_file(path)
    try:
        with open(temp, "wb") as file:
            file.write(data)
        _flush(temp)
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


def _compile_error(source: pathlib.Path, argv: list[str], stderr: str) -> str:
    """A one-line message: the file, the compiler's first complaints, the command."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    # Should the filter leave nothing, noise beats no clue at all.
    useful = [line for line in lines if not _NOISE.search(line)] or lines
    quoted = " | ".join(useful[:ERROR_LINES]) or "no compiler output"
    return f"{source}: compiling the CPU kernels failed: {quoted} (command: {shlex.join(argv)})"


def simd_level() -> str:
    """The vector instructions :func:`flags` let the kernels use, in words."""
    for level, _, words in X86_64_LEVELS:
        if f"-march={level}" in flags():
            return words
    if platform.machine() in ("x86_64", "AMD64"):
        return "SSE2 (x86-64 baseline: this CPU lacks AVX2 or FMA)"
    return f"the {platform.machine() or 'unknown'} baseline"


def build_info() -> dict:
    """What ``microdr info`` reports before loading the kernels: the compiler, its version,
    the flags and the SIMD level. Never raises: without a usable compiler, ``compiler`` is
    None and ``error`` says what to do."""
    info: dict = {"compiler": None, "flags": list(flags()), "simd": simd_level()}
    try:
        command = compiler()
        info["compiler"] = shlex.join(command)
        info["compiler_version"] = _compiler_version(tuple(command)).partition("\n")[0]
    except MicroDRError as error:
        info["error"] = str(error)
    return info
