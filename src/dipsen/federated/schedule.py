"""The learning rate of each round: a schedule over the run's rounds, applied by the server.

FedAvg gives every client a fresh optimizer each round (:meth:`LocalTraining.make_optimizer`),
so a schedule is a function of the round: the server computes round t's rate and sends it with
the round's tasks, and every client of the round trains at that rate (both engines alike).

- ``constant``: ``lr`` every round.
- ``cyclic``: the one-cycle triangle of Smith (2017) that Wong, Rice and Kolter (2020, "Fast is
  better than free") use for FGSM adversarial training: the rate rises linearly from 0 to ``lr``
  at :data:`CYCLIC_PEAK` of the run, then falls linearly to 0 at its end, evaluated at the middle
  of each round (so no round trains at rate 0). It depends on the run's round count, which
  therefore cannot change on ``--resume``.
"""

from __future__ import annotations

LR_SCHEDULES = ("constant", "cyclic")
CYCLIC_PEAK = 0.4  # share of the run at which the cyclic rate peaks (Wong et al.'s 2/5)


def round_lr(schedule: str, lr: float, round_: int, rounds: int) -> float:
    """The learning rate of round ``round_`` (1-based) of ``rounds`` under ``schedule``, peaking at ``lr``."""
    if schedule == "constant":
        return lr
    if schedule != "cyclic":
        raise ValueError(f"unknown learning-rate schedule {schedule!r}")
    if not 1 <= round_ <= rounds:
        raise ValueError(f"round {round_} is outside 1..{rounds}")
    t = (round_ - 0.5) / rounds  # the middle of the round, as a share of the run
    return lr * (t / CYCLIC_PEAK if t <= CYCLIC_PEAK else (1 - t) / (1 - CYCLIC_PEAK))
