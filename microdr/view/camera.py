"""Cameras: world points to screen-space points, differentiably.

Conventions (``microdr.conventions``): a look-at camera looks along its -z axis with x right and
y up; view depth ``z = -z_cam``; screen units have the image height spanning 2, so a perspective
camera maps a camera-space point to ``f * (x_cam, y_cam) / z`` with ``f = 1 / tan(fov / 2)`` and an
orthographic camera of half-height ``s`` to ``(x_cam, y_cam) / s``. Both equal MODEL.md's
``(a * x_ndc, y_ndc)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..conventions import look_at_rotation
from ..io.scene import Camera


@dataclass(frozen=True)
class CameraTensors:
    """A camera's pose as tensors, so that gradients can flow into it.

    ``eye``, ``target``, ``up``: ``(3,)`` world-space, any float dtype and device.
    """

    eye: torch.Tensor
    target: torch.Tensor
    up: torch.Tensor

    @staticmethod
    def of(camera: Camera, *, dtype=torch.float32, device=None) -> "CameraTensors":
        def t(v):
            return torch.tensor(v, dtype=dtype, device=device)

        return CameraTensors(t(camera.eye), t(camera.target), t(camera.up))


def project_views(
    points: torch.Tensor,
    cameras: Sequence[Camera],
    poses: Sequence[CameraTensors] | None = None,
    *,
    per_camera: bool = False,
) -> torch.Tensor:
    """World points ``(..., 3)`` seen by ``N`` cameras, in one batch: screen ``(x, y)`` and view
    depth ``z``, ``(N, ..., 3)``. With ``per_camera``, points are ``(N, ..., 3)``, one set per
    camera (so that the gradient of each camera's set stays apart).

    ``poses`` override the cameras' eye/target/up (e.g. with tensors that require grad).
    Perspective division uses ``max(z, near)``: a point nearer than ``near`` makes its faces
    skipped by the rasterizer anyway, and the clamp keeps its (unused) screen position finite so
    that no NaN can reach a gradient.
    """
    if poses is None:
        poses = [CameraTensors.of(camera, dtype=points.dtype, device=points.device) for camera in cameras]
    eye, target, up = (torch.stack([getattr(pose, name) for pose in poses]) for name in ("eye", "target", "up"))
    rotation = look_at_rotation(eye, target, up)  # (N, 3, 3)
    shape = points.shape[1:] if per_camera else points.shape
    flat = points.reshape(len(cameras) if per_camera else 1, -1, 3)
    points_cam = (flat - eye[:, None]) @ rotation.transpose(-1, -2)  # (N, P, 3)
    depth = -points_cam[..., 2]

    def camera_values(values):  # (N, 1) or (N, 1, k) on the points' dtype and device
        return torch.tensor(values, dtype=points.dtype, device=points.device)[:, None]

    # Perspective: f * (x, y) / max(z, near), f = 1 / tan(fov / 2); orthographic: (x, y) / s.
    perspective = camera_values([c.projection == "perspective" for c in cameras]).bool()
    focal = camera_values([_focal(c) for c in cameras])
    near = camera_values([c.near for c in cameras])
    scale = torch.where(perspective, focal / depth.clamp(min=near), 1.0 / camera_values([_half_height(c) for c in cameras]))
    # Then x is stretched by fx / fy and the optical axis moved to the principal point: exactly
    # nothing for look-at cameras (a product with 1 and a sum with 0).
    stretch = camera_values([(c.fx_over_fy, 1.0) for c in cameras])  # (N, 1, 2)
    principal = camera_values([c.principal_point for c in cameras])
    screen_xy = points_cam[..., :2] * scale[..., None] * stretch + principal
    screen = torch.cat([screen_xy, depth[..., None]], dim=-1)
    return screen.reshape(len(cameras), *shape)


def _focal(camera: Camera) -> float:
    """``1 / tan(fov / 2)`` of a perspective camera (1 for others: a value never used)."""
    return 1.0 / math.tan(math.radians(camera.fov) / 2) if camera.projection == "perspective" else 1.0


def _half_height(camera: Camera) -> float:
    """An orthographic camera's half-height (1 for others: a value never used)."""
    return camera.half_height if camera.projection == "orthographic" else 1.0


def project(points: torch.Tensor, camera: Camera, pose: CameraTensors | None = None) -> torch.Tensor:
    """World points ``(..., 3)`` to screen ``(x, y)`` and view depth ``z``: ``(..., 3)``; one
    camera of :func:`project_views`."""
    return project_views(points, [camera], None if pose is None else [pose])[0]
