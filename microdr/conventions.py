"""Coordinate conventions, defined once (see ``docs/MODEL.md``); everything else imports them.

- World space is right-handed with +y up. A camera looks along its -z axis; x is right, y is up.
- View depth ``z = -z_cam`` is positive in front of the camera.
- *Screen units*: the image height spans 2 and the origin is the image center, so a point's
  screen position is ``(a * x_ndc, y_ndc)`` with aspect ``a = W / H``. Squared screen distances,
  and so ``sigma``, are in these units squared. One pixel is ``2 / H`` wide in both directions.
- Pixel ``(row r, column c)`` has row 0 at the top; its center in screen units is
  ``x = (2c + 1 - W) / H``, ``y = (H - 2r - 1) / H`` (MODEL.md's NDC centers times ``(a, 1)``).
- Camera files (``docs/CAMERAS.md``): OpenCV and COLMAP cameras have x right, y down, z forward
  (:data:`OPENCV_AXES`); NeRF's are microDR's (x right, y up, z back). Their pixel coordinates
  ``(u, v)`` run right and down from the image's top-left corner and differ in where a pixel's
  center is (:data:`PIXEL_CENTER`).
- Front faces wind counter-clockwise on screen (x right, y up), i.e. have positive signed area;
  that is what back-face culling keeps.
- Images are tensors ``(B, C, H, W)``, row 0 at the top, channels RGB then alpha.
- Ties, where a derivative is one-sided (MODEL.md lets a backend take either side; these are
  the sides every backend takes): a pixel equidistant from two edges of a face takes the
  lowest-numbered nearest edge (edge k runs from corner k to corner k+1); a pixel exactly on an
  edge's line (``b_k = 0``) gets no gradient through the clipping ``max(b_k, 0)`` (the side
  outside the face). The second holds exactly; the first where the backends' roundings agree
  on which distance is smaller, which float32 and float64 need not.
"""

from __future__ import annotations

import torch

#: Where each camera file format puts the center of the top-left pixel, in its pixel coordinates
#: ``(u, v)`` (right, down): OpenCV at ``(0, 0)`` (pixel ``c``'s center at ``u = c``), COLMAP and
#: NeRF at ``(0.5, 0.5)`` (pixel ``c`` spans ``[c, c + 1]``, the coordinates :func:`to_screen`
#: takes).
PIXEL_CENTER = {"opencv": 0.0, "colmap": 0.5, "nerf": 0.5}

#: OpenCV's (and COLMAP's) camera axes, x right, y down, z forward, in microDR's camera axes
#: (x right, y up, z back): a point's OpenCV camera coordinates are ``OPENCV_AXES @ p_cam``.
OPENCV_AXES = ((1.0, 0.0, 0.0), (0.0, -1.0, 0.0), (0.0, 0.0, -1.0))


def to_screen(
    fx: float, fy: float, cx: float, cy: float, width: int, height: int
) -> tuple[float, float, tuple[float, float]]:
    """Pinhole intrinsics in pixels to screen units: ``(focal, fx_over_fy, principal_point)``.

    ``fx``, ``fy``: focal lengths in pixels; ``(cx, cy)``: the principal point in pixel
    coordinates whose pixel ``c`` spans ``[c, c + 1]`` (a format's own ``cx`` plus
    ``0.5 - PIXEL_CENTER[format]``). A camera-space point ``(x, y)`` at view depth ``z`` lands at
    ``u = fx * x / z + cx``, ``v = cy - fy * y / z``, which in screen units
    (``x_s = (2u - W) / H``, ``y_s = (H - 2v) / H``) is
    ``x_s = focal * fx_over_fy * x / z + px``, ``y_s = focal * y / z + py``: ``focal = 2 fy / H``,
    ``fx_over_fy = fx / fy``, ``(px, py) = ((2 cx - W) / H, (H - 2 cy) / H)``.
    """
    return 2 * fy / height, fx / fy, ((2 * cx - width) / height, (height - 2 * cy) / height)


def to_pixels(
    focal: float, fx_over_fy: float, principal_point: tuple[float, float], width: int, height: int
) -> tuple[float, float, float, float]:
    """The inverse of :func:`to_screen`: ``(fx, fy, cx, cy)`` in pixels, pixel ``c`` spanning
    ``[c, c + 1]``."""
    fy = focal * height / 2
    px, py = principal_point
    return fy * fx_over_fy, fy, (px * height + width) / 2, (height - py * height) / 2


def pixel_centers(height: int, width: int, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """Screen-unit centers of all pixels: ``(H, W, 2)`` holding ``(x, y)``, row 0 at the top."""
    cols = torch.arange(width, dtype=dtype, device=device)
    rows = torch.arange(height, dtype=dtype, device=device)
    x = (2 * cols + 1 - width) / height
    y = (height - 2 * rows - 1) / height
    return torch.stack(torch.broadcast_tensors(x[None, :], y[:, None]), dim=-1)


def signed_area2(v: torch.Tensor) -> torch.Tensor:
    """Twice the signed screen area of triangles ``v`` ``(..., 3, >=2)``; > 0 for front faces."""
    e1 = v[..., 1, :2] - v[..., 0, :2]
    e2 = v[..., 2, :2] - v[..., 0, :2]
    return e1[..., 0] * e2[..., 1] - e1[..., 1] * e2[..., 0]


def look_at_rotation(eye: torch.Tensor, target: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """World-to-camera rotations ``(..., 3, 3)`` of poses ``(..., 3)``: the rows are the camera's
    x, y, z axes in world space. The camera's z axis points from the target to the eye (the
    camera looks along -z)."""
    z_axis = torch.nn.functional.normalize(eye - target, dim=-1)
    x_axis = torch.nn.functional.normalize(torch.linalg.cross(up, z_axis, dim=-1), dim=-1)
    y_axis = torch.linalg.cross(z_axis, x_axis, dim=-1)
    return torch.stack([x_axis, y_axis, z_axis], dim=-2)
