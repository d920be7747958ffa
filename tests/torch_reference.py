"""A PyTorch Pre-Diag / SORA layer written from the method spec: the reference the parity tests and the
benchmark's PyTorch peer run.

Activation form (docs/spec.md section 2): ``y = d * base(x) + s (x A^T) B^T`` (Pre-Diag), then for SORA
``y R = y + s_p ((y C) D^T - (y D) C^T)`` with ``s_p = min(1, initial_s_p / (||C||_F + ||D||_F + 1e-6))``
(gradients through the norms). PyTorch layout: ``A (r, d_in)``, ``B (d_out, r)``, ``d (d_out,)``,
``C, D (d_out, r_p)``; ``base`` maps ``(..., d_in) -> (..., d_out)`` (an ``nn.Linear``: ``x W^T + b``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


class ConditionedLinear(torch.nn.Module):
    """``base`` conditioned by Pre-Diag (``C is None``) or SORA; ``A, B, d, C, D`` are trained parameters."""

    def __init__(
        self,
        base: Callable[[torch.Tensor], torch.Tensor],
        A: torch.Tensor,
        B: torch.Tensor,
        d: torch.Tensor,
        C: torch.Tensor | None = None,
        D: torch.Tensor | None = None,
        scaling: float = 1.0,
        initial_s_p: float = 1.0,
    ) -> None:
        super().__init__()
        self.base_layer = base
        self.A, self.B, self.d = (torch.nn.Parameter(t) for t in (A, B, d))
        self.C = None if C is None else torch.nn.Parameter(C)
        self.D = None if D is None else torch.nn.Parameter(D)
        self.scaling, self.initial_s_p = scaling, initial_s_p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.d * self.base_layer(x)
        y = y + torch.nn.functional.linear(torch.nn.functional.linear(x, self.A), self.B) * self.scaling
        if self.C is not None:
            s_p = torch.clamp(self.initial_s_p / (self.C.norm() + self.D.norm() + 1e-6), max=1.0)
            y = y + s_p * ((y @ self.C) @ self.D.T - (y @ self.D) @ self.C.T)
        return y


def conditioned_linear(
    base: torch.nn.Linear, method: str, r: int, alpha: float, r_p: int, initial_s_p: float = 1.0
) -> ConditionedLinear:
    """``base`` wrapped with ``method`` (``"prediag"`` or ``"sora"``), initialised as docs/spec.md section 2 says:
    ``A ~ U(+-1/sqrt(d_in))``, ``B = 0``, ``d = 1``, ``C ~ U(+-1/sqrt(d_out))``, ``D = C``."""
    if method not in ("prediag", "sora"):
        raise ValueError(f"the PyTorch reference implements prediag and sora, not {method!r}")
    d_out, d_in = base.weight.shape
    bound = 1.0 / math.sqrt(d_in)
    A = torch.empty(r, d_in).uniform_(-bound, bound)
    C = D = None
    if method == "sora":
        cb = 1.0 / math.sqrt(d_out)
        C = torch.empty(d_out, r_p).uniform_(-cb, cb)
        D = C.clone()
    return ConditionedLinear(base, A, torch.zeros(d_out, r), torch.ones(d_out), C, D, alpha / r, initial_s_p)
