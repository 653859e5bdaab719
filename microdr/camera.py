"""Cameras: world points to screen-space points, differentiably.

Conventions (``microdr.conventions``): a look-at camera looks along its -z axis with x right and
y up; view depth ``z = -z_cam``; screen units have the image height spanning 2, so a perspective
camera maps a camera-space point to ``f * (x_cam, y_cam) / z`` with ``f = 1 / tan(fov / 2)`` and an
orthographic camera of half-height ``s`` to ``(x_cam, y_cam) / s``. Both equal MODEL.md's
``(a * x_ndc, y_ndc)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .scene import Camera


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


def look_at_rotation(eye: torch.Tensor, target: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """World-to-camera rotation ``(3, 3)``: its rows are the camera's x, y, z axes in world space.

    The camera's z axis points from the target to the eye (the camera looks along -z).
    """
    z_axis = torch.nn.functional.normalize(eye - target, dim=0)
    x_axis = torch.nn.functional.normalize(torch.linalg.cross(up, z_axis), dim=0)
    y_axis = torch.linalg.cross(z_axis, x_axis)
    return torch.stack([x_axis, y_axis, z_axis])


def world_to_camera(points: torch.Tensor, pose: CameraTensors) -> torch.Tensor:
    """Camera-space coordinates of world points ``(..., 3)``."""
    rotation = look_at_rotation(pose.eye, pose.target, pose.up)
    return (points - pose.eye) @ rotation.T


def camera_to_screen(points_cam: torch.Tensor, camera: Camera) -> torch.Tensor:
    """Screen position and view depth ``(..., 3)`` = ``(x, y, z)`` of camera-space points.

    Perspective division uses ``max(z, near)``: a point nearer than ``near`` makes its faces
    skipped by the rasterizer anyway, and the clamp keeps its (unused) screen position finite so
    that no NaN can reach a gradient.
    """
    depth = -points_cam[..., 2]
    if camera.projection == "perspective":
        focal = 1.0 / math.tan(math.radians(camera.fov) / 2)
        xy = focal * points_cam[..., :2] / depth.clamp(min=camera.near)[..., None]
    else:
        xy = points_cam[..., :2] / camera.half_height
    return torch.cat([xy, depth[..., None]], dim=-1)


def project(points: torch.Tensor, camera: Camera, pose: CameraTensors | None = None) -> torch.Tensor:
    """World points ``(..., 3)`` to screen ``(x, y)`` and view depth ``z``: ``(..., 3)``.

    ``pose`` overrides the camera's eye/target/up (e.g. with tensors that require grad).
    """
    if pose is None:
        pose = CameraTensors.of(camera, dtype=points.dtype, device=points.device)
    return camera_to_screen(world_to_camera(points, pose), camera)
