"""MODEL.md's default constants and the backend names: defined here once, imported everywhere
(the scene file's defaults, the rasterizer's settings, the CLI's help)."""

SIGMA = 1e-4
GAMMA = 1e-4
EPS = 1e-3
EPS_D = 1e-4
NEAR = 0.1
#: The smallest gamma and eps_d a scene may set. The float32 kernels take 1 / gamma, weigh a
#: pixel's faces by numbers down to ~eps_d, and flush numbers below float32's smallest normal
#: one (1.2e-38) to zero: from there 1 / gamma is infinite or every weight of a pixel may be
#: zero, and the pixel NaN. 1e-30 leaves room for the products of those numbers.
SMALLEST_GAMMA = 1e-30
SMALLEST_EPS_D = 1e-30
FAR = 100.0

#: ``auto`` picks ``cuda`` for CUDA tensors when it works, else ``cpu`` for CPU tensors when the
#: kernels compile here, else ``reference``.
BACKENDS = ("auto", "cpu", "cuda", "reference")
