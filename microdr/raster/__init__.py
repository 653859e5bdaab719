"""The rasterize seam: screen-space triangles and per-corner attributes in, RGBA out.

Everything above this seam (cameras, shading, losses) is plain PyTorch and gets its gradients
from autograd *through* :func:`rasterize`; everything below it is a backend that implements
``docs/MODEL.md`` exactly: the PyTorch reference (autograd) or the hand-written kernels.
"""

from __future__ import annotations

import functools
import logging

import torch

from ..defaults import BACKENDS
from ..errors import MicroDRError
from .kernels import KernelTarget, SoftRasterize
from .reference import rasterize_reference
from .settings import SoftRasSettings

logger = logging.getLogger(__name__)

__all__ = [
    "BACKENDS", "SoftRasSettings", "backend_status", "describe_backend", "preferred_device", "rasterize",
    "resolve_backend",
]


def rasterize(
    face_verts: torch.Tensor,
    face_attrs: torch.Tensor,
    width: int,
    height: int,
    settings: SoftRasSettings = SoftRasSettings(),
    backend: str = "auto",
    texture: torch.Tensor | None = None,
) -> torch.Tensor:
    """Soft-rasterize triangles into an image with ``C`` attribute channels plus alpha.

    Args:
        face_verts: ``(B, F, 3, 3)`` float32/float64, any device. Per face corner: screen ``x``
            (right) and ``y`` (up) in screen units (image height spans 2, origin at the center;
            see ``microdr.conventions``) and view depth ``z`` (positive in front of the camera).
        face_attrs: ``(B, F, 3, C)``, same dtype and device: per-corner attributes (e.g. RGB),
            interpolated perspective-correctly.
        width, height: image size in pixels.
        settings: MODEL.md's constants (sigma, gamma, eps, eps_d, near, far, projection, ...).
        backend: ``"auto"`` or one of :data:`BACKENDS`.
        texture: ``(Ht, Wt, C)`` (``C`` from 1 to 3), same dtype and device, row 0 the image's top,
            shared by the batch: then ``face_attrs`` are ``(B, F, 3, 2)`` texture coordinates
            ``(u, v)`` and each pair's attributes are the texture sampled bilinearly at the
            interpolated coordinates (``microdr.raster.texture``; ``settings.texture_wrap``).

    Returns:
        ``(B, C + 1, H, W)`` in the inputs' dtype and device: the blended attributes ``I`` then
        the silhouette ``A``; row 0 is the top of the image. Differentiable w.r.t. every input.
    """
    _check_inputs(face_verts, face_attrs, width, height, texture)
    backend = resolve_backend(backend, face_verts.device)
    if backend == "reference":
        return rasterize_reference(face_verts, face_attrs, width, height, settings, texture)
    target = _target(backend, face_verts.device)
    if texture is None:
        return SoftRasterize.apply(face_verts, face_attrs, width, height, settings, target)
    return SoftRasterize.apply(face_verts, face_attrs, width, height, settings, target, texture)


def resolve_backend(backend: str, device: torch.device | str | None = None) -> str:
    """The concrete backend (``cpu``, ``cuda`` or ``reference``) that ``backend`` means for
    tensors on ``device`` (default: :func:`preferred_device`); raises :class:`MicroDRError`
    when an explicit choice cannot run."""
    if backend not in BACKENDS:
        raise MicroDRError(f"unknown backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    device = preferred_device(backend) if device is None else torch.device(device)
    if backend == "auto":
        wanted = "cuda" if device.type == "cuda" else "cpu"
        reason = _unavailable(wanted, device)
        if reason is None:
            return wanted
        _warn_of_fallback(wanted, reason)
        return "reference"
    reason = _unavailable(backend, device)
    if reason is not None:
        raise MicroDRError(f'backend "{backend}" is unavailable: {reason}')
    return backend


def describe_backend(backend: str) -> str:
    """A concrete ``backend`` (as :func:`resolve_backend` returns it) in a few words, for the
    line the commands print at start."""
    if backend == "cpu":
        from .cpu import cpu_target
        from .cpu_build import simd_level

        return f"cpu: C++ kernels, {simd_level()}, {cpu_target().lanes} lanes"
    if backend == "cuda":
        return "cuda: CUDA kernels"
    return "reference: PyTorch autograd, slow"


def preferred_device(backend: str) -> torch.device:
    """Where a caller that owns its tensors (a scene render) should put them for ``backend``:
    the GPU for ``cuda``, and for ``auto`` when the CUDA backend works; else the CPU."""
    if backend in ("auto", "cuda"):
        reason = _unavailable("cuda", torch.device("cuda"))
        if reason is None:
            return torch.device("cuda")
        if backend == "cuda":
            raise MicroDRError(f'backend "cuda" is unavailable: {reason}')
    return torch.device("cpu")


def backend_status(device: torch.device | str = "cpu") -> dict[str, str | None]:
    """For each concrete backend: None if it runs on tensors on ``device``, else why not."""
    device = torch.device(device)
    return {name: _unavailable(name, device) for name in ("cpu", "cuda", "reference")}


def _unavailable(backend: str, device: torch.device) -> str | None:
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"it runs on CPU tensors, these are on {device}"
        from .cpu import requested_lanes

        # A bad MICRODR_CPU_LANES raises here: a typo must not fall back to the reference.
        return _cpu_build_error(requested_lanes())
    from .cuda import cuda_unavailable_reason

    if device.type != "cuda":
        return f"it runs on CUDA tensors, these are on {device}"
    return cuda_unavailable_reason()


@functools.cache
def _warn_of_fallback(wanted: str, reason: str) -> None:
    """Say once per process, on stderr, that "auto" runs the reference backend, and why: it is
    about 100x to 200x slower than the CPU kernels (bench.py --quick; the colors demo: 3.7 s an
    iteration against 50 a second), so a run of seconds takes many minutes and looks hung
    without a word."""
    logger.warning(
        "microdr: falling back to the reference backend, about a hundred times slower or more "
        "than the %s kernels: %s", wanted, reason
    )


@functools.cache
def _cpu_build_error(lanes: int | None) -> str | None:
    from .cpu import cpu_target

    try:
        cpu_target(lanes)
    except MicroDRError as error:
        return str(error)
    return None


def _target(backend: str, device: torch.device) -> KernelTarget:
    if backend == "cpu":
        from .cpu import cpu_target

        return cpu_target()
    from .cuda import cuda_target

    return cuda_target(device.index if device.index is not None else torch.cuda.current_device())


def _check_inputs(face_verts: torch.Tensor, face_attrs: torch.Tensor, width: int, height: int,
                  texture: torch.Tensor | None) -> None:
    if face_verts.dim() != 4 or face_verts.shape[2:] != (3, 3):
        raise ValueError(f"face_verts must be (B, F, 3, 3), got {tuple(face_verts.shape)}")
    if face_attrs.dim() != 4 or face_attrs.shape[:3] != face_verts.shape[:3]:
        raise ValueError(f"face_attrs must be (B, F, 3, C) matching face_verts, got {tuple(face_attrs.shape)}")
    if face_verts.dtype != face_attrs.dtype or face_verts.device != face_attrs.device:
        raise ValueError("face_verts and face_attrs must share dtype and device")
    if not face_verts.is_floating_point():
        raise ValueError(f"face_verts must be float32 or float64, got {face_verts.dtype}")
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width} x {height}")
    if texture is None:
        return
    if texture.dim() != 3 or not 1 <= texture.shape[-1] <= 3 or texture.shape[0] < 1 or texture.shape[1] < 1:
        raise ValueError(f"texture must be (Ht, Wt, C) with C from 1 to 3, got {tuple(texture.shape)}")
    if texture.numel() >= 2**31:  # the kernels index it with int
        raise ValueError(f"the texture has {texture.numel()} values, more than 2**31 - 1")
    if face_attrs.shape[-1] != 2:
        raise ValueError(f"with a texture, face_attrs must be (B, F, 3, 2) texture coordinates, got {tuple(face_attrs.shape)}")
    if texture.dtype != face_verts.dtype or texture.device != face_verts.device:
        raise ValueError("the texture must share the faces' dtype and device")
