"""The kernels behind the seam: one autograd Function and the launch code both targets share.

``cuda_src/softras.cu`` defines three kernels per dtype (``softras_{setup,forward,backward}_
{f32,f64}``), each a 1-D grid of independent work items taking one argument block,
:data:`ARGS_DTYPE`. This module fills that block and sizes the grid; a *target* (``cpu.py``:
the source compiled by the host C++ compiler; ``cuda.py``: the same source through PyCUDA) only
compiles the source and launches a named kernel. Nothing here knows which target runs.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from .settings import SoftRasSettings

#: Mirrors ``RasterArgs`` in cuda_src/softras.cu, field by field (C layout: align=True).
ARGS_DTYPE = np.dtype(
    [(name, np.uint64) for name in (
        "face_verts", "face_attrs", "background", "face_boxes", "image", "aux",
        "grad_image", "grad_verts", "grad_attrs",
    )]
    + [("n_items", np.int64)]
    + [(name, np.int32) for name in (
        "batch", "faces", "channels", "height", "width", "perspective", "cull_backfaces",
    )]
    + [(name, np.float64) for name in ("sigma", "gamma", "eps", "distance_cutoff", "near", "far")],
    align=True,
)

#: Threads per block on the GPU, and work items per scheduling chunk on the CPU.
BLOCK = 128

_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


class KernelTarget(Protocol):
    """Compiles ``cuda_src/softras.cu`` for one kind of device and launches its kernels."""

    name: str

    def launch(self, kernel: str, args: np.ndarray, grid: int, block: int) -> None:
        """Runs ``kernel`` over a 1-D grid; ``args`` is a 1-element :data:`ARGS_DTYPE` array.

        Must return only once the kernel's results are visible to the caller's next torch op.
        """


def _pointer(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.data_ptr()


def _args(face_verts, face_attrs, width, height, settings: SoftRasSettings, **buffers) -> np.ndarray:
    batch, faces, _, channels = face_attrs.shape
    args = np.zeros(1, dtype=ARGS_DTYPE)
    args["face_verts"] = _pointer(face_verts)
    args["face_attrs"] = _pointer(face_attrs)
    for name, tensor in buffers.items():
        args[name] = _pointer(tensor)
    args["batch"], args["faces"], args["channels"] = batch, faces, channels
    args["height"], args["width"] = height, width
    args["perspective"], args["cull_backfaces"] = int(settings.perspective), int(settings.cull_backfaces)
    args["sigma"], args["gamma"], args["eps"] = settings.sigma, settings.gamma, settings.eps
    args["distance_cutoff"] = settings.distance_cutoff
    args["near"], args["far"] = settings.near, settings.far
    return args


def _launch(target: KernelTarget, stage: str, dtype: torch.dtype, args: np.ndarray, n_items: int) -> None:
    if n_items == 0:
        return
    args["n_items"] = n_items
    target.launch(f"softras_{stage}_{_SUFFIX[dtype]}", args, grid=-(-n_items // BLOCK), block=BLOCK)


def kernel_forward(target: KernelTarget, face_verts, face_attrs, width, height, settings):
    """Runs setup and forward. Returns ``(image, aux, face_boxes)``; see softras.cu for layouts."""
    batch, faces, _, channels = face_attrs.shape
    background = face_attrs.new_tensor(settings.background_values(channels))
    face_boxes = torch.empty(batch, faces, 4, dtype=torch.int32, device=face_verts.device)
    image = face_attrs.new_empty(batch, channels + 1, height, width)
    aux = face_attrs.new_empty(batch, 3, height, width)
    args = _args(face_verts, face_attrs, width, height, settings,
                 background=background, face_boxes=face_boxes, image=image, aux=aux)
    _launch(target, "setup", face_verts.dtype, args, batch * faces)
    _launch(target, "forward", face_verts.dtype, args, batch * height * width)
    return image, aux, face_boxes


def kernel_backward(target: KernelTarget, face_verts, face_attrs, width, height, settings,
                    image, aux, face_boxes, grad_image):
    """The hand-written backward: ``(dL/dface_verts, dL/dface_attrs)`` from ``dL/dimage``."""
    batch, faces = face_verts.shape[:2]
    grad_verts = torch.empty_like(face_verts)
    grad_attrs = torch.empty_like(face_attrs)
    args = _args(face_verts, face_attrs, width, height, settings, face_boxes=face_boxes, image=image,
                 aux=aux, grad_image=grad_image, grad_verts=grad_verts, grad_attrs=grad_attrs)
    _launch(target, "backward", face_verts.dtype, args, batch * faces)
    return grad_verts, grad_attrs


class SoftRasterize(torch.autograd.Function):
    """``rasterize`` on a kernel target: forward and backward are the kernels of softras.cu."""

    @staticmethod
    def forward(ctx, face_verts, face_attrs, width, height, settings, target):
        face_verts, face_attrs = face_verts.contiguous(), face_attrs.contiguous()
        image, aux, face_boxes = kernel_forward(target, face_verts, face_attrs, width, height, settings)
        ctx.save_for_backward(face_verts, face_attrs, image, aux, face_boxes)
        ctx.config = (width, height, settings, target)
        return image

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_image):
        face_verts, face_attrs, image, aux, face_boxes = ctx.saved_tensors
        width, height, settings, target = ctx.config
        grad_verts, grad_attrs = kernel_backward(
            target, face_verts, face_attrs, width, height, settings, image, aux, face_boxes,
            grad_image.contiguous(),
        )
        return grad_verts, grad_attrs, None, None, None, None
