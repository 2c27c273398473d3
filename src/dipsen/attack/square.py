"""Square attack in L-inf (Andriushchenko et al. 2020), searching only the feasible inputs.

Score-based: it reads the model's outputs z (logits or log-probabilities) and nothing else, and
minimises the margin

    m(x') = z_y(x') - max_{j != y} z_j(x')          (m < 0  <=>  x' is misclassified)

by random search, per example:

1. query x; an example already misclassified is done;
2. vertical stripes: x + eps * s, one random sign s in {-1, +1} per channel and column;
3. for i = 0 .. queries - 2: set a random window covering a fraction p_i of the feasible box to
   x + eps * s (one random sign per channel), keep the candidate where it lowers m, and stop an
   example as soon as m < 0. The paper's schedule, written for 10 000 iterations, is rescaled to
   ``queries``: p_i = p_init / 2^k, k = how many of 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000
   lie below int(10 000 * i / queries).

The feasible box of an example is the bounding box of the coordinates its mask frees (the whole
image without a mask). Windows are squares of side round(sqrt(p h w)) on an h x w box, as in the
paper; where the box is narrower than that side (the four volume columns of a CTU-13 window), the
window is stretched along the other axis to keep its area p h w.

Guarantees:
- every candidate is passed through ``project`` (the data set's feasible-domain projection: mask,
  eps-ball, [0, 1], integer counts) *before* it is queried, so every point the model scores is
  feasible, the returned point is the best one queried, and the returned ``success`` is what the
  model said about that very point;
- at most ``queries + 1`` queries per example (the clean input, the stripes, queries - 1 windows);
- for a randomized model every query takes a fresh noise draw, so ``success`` is one draw's
  verdict (the query threat model); for a deterministic model it is exact.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..errors import DipsenError
from .torch_attack import TorchAttack

Projection = Callable[[Tensor, Tensor], Tensor]
"""``project(candidate, x)``: the feasible point closest to ``candidate`` for the original ``x``."""

P_INIT = 0.8
_SCHEDULE_THRESHOLDS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def window_fraction(p_init: float, iteration: int, queries: int) -> float:
    """p_i: the fraction of the feasible box the window of iteration ``iteration`` covers."""
    return p_init / 2 ** bisect.bisect_left(_SCHEDULE_THRESHOLDS, int(10_000 * iteration / queries))


def margin(scores: Tensor, y: Tensor) -> Tensor:
    """z_y - max_{j != y} z_j per example: negative exactly where the scores misclassify."""
    true = scores.gather(1, y[:, None]).squeeze(1)
    other = scores.masked_fill(nn.functional.one_hot(y, scores.shape[1]).bool(), -math.inf).amax(dim=1)
    return true - other


class Square(TorchAttack):
    """L-inf Square attack; ``project`` defaults to clipping into the eps-ball and [0, 1]."""

    def __init__(
        self,
        model: nn.Module,
        eps: float,
        queries: int,
        p_init: float = P_INIT,
        project: Projection | None = None,
        batch_size: int = 128,
    ) -> None:
        super().__init__(model, eps, batch_size)
        if queries < 1:
            raise DipsenError(f"the Square attack needs >= 1 query, got {queries}")
        if not 0 < p_init < 1:
            raise DipsenError(f"p_init must be in (0, 1), got {p_init}")
        self.queries, self.p_init = queries, p_init
        self.project = project if project is not None else self._clip

    def _clip(self, candidate: Tensor, x: Tensor) -> Tensor:
        return torch.minimum(torch.maximum(candidate, x - self.eps), x + self.eps).clamp(0.0, 1.0)

    @torch.no_grad()
    def attack(self, x: Tensor, y: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        free = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.bool().expand_as(x)
        rows, cols = free.any(dim=3).any(dim=1), free.any(dim=2).any(dim=1)
        top, box_h = _span(rows)
        left, box_w = _span(cols)
        best = x.clone()
        best_margin = margin(self.model(x), y)

        def search(idx: Tensor, candidate: Tensor) -> None:
            new = margin(self.model(candidate), y[idx])
            better = new < best_margin[idx]
            best[idx[better]], best_margin[idx[better]] = candidate[better], new[better]

        def unfooled() -> Tensor:
            # examples without a single free coordinate cannot move: not worth a query
            return ((best_margin >= 0) & (box_h > 0)).nonzero().squeeze(1)

        # every candidate is projected before its query: what the model scores is what is returned
        idx = unfooled()
        if len(idx):
            stripes = _signs((len(idx), x.shape[1], 1, x.shape[3]), x)
            search(idx, self.project(torch.where(free[idx], x[idx] + self.eps * stripes, x[idx]), x[idx]))
        for i in range(self.queries - 1):
            idx = unfooled()
            if not len(idx):
                break
            x_i, best_i = x[idx], best[idx]
            window = free[idx] & _window(
                window_fraction(self.p_init, i, self.queries), top[idx], box_h[idx], left[idx], box_w[idx], x.shape[2], x.shape[3]
            )
            signs = _signs((len(idx), x.shape[1], 1, 1), x)
            candidate = self.project(torch.where(window, x_i + self.eps * signs, best_i), x_i)
            # a window already at those values would waste the query; the paper draws new signs until
            # the candidate differs, which for one channel means the opposite sign
            unchanged = (candidate == best_i).flatten(1).all(dim=1)
            if unchanged.any():
                flipped = self.project(torch.where(window, x_i - self.eps * signs, best_i), x_i)
                candidate = torch.where(unchanged[:, None, None, None], flipped, candidate)
            search(idx, candidate)
        return best, best_margin < 0


def _span(occupied: Tensor) -> tuple[Tensor, Tensor]:
    """First occupied index and length of the occupied span along dim 1 (length 0 when empty)."""
    size = occupied.shape[1]
    first = occupied.float().argmax(dim=1)
    last = size - 1 - occupied.flip(1).float().argmax(dim=1)
    return first, (last - first + 1) * occupied.any(dim=1)


def _signs(shape: tuple[int, ...], like: Tensor) -> Tensor:
    """Random signs of ``shape``, ``like``'s dtype and device."""
    return (torch.randint(0, 2, shape, device=like.device) * 2 - 1).to(like.dtype)


def _window(p: float, top: Tensor, box_h: Tensor, left: Tensor, box_w: Tensor, height: int, width: int) -> Tensor:
    """A random window per example covering p of its box, as a (n, 1, height, width) boolean mask."""
    h, w = box_h.double(), box_w.double()
    area = p * h * w
    side = area.sqrt().round().clamp(min=1)
    win_h = torch.where(side > w, (area / w).round(), side).clamp(min=1).minimum(h).long()
    win_w = torch.where(side > h, (area / h).round(), side).clamp(min=1).minimum(w).long()
    row0 = top + (torch.rand(len(top), device=top.device) * (box_h - win_h + 1)).long()
    col0 = left + (torch.rand(len(left), device=left.device) * (box_w - win_w + 1)).long()
    r, c = torch.arange(height, device=top.device), torch.arange(width, device=top.device)
    in_rows = (r >= row0[:, None]) & (r < (row0 + win_h)[:, None])
    in_cols = (c >= col0[:, None]) & (c < (col0 + win_w)[:, None])
    return in_rows[:, None, :, None] & in_cols[:, None, None, :]
