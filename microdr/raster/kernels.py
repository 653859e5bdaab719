"""The kernels behind the seam: one autograd Function and the launch code both targets share.

``cuda_src/softras.cu`` defines five kernels per dtype (``softras_{setup,bin,forward,backward,
reduce}_{f32,f64}``), and two more for textured renders
(``softras_{backward_textured,texels}_*``),
each a 1-D grid of independent work items taking one argument block,
:data:`ARGS_DTYPE`. This module fills that block and sizes the grid; a *target* (``cpu.py``:
the source compiled by the host C++ compiler; ``cuda.py``: the same source through PyCUDA) only
compiles the source and launches a named kernel. Nothing here knows which target runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from ..errors import MicroDRError
from .settings import SoftRasSettings

#: Mirrors ``RasterArgs`` in cuda_src/softras.cu, field by field (C layout: align=True).
ARGS_DTYPE = np.dtype(
    [(name, np.uint64) for name in (
        "face_verts", "face_attrs", "background", "face_boxes", "face_data", "image", "aux",
        "grad_image", "grad_verts", "grad_attrs",
        "face_tiles", "bin_starts", "bin_keys", "bin_faces", "tile_faces", "tile_ends",
        "face_chunks", "chunk_starts", "chunk_faces", "partial_starts", "partials",
        "texture", "box_starts", "texel_footprints", "texel_values", "chunk_records", "texel_boxes", "texel_tile_chunks",
        "texel_tile_ends", "grad_texture",
    )]
    + [("n_items", np.int64), ("chunks", np.int64)]
    + [(name, np.int32) for name in (
        "batch", "faces", "channels", "height", "width", "perspective", "cull_backfaces",
        "pitch", "tiles_x", "tiles_y", "texture_height", "texture_width", "texture_wrap", "texel_tiles_x",
    )]
    + [(name, np.float64) for name in ("sigma", "gamma", "eps", "distance_cutoff", "near", "far")],
    align=True,
)

#: Values per face in the face_data buffer (FACE_RECORD in softras.cu).
FACE_RECORD = 17
#: Tiles are TILE x TILE pixels (MDR_TILE in softras.cu); image rows are padded to whole tiles.
TILE = 8
#: Threads per block on the GPU, and work items per scheduling chunk on the CPU.
BLOCK = 128
#: The same for the texels kernel, whose items are few and long (a 512 x 512 texture has 64 tiles
#: of texels: in blocks of BLOCK, one CPU thread would take them all).
TEXEL_TILES_PER_BLOCK = 8
#: The most (tile, face) pairs a render may list: each takes 16 bytes (a tile key, its face,
#: and the face again sorted by tile), 4 GiB at the limit. Ordinary renders list far fewer
#: (81,920 faces at 1024 x 1024 with a one-pixel sigma: ~4e5 per view); a sigma so large that
#: every face reaches every tile lists faces x tiles.
MAX_LISTED_PAIRS = 2**28
BYTES_PER_LISTED_PAIR = 16
#: The backward's work items are chunks of at most TILE x TILE pixels of the faces' boxes
#: (softras.cu, chunk_shape): each takes 8 bytes (its face), and each chunk but a face's first
#: also a slot of partial gradients, 9 + 3C values (:func:`partial_bytes`; plus 20 bytes per
#: face: its chunk count and first chunk and slot). A box has at most twice as many chunks as
#: tiles it overlaps; the backward refuses to allocate more than MAX_BACKWARD_BYTES for them
#: (:func:`too_many_chunks`), so a backward has at most 2**29 work items.
BYTES_PER_CHUNK = 8
MAX_BACKWARD_BYTES = 2**32
#: The textured backward writes a texel pair record for each (pixel, face) pair that counts, in
#: room set aside for every pair of the faces' boxes (a chunk packs its records from its first
#: pixel's place in the box on): the pair's footprint in the texture (4 int32 texel rows and
#: columns, 16 bytes) and 2 + C values of the dtype (its bilinear weights and dL/dC_ij): 36 bytes
#: in float32 RGB (56 in float64). At most MAX_TEXEL_PAIRS: 9 GiB in float32 RGB at the limit.
#: Ordinary renders take far fewer: the cow (5,856 faces) filling a 256 x 256 view has 8.3e5
#: pairs in its boxes with the SoftRas sigma (6.2e5 of them count), 30 MB of room. The texels
#: kernel's work items are tiles of TEXEL_TILE x TEXEL_TILE texels; each chunk is listed for each
#: tile its records' footprints touch (4 bytes a listing on the CPU, 16 with
#: list_chunks_per_texel_tile's torch operations: the tile key, the chunk, the chunk again sorted
#: by tile; and 20 bytes per chunk for its record count and box of tiles, 8 per tile).
MAX_TEXEL_PAIRS = 2**28
BYTES_PER_TEXEL_PAIR_BESIDES_VALUES = 16
TEXEL_TILE = 64

_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


class KernelTarget(Protocol):
    """Compiles ``cuda_src/softras.cu`` for one kind of device and launches its kernels."""

    name: str
    #: Adjacent pixels per work item (MDR_LANES): 1 on the GPU, a SIMD width on the CPU.
    lanes: int

    def sort_by_tile(self, bin_keys: torch.Tensor, bin_faces: torch.Tensor, tiles: int) -> "TileBins":
        """What :func:`sort_by_tile` returns, computed on this target."""

    def list_chunks_per_texel_tile(self, texel_boxes: torch.Tensor, tiles_down: int, tiles_across: int) -> "TileBins":
        """What :func:`list_chunks_per_texel_tile` returns, computed on this target."""

    def launch(self, kernel: str, args: np.ndarray, grid: int, block: int) -> None:
        """Runs ``kernel`` over a 1-D grid; ``args`` is a 1-element :data:`ARGS_DTYPE` array.

        Must return only once the kernel's results are visible to the caller's next torch op.
        """


def _pointer(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.data_ptr()


def _args(face_verts, face_attrs, width, height, settings: SoftRasSettings, texture=None, **buffers) -> np.ndarray:
    """The argument block; with a ``(Ht, Wt, C)`` ``texture``, ``face_attrs`` are texture coordinates
    and the image has the texture's ``C`` channels."""
    batch, faces, _, channels = face_attrs.shape
    args = np.zeros(1, dtype=ARGS_DTYPE)
    if texture is not None:
        args["texture"] = _pointer(texture)
        args["texture_height"], args["texture_width"], channels = texture.shape
        args["texture_wrap"] = int(settings.texture_wrap)
    args["face_verts"] = _pointer(face_verts)
    args["face_attrs"] = _pointer(face_attrs)
    for name, tensor in buffers.items():
        args[name] = _pointer(tensor)
    args["batch"], args["faces"], args["channels"] = batch, faces, channels
    args["height"], args["width"] = height, width
    args["tiles_x"], args["tiles_y"] = _tiles(width, height)
    args["pitch"] = _pitch(width)
    args["perspective"], args["cull_backfaces"] = int(settings.perspective), int(settings.cull_backfaces)
    args["sigma"], args["gamma"], args["eps"] = settings.sigma, settings.gamma, settings.eps
    args["distance_cutoff"] = settings.distance_cutoff
    args["near"], args["far"] = settings.near, settings.far
    return args


def _pitch(width: int) -> int:
    """Row stride of the kernels' image buffers: the width rounded up to whole tiles, so that a
    work item's lanes never run off a row."""
    return -(-width // TILE) * TILE


def _tiles(width: int, height: int) -> tuple[int, int]:
    """Tiles across and down an image: its sides rounded up to whole tiles."""
    return -(-width // TILE), -(-height // TILE)


#: The kernels of softras.cu, in launch order; textured renders run TEXTURED_BACKWARD instead
#: of the backward, and TEXTURE_STAGES last.
STAGES = ("setup", "bin", "forward", "backward", "reduce")
TEXTURED_BACKWARD = "backward_textured"
TEXTURE_STAGES = ("texels",)


def work_items(stage: str, batch: int, faces: int, width: int, height: int, lanes: int, chunks: int,
               texel_tiles: int = 0) -> int:
    """The work items of ``stage``'s 1-D grid: one per face for setup, bin and reduce; for
    forward, one per ``lanes`` adjacent pixels of each row of each tile of each image; for
    backward (textured too), one per chunk (``chunks`` in all, see :func:`chunk_layout`); for
    texels, one per tile of texels (``texel_tiles`` of them, see :func:`texel_tiles`)."""
    if stage == "texels":
        return texel_tiles
    if stage in ("backward", TEXTURED_BACKWARD):
        return chunks
    if stage != "forward":
        return batch * faces
    tiles_x, tiles_y = _tiles(width, height)
    return batch * tiles_x * tiles_y * TILE * (TILE // lanes)


def texel_tiles(texture_height: int, texture_width: int) -> tuple[int, int]:
    """Tiles of texels down and across a texture: its sides in :data:`TEXEL_TILE` texels,
    rounded up."""
    return -(-texture_height // TEXEL_TILE), -(-texture_width // TEXEL_TILE)


def launch_size(n_items: int, block: int = BLOCK) -> tuple[int, int]:
    """``(grid, block)`` for ``n_items`` work items: blocks of ``block`` threads, as few as hold
    them all (``n_items > 0``)."""
    return -(-n_items // block), block


def _launch(target: KernelTarget, stage: str, dtype: torch.dtype, args: np.ndarray) -> None:
    """Runs ``stage``'s kernel over its work items (:func:`work_items`, for the sizes in ``args``)."""
    batch, faces, width, height, chunks = (int(args[field][0]) for field in ("batch", "faces", "width", "height", "chunks"))
    tiles_down, tiles_across = texel_tiles(int(args["texture_height"][0]), int(args["texture_width"][0]))
    n_items = work_items(stage, batch, faces, width, height, target.lanes, chunks, tiles_down * tiles_across)
    if n_items == 0:
        return
    args["n_items"] = n_items
    grid, block = launch_size(n_items, TEXEL_TILES_PER_BLOCK if stage == "texels" else BLOCK)
    target.launch(f"softras_{stage}_{_SUFFIX[dtype]}", args, grid=grid, block=block)


@dataclass(frozen=True)
class TileBins:
    """What each tile must visit: ``tile_items[tile_ends[t - 1]:tile_ends[t]]`` are, for the
    image's tiles (:func:`bin_faces`), the faces (indices within their batch element, ascending)
    whose boxes overlap tile ``t`` (``t = b * tiles + row-major tile index``); for the texels'
    tiles (:func:`list_chunks_per_texel_tile`), the backward chunks whose records touch it."""

    tile_items: torch.Tensor  # (pairs,) int32
    tile_ends: torch.Tensor  # (B * tiles,) int64


def bin_faces(target: KernelTarget, args: np.ndarray, face_tiles: torch.Tensor, dtype, batch, tiles) -> TileBins:
    """After setup: the pair list of every face (bin kernel), sorted stably by tile."""
    ends_by_face = torch.cumsum(face_tiles.flatten(), 0, dtype=torch.int64)
    pairs = int(ends_by_face[-1]) if ends_by_face.numel() else 0
    problem = too_many_pairs(pairs)
    if problem:
        raise MicroDRError(problem)
    bin_starts = ends_by_face - face_tiles.flatten()
    bin_keys = torch.empty(pairs, dtype=torch.int64, device=face_tiles.device)
    bin_faces = torch.empty(pairs, dtype=torch.int32, device=face_tiles.device)
    args["bin_starts"], args["bin_keys"], args["bin_faces"] = (_pointer(t) for t in (bin_starts, bin_keys, bin_faces))
    _launch(target, "bin", dtype, args)
    return target.sort_by_tile(bin_keys, bin_faces, batch * tiles)


def too_many_pairs(pairs: int) -> str | None:
    """Why listing ``pairs`` (tile, face) pairs is refused before they are allocated (one line,
    with the memory they would take), or ``None`` if it is not."""
    if pairs <= MAX_LISTED_PAIRS:
        return None
    gib = pairs * BYTES_PER_LISTED_PAIR / 2**30
    return (
        f"the faces' reach (their screen boxes grown by the cut-off distance sqrt(sigma ln(1/eps_d - 1))) "
        f"overlaps {pairs} (tile of {TILE} x {TILE} pixels, face) pairs, more than the limit of 2**28 = "
        f"{MAX_LISTED_PAIRS}; listing them needs {gib:.1f} GiB: lower sigma, the image size or the face count"
    )


def sort_by_tile(bin_keys: torch.Tensor, bin_faces: torch.Tensor, tiles: int) -> TileBins:
    """The bin pairs ``(bin_keys, bin_faces)`` (keys below ``tiles``) sorted by tile key, stably:
    within a tile the faces stay in face order, so the blend order is fixed (the faces listed per
    texel tile are sorted so too). Any target may use this; the CPU target has a faster counting
    sort of its own (``softras_sort_by_tile``)."""
    order = torch.argsort(bin_keys, stable=True)
    tile_ends = torch.cumsum(torch.bincount(bin_keys, minlength=tiles), 0)
    return TileBins(bin_faces[order], tile_ends)


def partial_bytes(channels: int, itemsize: int) -> int:
    """Bytes of one chunk's partial gradients: 9 corner values and 3 per channel."""
    return (9 + 3 * channels) * itemsize


def too_many_chunks(chunks: int, partial_chunks: int, channels: int, itemsize: int) -> str | None:
    """Why the backward refuses ``chunks`` work items, ``partial_chunks`` of them with partial
    gradients of ``channels`` channels of ``itemsize`` bytes (one line, with the memory they
    would take), or ``None`` if it does not."""
    needed = chunks * BYTES_PER_CHUNK + partial_chunks * partial_bytes(channels, itemsize)
    if needed <= MAX_BACKWARD_BYTES:
        return None
    return (
        f"the backward splits the faces' reach into {chunks} chunks of at most {TILE * TILE} pixels, {partial_chunks} "
        f"of them with partial gradients; they need {needed / 2**30:.1f} GiB, more than the limit of "
        f"{MAX_BACKWARD_BYTES / 2**30:.0f} GiB: lower sigma, the image size or the face count"
    )


@dataclass(frozen=True)
class ChunkLayout:
    """Where the backward's work items go (softras.cu's layouts): the first chunk of each face,
    the face of each chunk, and the first partial slot of each face (a slot for each chunk but
    its first)."""

    chunk_starts: torch.Tensor  # (B * F,) int64
    chunk_faces: torch.Tensor  # (chunks,) int64
    partial_starts: torch.Tensor  # (B * F,) int64
    partial_chunks: int  # slots of partial gradients


#: The most pixels of a backward chunk (CHUNK_PIXELS in softras.cu).
CHUNK_PIXELS = TILE * TILE


def chunk_pixels(face_boxes: torch.Tensor) -> torch.Tensor:
    """The pixels of every backward chunk, in the backward's item order (``(chunks,)`` int64),
    from the ``(B, F, 4)`` boxes: softras.cu's chunk_shape, restated for the host's accounting
    (bench.py, gpu_cost_model.py; a test holds the two to the same counts)."""
    rows, cols = (side.flatten() for side in box_sides(face_boxes))
    across = -(-cols // CHUNK_PIXELS)
    width = -(-cols // across.clamp(min=1))
    band = CHUNK_PIXELS // width.clamp(min=1)
    counts = torch.where(rows > 0, across * -(-rows // band), 0)
    face = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    chunk = torch.arange(face.numel()) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    band_rows = (rows[face] - chunk // across[face] * band[face]).clamp(max=band[face])
    piece_cols = (cols[face] - chunk % across[face] * width[face]).clamp(max=width[face])
    return band_rows * piece_cols


def chunk_layout(face_chunks: torch.Tensor) -> ChunkLayout:
    """The backward's chunks from setup's per-face counts ``face_chunks`` (``(B, F)`` int32)."""
    counts = face_chunks.flatten().long()
    chunk_starts = torch.cumsum(counts, 0) - counts
    chunk_faces = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    slots = (counts - 1).clamp(min=0)
    partial_ends = torch.cumsum(slots, 0)
    partial_chunks = int(partial_ends[-1]) if partial_ends.numel() else 0
    return ChunkLayout(chunk_starts, chunk_faces, partial_ends - slots, partial_chunks)


@dataclass(frozen=True)
class ForwardResult:
    """What the forward leaves: the image and what the backward needs (layouts in softras.cu;
    rows are ``pitch`` wide, see :func:`_pitch`)."""

    padded_image: torch.Tensor  # (B, C + 1, H, pitch)
    aux: torch.Tensor  # (B, 3, H, pitch): m_i, W_i, T_i
    face_boxes: torch.Tensor  # (B, F, 4) int32
    face_data: torch.Tensor  # (B, F, FACE_RECORD)
    face_chunks: torch.Tensor  # (B, F) int32: the backward's work items per face
    bins: TileBins

    def pairs_visited(self) -> int:
        """(pixel, face) pairs evaluated by the forward, each face with every pixel of its box;
        the backward evaluates at most as many (it skips the columns of a chunk its face cannot
        reach, softras.cu's reach_columns)."""
        return int(box_pixels(self.face_boxes).sum())

    def most_pixels_per_backward_item(self) -> int:
        """The most pixels one backward work item visits (0 when no face is drawn)."""
        pixels = chunk_pixels(self.face_boxes)
        return int(pixels.max()) if pixels.numel() else 0


def box_sides(face_boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, cols)``, each ``(B, F)`` int64: the sides of each face's box in pixels, not
    below 0 (``face_boxes`` as setup writes them)."""
    boxes = face_boxes.long()
    return (boxes[..., 1] - boxes[..., 0] + 1).clamp(min=0), (boxes[..., 3] - boxes[..., 2] + 1).clamp(min=0)


def box_pixels(face_boxes: torch.Tensor) -> torch.Tensor:
    """``(B, F)`` int64: the pixels of each face's box (``face_boxes`` as setup writes them)."""
    rows, cols = box_sides(face_boxes)
    return rows * cols


def kernel_forward(target: KernelTarget, face_verts, face_attrs, width, height, settings, texture=None) -> ForwardResult:
    """Runs setup, bin and forward on contiguous ``(B, F, 3, 3)`` and ``(B, F, 3, C)`` inputs
    (with a contiguous ``(Ht, Wt, C)`` ``texture``: ``(B, F, 3, 2)`` texture coordinates)."""
    batch, faces = face_attrs.shape[:2]
    channels = face_attrs.shape[-1] if texture is None else texture.shape[-1]
    device = face_verts.device
    background = face_attrs.new_tensor(settings.background_values(channels))
    face_boxes = torch.empty(batch, faces, 4, dtype=torch.int32, device=device)
    face_data = face_attrs.new_empty(batch, faces, FACE_RECORD)
    face_tiles = torch.empty(batch, faces, dtype=torch.int32, device=device)
    face_chunks = torch.empty(batch, faces, dtype=torch.int32, device=device)
    image = face_attrs.new_empty(batch, channels + 1, height, _pitch(width))
    aux = face_attrs.new_empty(batch, 3, height, _pitch(width))
    args = _args(face_verts, face_attrs, width, height, settings, texture, background=background,
                 face_boxes=face_boxes, face_data=face_data, face_tiles=face_tiles, face_chunks=face_chunks,
                 image=image, aux=aux)
    _launch(target, "setup", face_verts.dtype, args)
    tiles = int(args["tiles_x"][0]) * int(args["tiles_y"][0])
    bins = bin_faces(target, args, face_tiles, face_verts.dtype, batch, tiles)
    args["tile_faces"], args["tile_ends"] = _pointer(bins.tile_items), _pointer(bins.tile_ends)
    _launch(target, "forward", face_verts.dtype, args)
    return ForwardResult(image, aux, face_boxes, face_data, face_chunks, bins)


def visible(padded: torch.Tensor, width: int) -> torch.Tensor:
    """The first ``width`` columns of a ``(..., pitch)`` buffer, contiguous."""
    return padded if padded.shape[-1] == width else padded[..., :width].contiguous()


def kernel_backward(target: KernelTarget, face_verts, face_attrs, width, height, settings,
                    padded_image, aux, face_boxes, face_data, face_chunks, grad_image, texture=None):
    """The hand-written backward: ``(dL/dface_verts, dL/dface_attrs, dL/dtexture)`` from
    ``dL/dimage`` (``(B, C + 1, H, W)``; the forward's buffers are the padded ones of
    :class:`ForwardResult`): the backward kernel over the chunks, then the reduce over the faces
    (and, textured, the texels'; ``dL/dtexture`` is ``None`` without a texture). The partial
    gradients hold 9 + 3 A values, A = face_attrs' last side (2 texture coordinates, textured)."""
    layout = chunk_layout(face_chunks)
    chunks = layout.chunk_faces.numel()
    problem = too_many_chunks(chunks, layout.partial_chunks, face_attrs.shape[-1], face_attrs.element_size())
    if problem:
        raise MicroDRError(problem)
    grad_verts = torch.empty_like(face_verts)
    grad_attrs = torch.empty_like(face_attrs)
    partials = face_attrs.new_empty(layout.partial_chunks, 9 + 3 * face_attrs.shape[-1])
    if _pitch(width) != width:
        grad_image = torch.nn.functional.pad(grad_image, (0, _pitch(width) - width))
    args = _args(face_verts, face_attrs, width, height, settings, texture, face_boxes=face_boxes, face_data=face_data,
                 image=padded_image, aux=aux, grad_image=grad_image, grad_verts=grad_verts, grad_attrs=grad_attrs,
                 face_chunks=face_chunks, chunk_starts=layout.chunk_starts, chunk_faces=layout.chunk_faces,
                 partial_starts=layout.partial_starts, partials=partials)
    args["chunks"] = chunks
    if texture is None:
        _launch(target, "backward", face_verts.dtype, args)
        _launch(target, "reduce", face_verts.dtype, args)
        return grad_verts, grad_attrs, None
    records = _texel_pairs(args, face_boxes, chunks, texture)
    _launch(target, TEXTURED_BACKWARD, face_verts.dtype, args)
    _launch(target, "reduce", face_verts.dtype, args)
    return grad_verts, grad_attrs, _reduce_texels(target, args, records, texture)


def _texel_pairs(args: np.ndarray, face_boxes: torch.Tensor, chunks: int, texture: torch.Tensor) -> dict[str, torch.Tensor]:
    """The backward's texel pair records, by their ``args`` field (box_starts, texel_footprints,
    texel_values, chunk_records, texel_boxes), put in ``args`` for the backward to write: room
    for every pair of the faces' boxes; each of the ``chunks`` items then says how many records
    it wrote, and the box of texel tiles they touch."""
    pixels = box_pixels(face_boxes).flatten()
    ends = torch.cumsum(pixels, 0)
    pairs = int(ends[-1]) if ends.numel() else 0
    problem = too_many_texel_pairs(pairs, texture.shape[-1], texture.element_size())
    if problem:
        raise MicroDRError(problem)
    records = {
        "box_starts": ends - pixels,
        "texel_footprints": torch.empty(pairs, 4, dtype=torch.int32, device=texture.device),
        "texel_values": texture.new_empty(pairs, 2 + texture.shape[-1]),
        "chunk_records": torch.empty(chunks, dtype=torch.int32, device=texture.device),
        "texel_boxes": torch.empty(chunks, 4, dtype=torch.int32, device=texture.device),
    }
    for name, tensor in records.items():
        args[name] = _pointer(tensor)
    return records


def _reduce_texels(target: KernelTarget, args: np.ndarray, records: dict[str, torch.Tensor], texture: torch.Tensor) -> torch.Tensor:
    """dL/dtexture ``(Ht, Wt, C)`` from the backward's texel pair ``records`` (held here while the
    kernels read them): the chunks listed per tile of texels in chunk order, from the boxes of
    tiles the backward left (texel_boxes), and the texels kernel over the tiles."""
    tiles_down, tiles_across = texel_tiles(*texture.shape[:2])
    args["texel_tiles_x"] = tiles_across
    listed = target.list_chunks_per_texel_tile(records["texel_boxes"], tiles_down, tiles_across)
    grad_texture = torch.empty_like(texture)
    args["texel_tile_chunks"], args["texel_tile_ends"] = _pointer(listed.tile_items), _pointer(listed.tile_ends)
    args["grad_texture"] = _pointer(grad_texture)
    _launch(target, "texels", texture.dtype, args)
    return grad_texture


def list_chunks_per_texel_tile(texel_boxes: torch.Tensor, tiles_down: int, tiles_across: int) -> TileBins:
    """Each backward chunk listed for each tile of its ``(chunks, 4)`` box of texel tiles (int32,
    as the textured backward writes them), sorted by tile (row-major), in chunk order within a
    tile. Any target may use this; the CPU target lists them in one pass of its own
    (``softras_list_chunks_per_texel_tile``; torch's operations took about a millisecond)."""
    rows, cols = box_sides(texel_boxes)
    counts = rows * cols
    chunks = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    index = torch.arange(chunks.numel(), device=counts.device) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    boxes, across = texel_boxes.long()[chunks], cols[chunks]
    keys = (boxes[:, 0] + index // across) * tiles_across + boxes[:, 2] + index % across
    return sort_by_tile(keys, chunks.int(), tiles_down * tiles_across)


def too_many_texel_pairs(pairs: int, channels: int, value_bytes: int) -> str | None:
    """Why the textured backward refuses ``pairs`` texel pair records before they are allocated
    (one line, with the memory they would take), or ``None`` if it does not."""
    if pairs <= MAX_TEXEL_PAIRS:
        return None
    gib = pairs * (BYTES_PER_TEXEL_PAIR_BESIDES_VALUES + (2 + channels) * value_bytes) / 2**30
    return (
        f"the textured backward needs {pairs} texel pair records (one per (pixel, face) pair of the faces' "
        f"screen boxes), more than the limit of 2**28 = {MAX_TEXEL_PAIRS}; they would take {gib:.1f} GiB: lower "
        f"sigma, the image size or the face count"
    )


class SoftRasterize(torch.autograd.Function):
    """``rasterize`` on a kernel target: forward and backward are the kernels of softras.cu."""

    @staticmethod
    def forward(ctx, face_verts, face_attrs, width, height, settings, target, texture=None):
        face_verts, face_attrs = face_verts.contiguous(), face_attrs.contiguous()
        texture = None if texture is None else texture.contiguous()
        result = kernel_forward(target, face_verts, face_attrs, width, height, settings, texture)
        ctx.save_for_backward(face_verts, face_attrs, result.padded_image, result.aux, result.face_boxes,
                              result.face_data, result.face_chunks, texture)
        ctx.config = (width, height, settings, target)
        return visible(result.padded_image, width)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_image):
        width, height, settings, target = ctx.config
        *saved, texture = ctx.saved_tensors
        grad_verts, grad_attrs, grad_texture = kernel_backward(
            target, *saved[:2], width, height, settings, *saved[2:], grad_image.contiguous(), texture
        )
        # One gradient per input given: apply() without a texture has six.
        return (grad_verts, grad_attrs, None, None, None, None, grad_texture)[: len(ctx.needs_input_grad)]
