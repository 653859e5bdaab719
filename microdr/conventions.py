"""Coordinate conventions, defined once (see ``docs/MODEL.md``); everything else imports them.

- World space is right-handed with +y up. A camera looks along its -z axis; x is right, y is up.
- View depth ``z = -z_cam`` is positive in front of the camera.
- *Screen units*: the image height spans 2 and the origin is the image center, so a point's
  screen position is ``(a * x_ndc, y_ndc)`` with aspect ``a = W / H``. Squared screen distances,
  and so ``sigma``, are in these units squared. One pixel is ``2 / H`` wide in both directions.
- Pixel ``(row r, column c)`` has row 0 at the top; its center in screen units is
  ``x = (2c + 1 - W) / H``, ``y = (H - 2r - 1) / H`` (MODEL.md's NDC centers times ``(a, 1)``).
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
