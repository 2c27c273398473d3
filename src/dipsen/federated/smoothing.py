"""Training losses for randomized smoothing inside :func:`~dipsen.federated.client.client_update`.

A smoothed classifier predicts the class the base model picks most often under Gaussian noise of
std sigma (``input_noise``); ``dipsen certify`` certifies it at that sigma. How the base model is
trained for it is ``smoothing_loss``:

- ``gaussian`` (Cohen et al. 2019): cross-entropy on one noisy copy of every input, the loss
  :meth:`~dipsen.federated.client.LocalTraining.noisy` feeds.
- ``consistency`` (Jeong & Shin 2020, :func:`consistency_loss`): cross-entropy on m noisy copies
  of every input, plus a term that pulls the copies' predictions towards their mean and one that
  makes that mean confident. A base model that answers the same under every noise draw has a
  large gap between its top two class probabilities under noise, which is what the certified
  radius grows with.
- ``smoothadv`` (Salman et al. 2019, "Provably robust deep learning via adversarially trained
  smoothed classifiers", :func:`smoothadv_examples`): adversarial training of the smoothed
  classifier itself. m noise draws per input are fixed; an L2 attack of ``smoothadv_steps`` steps
  within radius ``smoothadv_eps`` maximises the cross-entropy of the copies' mean softmax (the
  smoothed classifier's soft prediction); the model then trains on the cross-entropy of the m noisy
  copies of the attacked input. The attack works on the inputs' [0, 1] range (images).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

SMOOTHING_LOSSES = ("gaussian", "consistency", "smoothadv")


def consistency_loss(logits: Tensor, y: Tensor, lam: float, eta: float) -> Tensor:
    """Jeong & Shin 2020, "Consistency regularization for certified robustness of smoothed classifiers".

    ``logits`` holds m copies' logits, shape (m, B, classes): row i is f(x + delta_i) for i.i.d.
    Gaussian delta_i. With p_i = softmax(logits[i]) and p_hat = mean_i p_i, per example::

        mean_i CE(p_i, y) + lam * mean_i KL(p_hat || p_i) + eta * H(p_hat)

    averaged over the batch. The KL and the entropy H are the paper's "default" form (its reference
    ``consistency.py``): the KL term makes the copies agree, the entropy term keeps their mean from
    agreeing on a flat prediction. Gradients flow through p_hat, as in the reference (it is not a
    fixed target).
    """
    copies = logits.shape[0]
    log_p = nn.functional.log_softmax(logits, dim=-1)  # (m, B, C)
    cross_entropy = nn.functional.nll_loss(log_p.flatten(0, 1), y.repeat(copies))
    p_hat = log_p.exp().mean(dim=0)  # (B, C)
    # 0 log 0 = 0: a class the mean gives no mass contributes nothing (the reference clamps at 1e-20)
    log_p_hat = torch.log(p_hat.clamp(min=1e-20))
    kl = (p_hat * (log_p_hat - log_p)).sum(dim=-1).mean(dim=0)  # mean over copies of KL(p_hat || p_i), per example
    entropy = -(p_hat * log_p_hat).sum(dim=-1)
    return cross_entropy + (lam * kl + eta * entropy).mean()


def noisy_copies(x: Tensor, sigma: float, copies: int) -> Tensor:
    """``copies`` noisy versions of every row of ``x``, shape (copies * B, ...): copy i of row b at i * B + b.

    The noise comes from torch's global generator, as :meth:`~dipsen.federated.client.LocalTraining.noisy`'s does.
    """
    stacked = x.repeat(copies, *([1] * (x.dim() - 1)))
    return stacked + sigma * torch.randn_like(stacked)


def consistency_batch_loss(model: nn.Module, x: Tensor, y: Tensor, sigma: float, copies: int, lam: float, eta: float) -> Tensor:
    """:func:`consistency_loss` of ``model`` on ``copies`` noisy copies of the batch (x, y), in one forward pass.

    All copies go through the model together (as in the reference): a batch of B rows costs the
    forward and backward pass of copies * B rows. ``batch_size`` counts distinct rows: the
    reference splits each loaded batch of B into m steps of B / m rows, so its setting is matched
    by a ``batch_size`` of B / m.
    """
    logits = model(noisy_copies(x, sigma, copies))
    return consistency_loss(logits.view(copies, len(x), -1), y, lam, eta)


def smoothed_cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """-log of the mean over copies of softmax(logits)[y]: ``logits`` (m, B, classes); the mean over the batch.

    The soft smoothed classifier's loss, SmoothAdv's attack objective (probabilities floored at 1e-20, as the reference).
    """
    mean_softmax = nn.functional.softmax(logits, dim=-1).mean(dim=0)
    return nn.functional.nll_loss(torch.log(mean_softmax.clamp(min=1e-20)), y)


def smoothadv_examples(model: nn.Module, x: Tensor, y: Tensor, noise: Tensor, eps: float, steps: int) -> Tensor:
    """SmoothAdv's multi-noise L2 PGD: ``x + delta``, ||delta||_2 <= ``eps`` per row, inside [0, 1].

    ``noise`` (m, B, ...) is fixed through the attack. From delta = 0, each of ``steps`` steps moves
    delta by 2 eps / steps along the per-row normalised gradient of :func:`smoothed_cross_entropy`
    of ``model`` on ``x + delta + noise[i]`` (a row with a zero gradient moves in a random direction, from
    torch's global generator), then clips x + delta to [0, 1] and delta's norm to eps, as the
    reference's ``PGD_L2`` does. Gradients are taken with respect to delta only, in whatever mode
    the model is in (the CNN has no dropout or batch statistics, so train and eval mode agree).
    """
    copies = noise.shape[0]
    delta = torch.zeros_like(x)
    rows = (-1,) + (1,) * (x.dim() - 1)
    for _ in range(steps):
        delta.requires_grad_(True)
        logits = model(((x + delta).unsqueeze(0) + noise).flatten(0, 1)).view(copies, len(x), -1)
        (grad,) = torch.autograd.grad(smoothed_cross_entropy(logits, y), delta)
        norms = grad.flatten(1).norm(dim=1)
        zero = norms == 0
        if zero.any():
            grad[zero] = torch.randn_like(grad[zero])
            norms = grad.flatten(1).norm(dim=1)
        delta = delta.detach() + (2 * eps / steps) * grad / norms.view(rows)
        delta = (x + delta).clamp(0, 1) - x
        delta = delta.renorm(p=2, dim=0, maxnorm=eps)
    return (x + delta).detach()


def smoothadv_batch_loss(model: nn.Module, x: Tensor, y: Tensor, sigma: float, copies: int, eps: float, steps: int) -> Tensor:
    """SmoothAdv's training loss on the batch (x, y): the mean cross-entropy of ``copies`` noisy copies of the attacked rows.

    The noise (std ``sigma``, from torch's global generator) is drawn once, attacked through
    (:func:`smoothadv_examples`) and trained on, as in the reference (``train_multi_noise``).
    """
    noise = sigma * torch.randn((copies, *x.shape), dtype=x.dtype, device=x.device)
    attacked = smoothadv_examples(model, x, y, noise, eps, steps)
    logits = model((attacked.unsqueeze(0) + noise).flatten(0, 1))
    return nn.functional.cross_entropy(logits, y.repeat(copies))
