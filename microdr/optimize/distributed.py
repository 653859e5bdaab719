"""Optimization runs on several processes, on torch.distributed: which views a rank renders, the
sum of their gradients in a fixed order, and starting the processes.

The contract (:class:`~microdr.optimize.loop.Optimization` and :func:`~microdr.optimize.loop.optimize`
follow it whenever torch.distributed's default process group is initialized, by the caller):

- Every rank builds the same run (scene, targets, settings, seed); the ranks draw the same views
  each iteration, and rank ``r`` of ``N`` renders and differentiates the ``r``-th of ``N``
  contiguous shares of them (:meth:`Ranks.share`), in view order.
- Each view's gradient (with respect to its world-space corners, its shaded colors, a drawn
  texture's texels and its camera's eye) stays apart, and the views' gradients are summed one after the other in view
  order (:func:`in_view_order`): rank 0 sums its views, passes the sum to rank 1, which adds
  its own, and so on; the last rank sends the total to all. One process sums the same pieces in
  the same order, so the result is the same, bit for bit, for any number of ranks (on the CPU
  backend; CUDA's kernels add with atomics). The regularizers are added on every rank alike.
- Every rank applies the same update; rank 0 alone measures the hard metrics, keeps the frames
  of the progress animation, and writes the outputs, the checkpoints and the lock.

The CPU backend takes ``gloo``, CUDA ``nccl``. Per iteration each rank but the last sends one
vector of :func:`chain_length` numbers of the run's dtype to the next, and the last broadcasts
it.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..errors import InputError, MicroDRError

#: The environment variable with the seconds a rank waits for the others (default
#: :data:`DEFAULT_TIMEOUT`); ``microdr optimize --timeout`` sets it.
TIMEOUT_VARIABLE = "MICRODR_TIMEOUT"
#: How long a rank waits for the others, at the rendezvous and at each iteration's sum, before
#: the run ends: long enough for rank 0's hard metrics and checkpoints between two sums.
DEFAULT_TIMEOUT = 60.0
#: What torchrun sets for each rank (``LOCAL_*`` are optional).
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

T = TypeVar("T")


class PeerLost(MicroDRError):
    """Another rank ended or stopped answering: the run stops at its last good iteration.
    result: set by :func:`microdr.optimize.loop.optimize` on rank 0 to the result of that state."""

    def __init__(self, iteration: int, cause: BaseException | str):
        detail = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        super().__init__(
            f"iteration {iteration + 1}: another rank ended or stopped answering ({detail})"
        )
        self.iteration = iteration
        self.result = None


class FirstRankFailed(MicroDRError):
    """Rank 0 could not start the run (its outdir, lock or checkpoint); it reports why, the
    others end quietly with the same exit code."""


@dataclass(frozen=True)
class Ranks:
    """This process's ``rank`` among ``size`` processes (0 of 1 when not distributed)."""

    rank: int = 0
    size: int = 1

    @property
    def first(self) -> bool:
        return self.rank == 0

    def share(self, count: int) -> slice:
        """This rank's contiguous share of ``count`` items (the shares differ by 1 at most, the
        larger ones last)."""
        return slice(self.rank * count // self.size, (self.rank + 1) * count // self.size)


def current() -> Ranks:
    """The ranks of torch.distributed's default process group, if initialized."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()


def chain_length(faces: int, colors: int, cameras: int, views: int, terms: int, texels: int = 0) -> int:
    """The numbers in the vector each rank passes on per iteration: for ``faces`` faces with
    ``colors`` channels (3, or 0 for silhouettes alone), ``cameras`` free cameras (0 when the
    cameras are fixed), ``views`` views per iteration, ``terms`` image loss terms (each view's
    values, and its soft IoU, PSNR and PSNR inside the silhouette) and ``texels`` RGB texels of a
    drawn texture (0 without one)."""
    return faces * 3 * (3 + colors) + 3 * texels + 3 * cameras + views * (terms + 3)


def in_view_order(buffer: torch.Tensor, add: Callable[[torch.Tensor], None], ranks: Ranks) -> float:
    """Sum every rank's pieces into ``buffer`` (flat, the same shape on every rank, zeros) in rank
    order: rank 0 calls ``add(buffer)``, passes it on to rank 1, which calls its own, and so on;
    the last rank's buffer, the total, is broadcast to all. Returns the seconds spent waiting.
    Raises :class:`RuntimeError` (torch.distributed's) when another rank fails to answer."""
    if ranks.size == 1:
        add(buffer)
        return 0.0
    waited = time.perf_counter()
    if not ranks.first:
        dist.recv(buffer, ranks.rank - 1)
    waited = time.perf_counter() - waited
    add(buffer)
    started = time.perf_counter()
    if ranks.rank < ranks.size - 1:
        dist.send(buffer, ranks.rank + 1)
    dist.broadcast(buffer, ranks.size - 1)
    return waited + time.perf_counter() - started


def from_first(make: Callable[[], T], ranks: Ranks) -> T:
    """``make()`` run on rank 0 alone, its value sent to every rank. A :class:`MicroDRError`
    there is raised on rank 0 and as :class:`FirstRankFailed` on the others."""
    if ranks.size == 1:
        return make()
    box: list[Any] = [None]
    try:
        if ranks.first:
            try:
                box[0] = ("value", make())
            except MicroDRError as error:
                box[0] = ("error", str(error))
                dist.broadcast_object_list(box, 0)
                raise
        dist.broadcast_object_list(box, 0)
    except RuntimeError as error:
        raise PeerLost(-1, error) from None
    kind, value = box[0]
    if kind == "error":
        raise FirstRankFailed(f"rank 0 could not start: {value}")
    return value


def gather(value: T, ranks: Ranks) -> list[T]:
    """Every rank's ``value``, in rank order (picklable values)."""
    if ranks.size == 1:
        return [value]
    values: list[Any] = [None] * ranks.size
    dist.all_gather_object(values, value)
    return values


# ---------------------------------------------------------------------------------------------
# Starting the process group


def timeout(value: float | None = None, source: str = "timeout") -> float:
    """The seconds to wait for other ranks: ``value`` (``source`` names it in errors), else
    :data:`TIMEOUT_VARIABLE`, else :data:`DEFAULT_TIMEOUT`."""
    if value is None:
        source = TIMEOUT_VARIABLE
        text = os.environ.get(TIMEOUT_VARIABLE)
        if text is None:
            return DEFAULT_TIMEOUT
        try:
            value = float(text)
        except ValueError:
            raise InputError(source, "", f"expected seconds, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise InputError(source, "", f"expected seconds > 0, got {value}")
    return value


def launched() -> bool:
    """Whether this process was started as a rank (torchrun, ``--workers``): ``WORLD_SIZE`` is
    set."""
    return "WORLD_SIZE" in os.environ


def start(device: torch.device, seconds: float) -> Ranks:
    """Join the process group that the launch variables (:data:`LAUNCH_VARIABLES`) describe:
    ``nccl`` for a CUDA device (this rank's ``LOCAL_RANK``-th GPU), else ``gloo``. Missing or
    bad variables, or no rendezvous within ``seconds``, are an :class:`InputError`."""
    missing = [name for name in LAUNCH_VARIABLES if name not in os.environ]
    if missing:
        raise InputError(
            "environment", "", f"WORLD_SIZE is set but {', '.join(missing)} not: launch with "
            "torchrun (or with --workers N), which sets them all",
        )  # fmt: skip
    numbers = {}
    for name in ("RANK", "WORLD_SIZE", "MASTER_PORT"):
        text = os.environ[name]
        if not text.isdigit():
            raise InputError("environment", name, f"expected a whole number, got {text!r}")
        numbers[name] = int(text)
    if not numbers["RANK"] < numbers["WORLD_SIZE"]:
        raise InputError("environment", "RANK", f"expected < WORLD_SIZE, got {numbers['RANK']}")
    backend = _backend(device)
    address = f"{os.environ['MASTER_ADDR']}:{numbers['MASTER_PORT']}"
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=seconds))
    except (RuntimeError, ValueError) as error:
        raise InputError(
            "environment", "", f"no rendezvous of {numbers['WORLD_SIZE']} ranks at {address} "
            f"within {seconds:g} s ({str(error).strip().splitlines()[0]})",
        ) from None  # fmt: skip
    return current()


def _backend(device: torch.device) -> str:
    """``nccl`` for a CUDA device (then this rank's GPU is its ``LOCAL_RANK``-th), else
    ``gloo``."""
    if device.type != "cuda":
        return "gloo"
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return "nccl"


def stop() -> None:
    """Leave the process group, if any."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def threads_per_rank() -> int | None:
    """The CPU threads each local rank takes unless ``OMP_NUM_THREADS`` says: the cores it may
    run on shared by ``LOCAL_WORLD_SIZE``; ``None`` when told or not launched."""
    if "OMP_NUM_THREADS" in os.environ or not launched():
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


# ---------------------------------------------------------------------------------------------
# --workers: local ranks


@contextlib.contextmanager
def local_workers(
    count: int, arguments: list[str], seconds: float, device: torch.device
) -> Iterator[list[subprocess.Popen]]:
    """This process as rank 0 of ``count`` on this machine, the others started as
    ``python -m microdr ARGUMENTS`` with the launch variables set (a free loopback port, each
    rank ``1 / count`` of the cores, and GPU ``LOCAL_RANK`` for a CUDA ``device``), and the
    process group joined (``gloo``, or ``nccl`` for CUDA).

    Yields the workers. On leaving, the process group is left and the workers get ``seconds``
    to end on their own (once it is left, their next exchange fails at once), then are killed;
    none outlives this process (on Linux they are killed with it).
    """
    store = dist.TCPStore("127.0.0.1", 0, count, True, datetime.timedelta(seconds=seconds),
                          wait_for_workers=False)  # fmt: skip
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (cores or 1) // count))
    torch.set_num_threads(int(threads))
    common = {
        "WORLD_SIZE": str(count), "LOCAL_WORLD_SIZE": str(count), "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(store.port), "OMP_NUM_THREADS": threads,
        TIMEOUT_VARIABLE: str(seconds),
    }  # fmt: skip
    workers = []
    try:
        for rank in range(1, count):
            env = {**os.environ, **common, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            workers.append(subprocess.Popen(
                [sys.executable, "-m", "microdr", *arguments], env=env, stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            ))  # fmt: skip
        try:
            # The workers' env:// rendezvous keeps its keys under this prefix (torch's own).
            backend = _backend(device)
            dist.init_process_group(
                backend, store=dist.PrefixStore("default_pg", store), rank=0, world_size=count,
                timeout=datetime.timedelta(seconds=seconds),
            )  # fmt: skip
        except RuntimeError as error:
            raise MicroDRError(
                f"--workers: the {count - 1} other ranks did not join within {seconds:g} s "
                f"({str(error).strip().splitlines()[0]})"
            ) from None
        yield workers
    finally:
        stop()
        deadline = time.monotonic() + seconds
        for worker in workers:
            try:
                worker.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()


def _die_with_parent() -> None:
    """In a child, before it runs: the kernel sends it SIGKILL when its parent ends (Linux)."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def worker_failure(workers: list[subprocess.Popen]) -> tuple[int, str] | None:
    """The exit code and a line about the first worker (rank 1, 2, ...) that failed, if one did:
    its own code, or 1 for one ended by a signal. Call once they have ended."""
    for rank, worker in enumerate(workers, start=1):
        code = worker.returncode
        if code is None or code == 0:
            continue
        if code < 0:
            return 1, f"rank {rank} was ended by {signal.Signals(-code).name}"
        return code, f"rank {rank} ended with exit code {code}"
    return None
