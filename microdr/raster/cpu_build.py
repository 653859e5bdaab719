"""Compile the CUDA C kernels with the host C++ compiler and load them with ctypes.

On machines without a GPU the same ``cuda_src/*.cu`` files are built as an ordinary shared
library (``cuda_src/portability.h`` maps the CUDA keywords to host code when ``__CUDACC__`` is
undefined). Builds are cached per user in ``<cache>/kernels/<name>-<key>.so``; the key hashes
everything that can change the binary, so a stale library is never loaded and an unchanged one
is never rebuilt. The source tree is only read, so an installed (read-only) package works.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import importlib.util
import os
import pathlib
import platform
import re
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
from typing import Iterator

from microdr.errors import MicroDRError

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
# x86-64-v3 (AVX2 and FMA) doubles the SIMD width of the baseline (SSE2). Not -march=native:
# the cache may be shared between machines (NFS homes, containers), and a library built for one
# CPU can crash on another; the level is part of the flags, hence of the cache key, so a machine
# without AVX2 builds and loads its own baseline library.
X86_64_V3 = {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}


@functools.cache
def flags() -> tuple[str, ...]:
    """The compiler flags: :data:`BASE_FLAGS`, plus ``-march=x86-64-v3`` where this CPU has it."""
    if platform.machine() in ("x86_64", "AMD64") and X86_64_V3 <= _cpu_flags():
        return (*BASE_FLAGS, "-march=x86-64-v3")
    return BASE_FLAGS


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


NO_COMPILER = "the CPU kernels need a C++20 compiler (g++): set CXX or install g++"

# How many lines of the compiler's stderr a build error quotes.
ERROR_LINES = 6
# Compiler output a one-line error message can do without: the echoed source and caret lines
# (`` 12 | x = ;``, ``    |   ^``), warnings and notes. Errors and linker complaints remain.
_NOISE = re.compile(r"^\s*\d*\s*\||\b(warning|note):")

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


def _cache_key(src_dir: pathlib.Path, command: list[str]) -> str:
    """16 hex digits of sha256 over the sources, the compiler and its version, the flags and
    the CPU architecture."""
    digest = hashlib.sha256()

    def add(part: bytes) -> None:
        # Length-prefixed, so two different sequences of parts never hash alike.
        digest.update(len(part).to_bytes(8, "little") + part)

    # Every source, not only the entry file: any of them may be #included.
    sources = sorted([*src_dir.glob("*.cu"), *src_dir.glob("*.h")], key=lambda p: p.name)
    for path in sources:
        add(path.name.encode())
        add(path.read_bytes())
    # The command too: words in $CXX (``g++ -m32``) change the binary but not ``--version``.
    add(shlex.join(command).encode())
    add(_compiler_version(tuple(command)).encode())
    add(" ".join(flags()).encode())
    add(platform.machine().encode())
    return digest.hexdigest()[:16]


def cache_path(name: str = "softras", *, src_dir: pathlib.Path | None = None) -> pathlib.Path:
    """Where the compiled library for ``<src_dir>/<name>.cu`` is, or would be once built."""
    src_dir = pathlib.Path(src_dir) if src_dir is not None else source_dir()
    return cache_dir() / f"{name}-{_cache_key(src_dir, compiler())}.so"


def load_library(name: str = "softras", *, src_dir: pathlib.Path | None = None) -> ctypes.CDLL:
    """Build ``<src_dir>/<name>.cu`` (default: :func:`source_dir`) unless cached; load it.

    Compiles at most once per machine and sources: concurrent processes wait on a lock file
    and reuse the first one's result. A cached file that fails to load (e.g. truncated by a
    crash) is rebuilt once.
    """
    src_dir = pathlib.Path(src_dir) if src_dir is not None else source_dir()
    source = src_dir / f"{name}.cu"
    if not source.is_file():
        raise MicroDRError(f"{source}: kernel source not found (is microDR installed completely?)")
    with _build_lock:
        path = cache_path(name, src_dir=src_dir)
        if path not in _loaded:
            _loaded[path] = _load_or_build(source, path)
        return _loaded[path]


def _load_or_build(source: pathlib.Path, path: pathlib.Path) -> ctypes.CDLL:
    """Load ``path``; (re)build it from ``source`` first if it is missing or will not load."""
    library = _try_load(path)
    if library is not None:
        return library
    _make_writable_folder(path.parent)
    with _file_lock(path.with_suffix(".lock")):
        # Another process may have built it while we waited for the lock.
        library = _try_load(path)
        if library is None:
            _compile(source, path)
            try:
                library = ctypes.CDLL(str(path))
            except OSError as error:
                raise MicroDRError(f"{path}: freshly built kernels fail to load: {error}") from None
    return library


def _make_writable_folder(folder: pathlib.Path) -> None:
    """Create the cache folder, or say how to pick another one instead of a raw OSError."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        problem = None if os.access(folder, os.W_OK) else "not writable"
    except OSError as error:
        problem = error.strerror
    if problem:
        raise MicroDRError(f"{folder}: unusable kernel cache ({problem}): set MICRODR_CACHE_DIR")


def _try_load(path: pathlib.Path) -> ctypes.CDLL | None:
    """The library at ``path``, or None when it is absent or broken (to be rebuilt)."""
    if not path.exists() or not _elf_is_complete(path):
        return None
    try:
        return ctypes.CDLL(str(path))
    except OSError:
        return None


# Where an ELF header keeps e_shoff, e_shentsize and e_shnum, by class (32 / 64 bit).
_ELF_SECTION_TABLE = {1: (0x20, "I", 0x2E), 2: (0x28, "Q", 0x3A)}


def _elf_is_complete(path: pathlib.Path) -> bool:
    """False for an ELF file cut short; True otherwise (non-ELF files are left to dlopen).

    Needed because dlopen does not reject every truncated library: one whose segments run past
    the end of the file is mapped anyway and kills the process with SIGBUS. Linkers put the
    section header table last, so a file that ends before that table's end is truncated.
    """
    with open(path, "rb") as handle:
        header = handle.read(64)
    if header[:4] != b"\x7fELF":
        return True
    if len(header) < 64 or header[4] not in _ELF_SECTION_TABLE or header[5] not in (1, 2):
        return False
    offset_at, offset_format, sizes_at = _ELF_SECTION_TABLE[header[4]]
    order = "<" if header[5] == 1 else ">"
    (table,) = struct.unpack_from(order + offset_format, header, offset_at)
    entry_size, entries = struct.unpack_from(order + "HH", header, sizes_at)
    return table + entry_size * entries <= path.stat().st_size


@contextlib.contextmanager
def _file_lock(path: pathlib.Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (a no-op where fcntl is missing)."""
    if fcntl is None:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, even on a crash
        yield


def _compile(source: pathlib.Path, path: pathlib.Path) -> None:
    """Compile ``source`` into ``path`` atomically: readers see the old file or all of the new."""
    command = compiler()
    print(f"microdr: compiling CPU kernels (once; cached in {path.parent})", file=sys.stderr)
    # A unique temp name in the same folder, so os.replace is a rename on one file system.
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".so")
    os.close(handle)
    try:
        argv = [*command, *flags(), "-I", str(source.parent), str(source), "-o", temp]
        result = subprocess.run(argv, capture_output=True, text=True)
        if result.returncode != 0:
            raise MicroDRError(_compile_error(source, argv, result.stderr))
        # Flush before renaming, or a power cut can leave the final name on a partial file.
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())
        # mkstemp made it private (0600); a cache folder may be shared between users.
        os.chmod(temp, 0o755)
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


def build_info(name: str = "softras") -> dict:
    """What ``microdr info`` reports: compiler, flags, library path and whether it is built.

    Never raises for a missing compiler; ``compiler`` and ``path`` are then None and
    ``error`` says what to do.
    """
    info: dict = {"compiler": None, "flags": list(flags()), "path": None, "cached": False}
    try:
        command = compiler()
        info["compiler"] = shlex.join(command)
        info["compiler_version"] = _compiler_version(tuple(command)).partition("\n")[0]
        path = cache_path(name)
    except MicroDRError as error:
        info["error"] = str(error)
        return info
    info["path"] = str(path)
    info["cached"] = path.is_file()
    return info
