"""The reference soft rasterizer: MODEL.md written out in PyTorch, differentiated by autograd.

This is the oracle every kernel is tested against, so it is written to be read next to MODEL.md,
not to be fast: every (pixel, face) pair is evaluated as a dense ``(1, P, F)`` tensor over a chunk
of ``P`` pixels. The only shortcut is exact: a chunk is a tile of pixels, one batch element at a
time, and sees only the faces whose screen box, grown by the cut-off distance and a pixel, meets
the tile (every other pair is outside and beyond the cut-off: skipped, so it contributes exactly
nothing). Each chunk runs under activation checkpointing, so memory stays bounded by one chunk's
graph however large the image is.

Skipped pairs are masked with ``torch.where``. Inputs to operations that could overflow or divide
by zero are made safe *before* the operation on masked pairs too (the "double where"), because a
``where`` alone would still send ``0 * inf = NaN`` into the gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..conventions import pixel_centers, signed_area2
from .settings import SoftRasSettings
from .texture import sample_bilinear

#: (pixel, face) pairs evaluated at once; bounds the memory of one chunk's graph (~300 MiB in
#: float64, recomputed in the backward).
PAIRS_PER_CHUNK = 1 << 18
#: Chunks are tiles of TILE x TILE pixels (split further when they meet too many faces).
TILE = 8


def rasterize_reference(
    face_verts: torch.Tensor, face_attrs: torch.Tensor, width: int, height: int, settings: SoftRasSettings,
    texture: torch.Tensor | None = None,
) -> torch.Tensor:
    """Soft-rasterize; see :func:`microdr.raster.rasterize` for the tensor contract."""
    batch, faces = face_verts.shape[:2]
    channels = face_attrs.shape[-1] if texture is None else texture.shape[-1]
    centers = pixel_centers(height, width, dtype=face_verts.dtype, device=face_verts.device)
    background = face_attrs.new_tensor(settings.background_values(channels))
    boxes = _reach_boxes(face_verts.detach(), settings, pixel=2.0 / height)  # (B, F, 4)
    inputs = (face_verts, face_attrs) + (() if texture is None else (texture,))
    recorded = torch.is_grad_enabled() and any(tensor.requires_grad for tensor in inputs)

    def shade_chunk(points, verts, attrs, *texture):
        return _shade_pixels(points, verts, attrs, background, settings, *texture)

    images = []
    for b in range(batch):
        outputs, order = [], []
        for rows in torch.arange(height, device=centers.device).split(TILE):
            for cols in torch.arange(width, device=centers.device).split(TILE):
                tile = centers[rows[:, None], cols[None, :]].reshape(-1, 2)
                lo, hi = tile.amin(dim=0), tile.amax(dim=0)
                near = (boxes[b, :, 0] <= hi[0]) & (boxes[b, :, 1] >= lo[0]) & (boxes[b, :, 2] <= hi[1]) & (boxes[b, :, 3] >= lo[1])
                chosen = near.nonzero().flatten()
                verts, attrs = face_verts[b : b + 1, chosen], face_attrs[b : b + 1, chosen]
                pixels = (rows[:, None] * width + cols[None, :]).flatten()
                per_chunk = max(1, PAIRS_PER_CHUNK // max(1, chosen.numel()))
                for points, indices in zip(tile.split(per_chunk), pixels.split(per_chunk)):
                    chunk_inputs = (points, verts, attrs, *inputs[2:])
                    if recorded:
                        outputs.append(_Recomputed.apply(shade_chunk, *chunk_inputs))
                    else:
                        outputs.append(shade_chunk(*chunk_inputs))
                    order.append(indices)
        # Back to row-major pixel order: (1, H*W, C+1).
        images.append(torch.cat(outputs, dim=1)[:, torch.cat(order).argsort()])
    image = torch.cat(images)  # (B, H*W, C+1)
    return image.transpose(1, 2).reshape(batch, channels + 1, height, width)


class _Recomputed(torch.autograd.Function):
    """Activation checkpointing of one chunk, ``shade(points, verts, attrs[, texture])``: the
    forward keeps only the inputs, the backward recomputes the chunk's graph and differentiates
    it (once; no double backward). torch.utils.checkpoint does the same, but its first call
    imports torch._dynamo: seconds on a busy machine, longer than a small gradcheck's reference."""

    @staticmethod
    def forward(ctx, shade, points, *tensors):
        ctx.shade = shade
        ctx.save_for_backward(points, *tensors)
        return shade(points, *tensors)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        points, *tensors = ctx.saved_tensors
        tensors = [tensor.detach().requires_grad_() for tensor in tensors]
        with torch.enable_grad():
            output = ctx.shade(points, *tensors)
        grads = torch.autograd.grad(output, tensors, grad_output, allow_unused=True)
        return None, None, *grads


def _reach_boxes(face_verts: torch.Tensor, settings: SoftRasSettings, pixel: float) -> torch.Tensor:
    """``(B, F, 4)``: each face's screen box ``(x0, x1, y0, y1)`` grown by the distance beyond
    which an outside pair is cut off, ``sqrt(distance_cutoff)``, and by ``pixel`` (one pixel's
    width) so that rounding cannot matter. A pixel center outside it is outside the face and
    farther than the cut-off from it. NaN corners give NaN boxes, which meet no tile (MODEL.md
    skips such faces anyway)."""
    grow = settings.distance_cutoff**0.5 + pixel
    x, y = face_verts[..., 0], face_verts[..., 1]
    return torch.stack([x.amin(-1) - grow, x.amax(-1) + grow, y.amin(-1) - grow, y.amax(-1) + grow], dim=-1)


def coordinate_limit(dtype: torch.dtype) -> float:
    """Faces with a screen coordinate or depth beyond +-this are skipped: ``sqrt(max) / 8``.

    Below it no squared distance, signed area or squared depth can overflow (each is at most
    ~18 limit^2 < max / 3), and twice a face's area stays below ``1 / tiny``, so its reciprocal
    is a normal number (float32: 2.3e18, float64: 1.7e153). Such faces are far outside any
    view unless they are astronomically large.
    """
    return torch.finfo(dtype).max ** 0.5 / 8


def _shade_pixels(
    p: torch.Tensor, face_verts: torch.Tensor, face_attrs: torch.Tensor, c_bg: torch.Tensor, s: SoftRasSettings,
    texture: torch.Tensor | None = None,
) -> torch.Tensor:
    """RGBA ``(B, P, C+1)`` of pixel centers ``p`` ``(P, 2)``. Pair tensors are ``(B, P, F, ...)``.
    With a ``texture``, ``face_attrs`` are per-corner texture coordinates."""
    # Per face: screen corners v (B, 1, F, 3, 2), view depths z (B, 1, F, 3).
    v = face_verts[:, None, :, :, :2]
    z = face_verts[:, None, :, :, 2]

    # Faces skipped whole: zero screen area, a corner nearer than `near`, culled back faces, and
    # faces beyond the coordinate limit (see `coordinate_limit`). An area below the smallest
    # normal number counts as zero, as in the kernels, which flush subnormals to zero.
    area2 = signed_area2(v)  # (B, 1, F)
    finfo = torch.finfo(face_verts.dtype)
    within_limit = (face_verts.abs() <= coordinate_limit(face_verts.dtype)).all(dim=-1).all(dim=-1)[:, None]
    face_ok = (area2.abs() >= finfo.tiny) & (z.min(dim=-1).values >= s.near) & within_limit
    if s.cull_backfaces:
        face_ok = face_ok & (area2 > 0)
    # Skipped faces get a harmless stand-in before any arithmetic: their values are masked out
    # later, but an overflow in them would still reach the gradient as 0 * inf = NaN.
    v = torch.where(face_ok[..., None, None], v, v.new_tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    z = torch.where(face_ok[..., None], z, 1.0)
    orientation = torch.where(area2 > 0, 1.0, -1.0).to(v.dtype)  # sign(area2); no gradient flows through it

    p = p[None, :, None, :]  # (1, P, 1, 2)

    # d_ij: squared distance to the boundary, the minimum over the three edge segments
    # (edge k runs from corner k to corner k+1).
    edge_start = v
    edge = v.roll(-1, dims=-2) - v  # (B, 1, F, 3, 2)
    edge_len2 = (edge * edge).sum(-1)
    to_p = p[..., None, :] - edge_start  # (B, P, F, 3, 2)
    # An edge too short for its squared length to be a normal number is treated as a point
    # (t = 0), as the kernels do once that length is flushed to zero; dividing by it would
    # overflow the gradient.
    long_edge = edge_len2 >= finfo.tiny
    t = torch.where(long_edge, (to_p * edge).sum(-1) / torch.where(long_edge, edge_len2, 1.0), 0.0).clamp(0.0, 1.0)
    r = to_p - t[..., None] * edge
    # At a tie the gradient goes to the first nearest edge (torch.min's index), as in the
    # kernels (microdr.conventions, ties).
    d = (r * r).sum(-1).min(dim=-1).values  # (B, P, F)

    # Barycentrics b_k = E_k / area2, E_k the signed area of the triangle (p, v_k+1, v_k+2).
    # Only the signs of b and the ratios of its positive parts are used, so they are taken from
    # sign(area2) * E_k, never dividing by area2: as a face turns edge-on, area2 -> 0 and the
    # terms of dL/darea2 grow like 1 / area2 and cancel catastrophically, while the clipped
    # barycentrics themselves stay well conditioned.
    u = v.roll(-1, dims=-2) - p[..., None, :]
    w = v.roll(-2, dims=-2) - p[..., None, :]
    e = orientation[..., None] * (u[..., 0] * w[..., 1] - u[..., 1] * w[..., 0])  # |area2| b, (B, P, F, 3)
    # Inside: all b_k >= 0, which implies that p is in the face's bounding box. The box test is
    # not redundant in floating point: for a sliver far from p whose edge lines pass near p, the
    # signs of E_k are rounding noise, and could make p "inside" a face nowhere near it.
    in_box = ((p >= v.amin(dim=-2)) & (p <= v.amax(dim=-2))).all(dim=-1)  # (B, P, F)
    inside = (e >= 0).all(dim=-1) & in_box

    # Clipped barycentrics b~_k = max(b_k, 0) / sum_l max(b_l, 0). The b_k sum to 1, so some
    # b_k > 0; only rounding in E_k (a face tiny or thin next to its distance from p) can leave
    # none, and such a pair is skipped (with stand-in weights of 1/3, so that its masked values
    # stay finite).
    # max(e_k, 0) with no gradient at e_k = 0 (a pixel on an edge's line): the kernels' one-sided
    # derivative there (microdr.conventions, ties); clamp(min=0) would pass the gradient through.
    e_clip = torch.where(e > 0, e, 0.0)
    clip_ok = e_clip.sum(dim=-1) > 0
    e_clip = torch.where(clip_ok[..., None], e_clip, 1.0)
    b_clip = e_clip / e_clip.sum(dim=-1, keepdim=True)

    # delta_ij = +1 inside, -1 outside; D_ij = sigmoid(delta_ij d_ij / sigma).
    x = torch.where(inside, d, -d) / s.sigma
    D = torch.sigmoid(x)

    # Perspective-correct weights w^ and depth z_ij.
    if s.perspective:
        b_over_z = b_clip / z
        w_hat = b_over_z / b_over_z.sum(dim=-1, keepdim=True)
        z_ij = 1.0 / b_over_z.sum(dim=-1)
    else:
        w_hat = b_clip
        z_ij = (b_clip * z).sum(dim=-1)

    # Pairs that count: the face is kept, the pixel is inside or within the cut-off, and the
    # interpolated depth is inside [near, far]. z_ij is a mean of the corner depths, so it lies
    # in [min_k z_k, max_k z_k], and min_k z_k >= near for a drawn face: the near bound always
    # holds. The far bound is tested on z_ij clamped to the corners' range, which changes
    # nothing but rounding: without the clamp a face lying on the far plane (or, through the
    # near bound, on the near plane) would lose pixels at random.
    z_ij_in_range = torch.minimum(torch.maximum(z_ij, z.amin(dim=-1)), z.amax(dim=-1))
    keep = face_ok & clip_ok & (inside | (d <= s.distance_cutoff)) & (z_ij_in_range <= s.far)

    # Attributes C_ij = sum_k w^_k c_k; textured, C_ij = texture(uv_ij) with uv_ij = sum_k w^_k uv_k.
    C = torch.einsum("bpfk,bfkc->bpfc", w_hat, face_attrs)
    if texture is not None:
        C = sample_bilinear(texture, C, s.texture_wrap)
    zhat = (s.far - z_ij) / (s.far - s.near)

    # Silhouette: A = 1 - prod_j (1 - D_ij), the product taken as a sum of log-sigmoids.
    log_transmittance = torch.where(keep, F.logsigmoid(-x), 0.0).sum(dim=-1)
    A = 1.0 - torch.exp(log_transmittance)

    # Color: softmax over depth with a background term, stabilized by m_i = max(eps, max_j zhat_ij).
    # The image does not depend on m_i (it cancels), so it is a constant for autograd.
    eps_column = zhat.new_full((*zhat.shape[:-1], 1), s.eps)
    candidates = torch.cat([torch.where(keep, zhat, -torch.inf), eps_column], dim=-1)
    m = candidates.amax(dim=-1).detach()
    exponent = torch.where(keep, (zhat - m[..., None]) / s.gamma, 0.0)
    w_ij = torch.where(keep, D * torch.exp(exponent), 0.0)
    w_b = torch.exp((s.eps - m) / s.gamma)
    I = (torch.einsum("bpf,bpfc->bpc", w_ij, C) + w_b[..., None] * c_bg) / (w_ij.sum(-1) + w_b)[..., None]
    return torch.cat([I, A[..., None]], dim=-1)
