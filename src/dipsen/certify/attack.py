"""An L2 attack on a smoothed classifier, to check that its certificates are real.

PGD in L2 on the smoothed soft classifier log E_e[softmax f(x + d + e)], each gradient averaged over
``draws`` fresh noise draws (expectation over transformation, as in Salman et al. 2019), from a
random start inside the ball; the step is the normalised gradient, the iterate is projected onto
the L2 ball of radius ``radius`` around x and onto [0, 1]. A certificate at radius r is wrong if
this attack, within r, changes the smoothed prediction: certified accuracy at r can never exceed
the smoothed classifier's accuracy on these adversarial examples (up to the certificates' alpha).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def smoothed_pgd_l2(
    base: nn.Module,
    x: Tensor,
    y: Tensor,
    radius: float,
    sigma: float,
    *,
    steps: int = 20,
    draws: int = 16,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Adversarial examples for the batch ``x`` (labels ``y``) within L2 ``radius``, against the smoothed ``base``.

    Computed on ``x``'s device, which must be the model's; every draw is made there, so ``generator`` must live there too.
    """
    base = base.eval()
    flat = x.flatten(1)
    direction = torch.randn(flat.shape, generator=generator, device=x.device)
    start = direction / direction.norm(dim=1, keepdim=True) * radius * torch.rand(len(x), 1, generator=generator, device=x.device)
    delta = start.view_as(x)
    step = 2.5 * radius / steps  # Madry et al.'s rule: enough steps to cross the ball twice
    for _ in range(steps):
        delta = delta.detach().requires_grad_(True)
        repeated = (x + delta).repeat(draws, *([1] * (x.dim() - 1)))
        noisy = repeated + sigma * torch.randn(repeated.shape, generator=generator, device=x.device)
        log_probs = torch.log_softmax(base(noisy), dim=1).view(draws, len(x), -1)
        expected = torch.logsumexp(log_probs, dim=0) - math.log(draws)
        loss = nn.functional.nll_loss(expected, y)
        (grad,) = torch.autograd.grad(loss, delta)
        grad_flat = grad.flatten(1)
        ascent = grad_flat / grad_flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
        moved = delta.detach().flatten(1) + step * ascent
        moved = moved * (radius / moved.norm(dim=1, keepdim=True).clamp_min(radius))  # onto the ball
        delta = ((x.flatten(1) + moved).clamp(0, 1) - x.flatten(1)).view_as(x)
    return (x + delta).detach()
