"""Auto-PGD in L-inf (Croce & Hein 2020, Algorithm 1), in torch, on the feasible inputs only.

The attacked model is the attacker's view (:mod:`.views`), called directly: one forward and one
backward pass per iterate give its loss f, its gradient and its prediction. One run, from a random
start x^(0) drawn uniformly from the feasible box, with step size eta = 2 eps:

    z^(k+1) = P(x^(k) + eta * sign(grad f(x^(k))))
    x^(k+1) = P(x^(k) + alpha (z^(k+1) - x^(k)) + (1 - alpha) (x^(k) - x^(k-1)))   alpha = 0.75 (1 at k = 0)

P is the projection onto the feasible box: coordinates outside the mask stay at x, the others are
clipped to [x - eps, x + eps] and [0, 1]. At the checkpoints w_j = ceil(p_j N) (N = iterations,
p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)) eta is halved, per example, when

    1. f rose in fewer than rho = 0.75 of the steps since w_{j-1}, or
    2. eta was not halved at w_{j-1} and the highest loss f_max has not risen since,

and that example's iterate jumps back to the point of highest loss so far, x_max.

Losses of the view's output z (logits or log-probabilities):
- ``ce``:  -log softmax(z)_y;
- ``dlr``: -(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3 + 1e-12), z_pi sorted descending (>= 3 classes).

Guarantees:
- every point the view is called on, and every returned point, is feasible: unchanged outside the
  mask, within eps of x, in [0, 1]. Integer counts (CTU-13) are not snapped here: the evaluation
  snaps once at the end, as for PGD, since snapping every iterate would undo the small steps
  (a count moves only in whole units);
- per example the attack returns, over every iterate of every run (the random starts included),
  the one the view itself judged misclassified (argmax z != y) with the highest loss, or, where it
  judged none misclassified, the one with the highest loss; ``success`` is that judgement. For an
  EOT view these are the EOT loss and prediction, for a randomized ``draw`` view one draw's;
- ``restarts`` runs from independent random starts; a run after the first attacks only the examples
  no earlier run fooled.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import DipsenError
from .torch_attack import TorchAttack

LOSSES = ("ce", "dlr")
ALPHA = 0.75
RHO = 0.75


def ce_loss(scores: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy per example."""
    return nn.functional.cross_entropy(scores, y, reduction="none")


def dlr_loss(scores: Tensor, y: Tensor) -> Tensor:
    """Difference of logits ratio per example: shift- and scale-invariant, > 0 where misclassified."""
    ranked = scores.sort(dim=1, descending=True).values
    true = scores.gather(1, y[:, None]).squeeze(1)
    other = scores.masked_fill(nn.functional.one_hot(y, scores.shape[1]).bool(), -math.inf).amax(dim=1)
    return -(true - other) / (ranked[:, 0] - ranked[:, 2] + 1e-12)


def checkpoints(iterations: int) -> list[int]:
    """w_1, w_2, ...: the iterations after which the step size is checked (ceil(p_j N), p_j <= 1)."""
    p = [0.0, 0.22]
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    # round() first: 0.22 * 100 is 22.000000000000004 in floating point, not a reason to wait for 23
    return sorted({math.ceil(round(q * iterations, 9)) for q in p[1:]} - {0})


class Apgd(TorchAttack):
    """L-inf APGD with the CE or DLR loss, ``iterations`` steps per run, ``restarts`` >= 1 runs."""

    def __init__(
        self, model: nn.Module, eps: float, iterations: int, restarts: int = 1, loss: str = "ce", batch_size: int = 128
    ) -> None:
        super().__init__(model, eps, batch_size)
        if loss not in LOSSES:
            raise DipsenError(f"unknown APGD loss {loss!r}; choose one of {', '.join(LOSSES)}")
        if iterations < 1 or restarts < 1:
            raise DipsenError(f"APGD needs >= 1 iteration and >= 1 run, got {iterations} and {restarts}")
        self.iterations, self.restarts = iterations, restarts
        self.loss = ce_loss if loss == "ce" else dlr_loss

    def attack(self, x: Tensor, y: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        free = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.bool().expand_as(x)
        best, best_loss = x.clone(), torch.full((len(y),), -math.inf, device=x.device)
        success = torch.zeros(len(y), dtype=torch.bool, device=x.device)
        for _ in range(self.restarts):
            idx = (~success).nonzero().squeeze(1)
            if not len(idx):
                break
            run_x, run_loss, run_success = self._run(x[idx], y[idx], free[idx])
            better = _better(run_success, run_loss, success[idx], best_loss[idx])
            chosen = idx[better]
            best[chosen], best_loss[chosen], success[chosen] = run_x[better], run_loss[better], run_success[better]
        return best, success

    def _evaluate(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Loss, its gradient and the view's verdict (misclassified) at x, from one pass of the view."""
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            scores = self.model(x)
            loss = self.loss(scores, y)
            (grad,) = torch.autograd.grad(loss.sum(), x)
        return loss.detach(), grad, scores.detach().argmax(dim=1) != y

    def _run(self, x: Tensor, y: Tensor, free: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One APGD run from a random start; returns the kept iterate, its loss and verdict."""
        lower, upper = (x - self.eps).clamp(min=0.0), (x + self.eps).clamp(max=1.0)

        def project(z: Tensor) -> Tensor:
            return torch.where(free, torch.minimum(torch.maximum(z, lower), upper), x)

        def per_example(flags: Tensor) -> Tensor:
            return flags.view(-1, *([1] * (x.dim() - 1)))

        current = project(x + self.eps * (2 * torch.rand_like(x) - 1))
        loss, grad, fooled = self._evaluate(current, y)
        kept, kept_loss, kept_fooled = current, loss, fooled
        x_max, f_max, grad_max = current, loss, grad
        previous, eta = current, torch.full_like(loss, 2 * self.eps)
        rises, last_checkpoint = torch.zeros_like(loss), 0
        f_max_at_checkpoint, halved_at_checkpoint = f_max, torch.zeros_like(fooled)
        marks = set(checkpoints(self.iterations))
        for k in range(self.iterations):
            alpha = 1.0 if k == 0 else ALPHA
            z = project(current + per_example(eta) * grad.sign())
            previous, current = current, project(current + alpha * (z - current) + (1 - alpha) * (current - previous))
            new_loss, grad, fooled = self._evaluate(current, y)
            rises += new_loss > loss
            loss = new_loss
            improved = loss > f_max
            x_max = torch.where(per_example(improved), current, x_max)
            grad_max = torch.where(per_example(improved), grad, grad_max)
            f_max = torch.where(improved, loss, f_max)
            keep = _better(fooled, loss, kept_fooled, kept_loss)
            kept = torch.where(per_example(keep), current, kept)
            kept_loss, kept_fooled = torch.where(keep, loss, kept_loss), torch.where(keep, fooled, kept_fooled)
            if k + 1 in marks:
                oscillating = rises < RHO * (k + 1 - last_checkpoint)
                stalled = ~halved_at_checkpoint & (f_max <= f_max_at_checkpoint)
                halve = oscillating | stalled
                eta = torch.where(halve, eta / 2, eta)
                # restart from the best point: its loss is the new reference for counting rises
                current = torch.where(per_example(halve), x_max, current)
                grad = torch.where(per_example(halve), grad_max, grad)
                loss = torch.where(halve, f_max, loss)
                rises, last_checkpoint = torch.zeros_like(rises), k + 1
                f_max_at_checkpoint, halved_at_checkpoint = f_max, halve
        return kept, kept_loss, kept_fooled


def _better(fooled: Tensor, loss: Tensor, best_fooled: Tensor, best_loss: Tensor) -> Tensor:
    """Where (fooled, loss) beats (best_fooled, best_loss): a fooling point first, then the higher loss."""
    return (fooled & ~best_fooled) | ((fooled == best_fooled) & (loss > best_loss))
