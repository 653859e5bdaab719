"""Scenes to images: transform, project, shade, then soft-rasterize (MODEL.md, in that order).

The pieces are separate so that an optimizer can make any of them a free parameter: the
world-space geometry and albedo (:func:`scene_faces`), the camera poses and the lights
(:func:`render_faces`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from .io.mesh import Texture
from .io.scene import Camera, Lights, RenderSettings, Scene, SceneMesh
from .raster import SoftRasSettings, preferred_device, rasterize
from .view.camera import CameraTensors, project_views
from .view.shading import LightTensors, shade


@dataclass(frozen=True)
class FaceSoup:
    """All meshes of a scene as one triangle soup.

    vertices: ``(V, 3)`` world-space vertices of all meshes, transforms applied.
    faces: ``(F, 3)`` int64 indices into ``vertices``, counter-clockwise seen from outside.
    albedo: ``(F, 3, 3)`` per-corner RGB albedo in [0, 1]; for a textured mesh (the scene's
    only one), ``(F, 3, 2)`` per-corner texture coordinates instead.
    texture: that mesh's texture (its image in the soup's dtype and device), or ``None``.
    """

    vertices: torch.Tensor
    faces: torch.Tensor
    albedo: torch.Tensor
    texture: Texture | None = None

    @property
    def corners(self) -> torch.Tensor:
        """World-space face corners ``(F, 3, 3)``."""
        return self.vertices[self.faces]


def mesh_albedo(scene_mesh: SceneMesh) -> torch.Tensor:
    """Per-corner albedo ``(F, 3, 3)``: per-vertex colors gathered, per-face colors repeated."""
    if scene_mesh.color_mode == "vertex":
        return scene_mesh.colors[scene_mesh.mesh.faces]
    return scene_mesh.colors[:, None, :].expand(-1, 3, -1)


def scene_faces(scene: Scene, *, dtype=torch.float32, device=None) -> FaceSoup:
    """The scene's meshes, transformed to world space and merged into one :class:`FaceSoup`."""
    vertices, faces, albedo = [], [], []
    offset = 0
    texture = None
    for scene_mesh in scene.meshes:
        world = scene_mesh.transform.apply(scene_mesh.mesh.vertices.to(dtype=dtype, device=device))
        vertices.append(world)
        faces.append(scene_mesh.mesh.faces.to(device) + offset)
        if scene_mesh.texture is not None:  # the only mesh (scene.py)
            albedo.append(scene_mesh.mesh.face_uvs.to(dtype=dtype, device=device))
            texture = replace(scene_mesh.texture, image=scene_mesh.texture.image.to(dtype=dtype, device=device))
        else:
            albedo.append(mesh_albedo(scene_mesh).to(dtype=dtype, device=device))
        offset += world.shape[0]
    if not vertices:
        return FaceSoup(
            torch.zeros(0, 3, dtype=dtype, device=device),
            torch.zeros(0, 3, dtype=torch.int64, device=device),
            torch.zeros(0, 3, 3, dtype=dtype, device=device),
        )
    return FaceSoup(torch.cat(vertices), torch.cat(faces), torch.cat(albedo), texture)


def raster_settings(render: RenderSettings, camera: Camera) -> SoftRasSettings:
    """The rasterizer's settings for one camera of a scene."""
    return SoftRasSettings(
        sigma=render.sigma,
        gamma=render.gamma,
        eps=render.eps,
        eps_d=render.eps_d,
        near=camera.near,
        far=camera.far,
        perspective=camera.projection == "perspective",
        cull_backfaces=render.cull_backfaces,
        background=tuple(render.background),
    )


def render_faces(
    corners: torch.Tensor,
    albedo: torch.Tensor,
    cameras: Sequence[Camera],
    render: RenderSettings,
    lights: Lights | LightTensors | None,
    *,
    poses: Sequence[CameraTensors] | None = None,
    backend: str | None = None,
    colors: bool = True,
    texture: Texture | None = None,
) -> torch.Tensor:
    """RGBA ``(N, 4, H, W)`` of world-space triangles seen by each of ``N`` cameras.

    corners: ``(F, 3, 3)`` world-space face corners; albedo: ``(F, 3, 3)`` per-corner RGB, or
    with a ``texture`` (its image ``(Ht, Wt, 3)`` in the corners' dtype and device; no lights),
    ``(F, 3, 2)`` per-corner texture coordinates.
    poses: optional per-camera pose tensors (for gradients w.r.t. cameras); lights may be
    :class:`LightTensors` (for gradients w.r.t. lights).
    colors: False rasterizes the silhouettes alone (RGB is 0), which is cheaper.
    Cameras that share projection, near and far are rasterized as one batch.
    """
    textured = colors and texture is not None
    return render_views(
        corners, shaded_corners(corners, albedo, lights, colors, textured).expand(len(cameras), -1, -1, -1),
        cameras, render, poses=poses, backend=backend, texture=texture if textured else None,
    )  # fmt: skip


def shaded_corners(
    corners: torch.Tensor, albedo: torch.Tensor, lights: Lights | LightTensors | None, colors: bool, textured: bool
) -> torch.Tensor:
    """What the rasterizer blends per face corner (``shaded`` of :func:`render_views`): the
    texture coordinates of a textured mesh as they are (textures are unlit), else the albedo
    shaded by ``lights``; nothing (``C = 0``) for the silhouettes alone (not ``colors``)."""
    if not colors:
        return albedo[..., :0]
    return albedo if textured else shade(albedo, corners, lights)


def render_views(
    corners: torch.Tensor,
    shaded: torch.Tensor,
    cameras: Sequence[Camera],
    render: RenderSettings,
    *,
    poses: Sequence[CameraTensors] | None = None,
    backend: str | None = None,
    texture: Texture | None = None,
) -> torch.Tensor:
    """RGBA ``(N, 4, H, W)`` of world-space triangles seen by each of ``N`` cameras:
    :func:`render_faces` after shading, with the inputs of each camera apart if need be, so that
    its gradients stay apart (an optimizer that sums them in a fixed order needs that).

    corners: world-space face corners, ``(F, 3, 3)`` seen by every camera or ``(N, F, 3, 3)`` one
    set per camera; shaded: ``(N, F, 3, C)`` shaded per-corner colors, ``C`` 3, or 0 for the
    silhouettes alone (RGB is 0, which is cheaper); with a ``texture``, ``(N, F, 3, 2)``
    per-corner texture coordinates.
    """
    per_camera = corners.dim() == 4
    colors = shaded.shape[-1] > 0
    images: list[torch.Tensor | None] = [None] * len(cameras)
    groups: dict[SoftRasSettings, list[int]] = {}
    for index, camera in enumerate(cameras):
        groups.setdefault(raster_settings(render, camera), []).append(index)
    for settings, indices in groups.items():
        # Most scenes' cameras make one group: all of the inputs, uncopied.
        chosen = slice(None) if len(indices) == len(cameras) else indices
        screen = project_views(
            corners[chosen] if per_camera else corners, [cameras[i] for i in indices],
            None if poses is None else [poses[i] for i in indices], per_camera=per_camera,
        )  # fmt: skip
        if texture is not None:
            settings = replace(settings, texture_wrap=texture.wrap)
        batch = rasterize(
            screen,
            shaded[chosen],
            render.width,
            render.height,
            settings if colors else replace(settings, background=()),
            backend=backend or render.backend,
            texture=None if texture is None else texture.image,
        )
        if not colors:
            batch = torch.cat([batch.new_zeros(batch.shape[0], 3, *batch.shape[2:]), batch], dim=1)
        if len(groups) == 1:  # in camera order already: no copy
            return batch
        for i, image in zip(indices, batch):
            images[i] = image
    return torch.stack(images)


#: The sigma (screen units squared) at which :func:`hard_silhouettes` takes MODEL.md's
#: ``sigma -> 0`` limit: ``D_j = sigmoid(delta_j d_j^2 / sigma)`` is then exactly 1 or 0 in float32
#: for every pixel center farther than about 1e-8 screen units from face ``j``'s edges (far below
#: float32's resolution of screen positions, ~6e-8), and the soft reach of faces is nil.
HARD_SIGMA = 1e-16


@torch.no_grad()
def hard_silhouettes(
    corners: torch.Tensor,
    cameras: Sequence[Camera],
    render: RenderSettings,
    *,
    poses: Sequence[CameraTensors] | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Exact coverage of pixel centers: ``(N, H, W)`` bool, one image per camera.

    A pixel is covered when the center of the pixel lies inside a drawn face: MODEL.md's
    silhouette ``A = 1 - prod_j (1 - D_j)`` in the limit ``sigma -> 0`` (:data:`HARD_SIGMA`),
    thresholded at 1/2. In that limit ``D_j`` is 1 inside face ``j``, 0 outside and 1/2 on its
    edges, so a center on an edge shared by two drawn faces counts, and one on an outline does
    not. Drawn faces are those the soft render draws: between the camera's near and far planes,
    and front-facing when ``render.cull_backfaces``. Not differentiable.

    corners: ``(F, 3, 3)`` world-space face corners, any float dtype and device; poses: optional
    per-camera poses, as :func:`render_faces` takes them.
    """
    hard = replace(render, sigma=HARD_SIGMA)
    albedo = corners.new_zeros(corners.shape)
    alpha = render_faces(corners, albedo, cameras, hard, None, poses=poses, backend=backend, colors=False)
    return alpha[:, 3] > 0.5


def render_scene(scene: Scene, *, backend: str | None = None, dtype=torch.float32, device=None) -> torch.Tensor:
    """Render every camera of ``scene``: RGBA ``(N_cameras, 4, H, W)``, values in [0, 1].

    ``device`` defaults to the GPU when the backend is ``cuda`` (or ``auto`` and it works).
    """
    backend = backend or scene.render.backend
    soup = scene_faces(scene, dtype=dtype, device=device or preferred_device(backend))
    return render_faces(
        soup.corners, soup.albedo, scene.cameras, scene.render, scene.lights, backend=backend, texture=soup.texture
    )


def opaque_inside(images: torch.Tensor) -> torch.Tensor:
    """RGBA ``(..., 4, H, W)`` as a picture shows it: alpha 1 inside the outline, where the soft
    silhouette ``A >= 1/2``, and ``A`` (its soft falloff) outside; RGB unchanged.

    ``A = 1 - prod_j (1 - D_j)`` (MODEL.md) stays below 1 inside a mesh whose faces are not large
    next to ``sqrt(sigma)``: a pixel center at distance ``r`` inside one face is at ``r`` outside
    its neighbour across the nearest edge, so ``D = s`` and ``1 - s`` for the two, and
    ``A = 1 - s (1 - s) >= 3/4`` instead of 1 (the back faces lift it, unevenly). Shown as alpha,
    that draws the edges of the faces inside the object (0.94, 239/255, inside the icosphere of
    ``scenes/icosphere.json``). A pixel center inside a face has ``D >= 1/2`` from it, so
    ``A >= 1/2`` holds on the whole inside. The color ``I`` is opaque wherever a face reaches: the
    background's weight in the softmax, ``exp((eps - m) / gamma)``, is nil next to a face's
    ``D exp((zhat - m) / gamma)`` (``m`` the nearest ``zhat``, ``gamma`` 1e-4), so ``(I, alpha)`` is
    straight (not premultiplied) alpha.
    """
    alpha = images[..., 3:, :, :]
    return torch.cat([images[..., :3, :, :], torch.where(alpha >= 0.5, 1.0, alpha)], dim=-3)
