"""Adam (Kingma and Ba, 2015) on a fixed list of tensors, for the optimizer loop.

Why not ``torch.optim.Adam``: building any ``torch.optim`` optimizer imports ``torch._dynamo``
(about 2.5 s on a small machine, a fixed cost of every ``microdr optimize``), and the loop needs
none of its options. The arithmetic is that of ``torch.optim.Adam``'s single-tensor path
(``foreach=False``, the default for CPU tensors), operation for operation, so results are
bitwise the same (``tests/test_optimize.py`` checks it). With ``g`` a parameter's gradient and
``t`` the step count from 1:

    m <- b1 m + (1 - b1) g            v <- b2 v + (1 - b2) g^2
    p <- p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

Tensor contract: parameters are leaf tensors of any float dtype and device; the moments share
each parameter's dtype and device. A parameter whose ``grad`` is ``None`` is left as it is, its
moments too (as in torch).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class Adam:
    """Adam over ``parameters`` with learning rate ``lr`` (settable between steps), ``betas``
    ``(b1, b2)`` and ``eps``."""

    def __init__(
        self,
        parameters: Iterable[torch.Tensor],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ):
        self.parameters = list(parameters)
        self.lr = lr
        self.betas = betas
        self.eps = eps
        #: Per parameter that has had a gradient: its step count ``t`` and moments ``m``, ``v``.
        self.state: dict[int, dict[str, torch.Tensor | int]] = {}

    def zero_grad(self) -> None:
        """Forget every parameter's gradient (``grad = None``, as torch's default)."""
        for parameter in self.parameters:
            parameter.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient."""
        b1, b2 = self.betas
        for index, parameter in enumerate(self.parameters):
            grad = parameter.grad
            if grad is None:
                continue
            state = self.state.setdefault(
                index,
                {"step": 0, "m": torch.zeros_like(parameter), "v": torch.zeros_like(parameter)},
            )
            state["step"] += 1
            m, v, t = state["m"], state["v"], state["step"]
            m.lerp_(grad, 1 - b1)
            v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            step_size = self.lr / (1 - b1**t)
            # ** 0.5, not math.sqrt: torch's rounding, to the last bit.
            denominator = (v.sqrt() / (1 - b2**t) ** 0.5).add_(self.eps)
            parameter.addcdiv_(m, denominator, value=-step_size)

    def state_dict(self) -> dict:
        """The moments and step counts (tensors as they are, on their device), for checkpoints."""
        return {
            "state": {
                index: {"step": s["step"], "m": s["m"].clone(), "v": s["v"].clone()}
                for index, s in self.state.items()
            },
            "lr": self.lr,
            "betas": list(self.betas),
            "eps": self.eps,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`; moments move to their parameter's device."""
        self.state = {
            int(index): {
                "step": int(s["step"]),
                "m": s["m"].to(self.parameters[int(index)]),
                "v": s["v"].to(self.parameters[int(index)]),
            }
            for index, s in state["state"].items()
        }
        self.lr = state["lr"]
        self.betas = tuple(state["betas"])
        self.eps = state["eps"]
