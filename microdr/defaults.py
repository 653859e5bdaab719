"""MODEL.md's default constants and the backend names: defined here once, imported everywhere
(the scene file's defaults, the rasterizer's settings, the CLI's help)."""

SIGMA = 1e-4
GAMMA = 1e-4
EPS = 1e-3
EPS_D = 1e-4
NEAR = 0.1
FAR = 100.0

#: ``auto`` picks ``cuda`` for CUDA tensors when it works, else ``cpu`` for CPU tensors when the
#: kernels compile here, else ``reference``.
BACKENDS = ("auto", "cpu", "cuda", "reference")
