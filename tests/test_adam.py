"""microdr.optimize.adam.Adam against torch.optim.Adam, which it replaces to spare importing torch._dynamo."""

import subprocess
import sys

import pytest
import torch

from microdr.optimize.adam import Adam


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adam_equals_torch_adam_bitwise(dtype):
    generator = torch.Generator().manual_seed(0)
    shapes = [(42, 3), (3,), (5, 7)]
    start = [torch.randn(shape, generator=generator, dtype=dtype) for shape in shapes]
    mine = [t.clone().requires_grad_() for t in start]
    theirs = [t.clone().requires_grad_() for t in start]
    adam = Adam(mine, lr=0.01, betas=(0.5, 0.99))
    reference = torch.optim.Adam(theirs, lr=0.01, betas=(0.5, 0.99), foreach=False)
    for step in range(30):
        lr = 0.01 * (1 + step) ** -0.5  # a schedule, set between steps as the loop does
        adam.lr = lr
        for group in reference.param_groups:
            group["lr"] = lr
        grads = [torch.randn(shape, generator=generator, dtype=dtype) * 10.0 ** (step % 7 - 3) for shape in shapes]
        for index, (a, b, g) in enumerate(zip(mine, theirs, grads)):
            # The second parameter gets no gradient every third step: it must stay, moments too.
            a.grad = None if index == 1 and step % 3 == 0 else g.clone()
            b.grad = None if index == 1 and step % 3 == 0 else g.clone()
        adam.step()
        reference.step()
        for a, b in zip(mine, theirs):
            assert torch.equal(a, b)


def test_state_dict_round_trip_continues_identically():
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(10, generator=generator).requires_grad_()
    b = a.detach().clone().requires_grad_()
    first, second = Adam([a], lr=0.1), Adam([b], lr=0.1)
    grads = [torch.randn(10, generator=generator) for _ in range(6)]
    for g in grads[:3]:
        a.grad, b.grad = g.clone(), g.clone()
        first.step(), second.step()
    saved = first.state_dict()
    restored = Adam([b], lr=0.5)
    restored.load_state_dict(saved)
    for g in grads[3:]:
        a.grad, b.grad = g.clone(), g.clone()
        first.step(), restored.step()
    assert torch.equal(a, b)
    assert restored.lr == 0.1


def test_building_an_optimization_does_not_import_dynamo():
    """The reason Adam exists: torch.optim's optimizers import torch._dynamo (seconds)."""
    code = (
        "import sys, microdr, torch\n"
        "from microdr.io.scene import load_scene\n"
        "from microdr.optimize.loop import Optimization\n"
        "from microdr.io.targets import Targets\n"
        "scene = load_scene('scenes/tasks/ellipsoid.json')\n"
        "targets = Targets.from_images(torch.zeros(len(scene.cameras), 1, scene.render.height, scene.render.width))\n"
        "run = Optimization(scene, targets, backend='reference')\n"
        "run.optimizer.step()\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
