"""The worst case over every attack as the report shows it: exact, or bounded for a study saved before the fix.

A study saved with per-example results (``correct`` in each attack's dict) holds the exact figure:
per example, the minimum over the clean prediction and every attack run, the doubled-iteration PGD
run included. One saved without them (the studies of 2026-11-27 and 2026-11-28 in docs/) left both
out: an example misclassified without attack, or broken by the doubled run alone, counted as
surviving. Its figure ``old`` (as a count of the n examples) is an upper bound, and its saved
accuracies bound the true count; with the doubled run on the first k examples, correct on D of them,
and base PGD correct on B of the same examples:

- at most ``min(old, clean, D + n - k)``: a survivor is correct without attack, and one among the
  first k is correct after the doubled run;
- at least ``old - (n - clean) - R``: it loses the examples misclassified without attack and those
  the doubled run broke alone, ``R <= k - D``; for a deterministic model also ``R <= B``, since
  base PGD's re-prediction of the first k is the full run's own result on them.

Per class the same holds with the class's examples and clean recall, without the doubled run's
upper bound (its per-class accuracy was not saved). Plots show the saved figure.
"""

from __future__ import annotations

from dataclasses import dataclass

MARK = "†"
NOTE = (
    f"{MARK} Computed before the clean-error fix: this older study's worst case also counted examples misclassified "
    "without attack and left out the PGD run with doubled iterations, so the figure is an upper bound (plotted as "
    "it is); the true value lies in the interval, derived from the study's saved accuracies (its per-example "
    "results were not saved)."
)


@dataclass(frozen=True)
class Bounded:
    """A worst-case figure as saved, and the interval [lo, hi] holding the true value (both ``saved`` when exact)."""

    saved: float
    lo: float
    hi: float

    @property
    def exact(self) -> bool:
        return self.lo == self.hi

    def __str__(self) -> str:
        if self.exact:
            return f"{self.hi:.3f}"
        return f"{self.saved:.3f}{MARK} (true value in [{self.lo:.3f}, {self.hi:.3f}])"


def saved_per_example(study: dict) -> bool:
    """Whether ``study`` was saved with per-example results, so its worst-case figures are exact."""
    return "correct" in study["clean"]


def worst_case(study: dict, rule: str) -> Bounded:
    """The worst case over every attack of ``study`` under prediction rule ``rule``."""
    saved = study["worst_case"][rule]["all"]
    if saved_per_example(study):
        return Bounded(saved, saved, saved)
    n, k = study["samples"], study["doubling"]["samples"]
    doubled = round(study["doubling"][rule]["doubled"] * k)
    return _bounds(saved, study["clean"]["metrics"][rule]["accuracy"], n, _doubled_alone(study, rule), doubled + n - k)


def per_class(study: dict, rule: str) -> list[Bounded | None]:
    """Per class, the fraction of its examples that survived clean and every attack (None for a class without examples)."""
    saved = study["worst_case"]["per_class"][rule]
    if saved_per_example(study):
        return [None if v is None else Bounded(v, v, v) for v in saved]
    alone = _doubled_alone(study, rule)
    classes = study["clean"]["metrics"][rule]["per_class"]
    return [None if v is None else _bounds(v, c["recall"], c["support"], alone) for v, c in zip(saved, classes, strict=True)]


def mean(figures: list[Bounded]) -> Bounded:
    """The mean of ``figures`` (a balanced accuracy from per-class ones), with the mean of their bounds."""
    return Bounded(*(sum(getattr(f, end) for f in figures) / len(figures) for end in ("saved", "lo", "hi")))


def note(studies: list[dict]) -> str:
    """:data:`NOTE` if any of ``studies`` shows a bounded figure, else ''."""
    return NOTE if any(not worst_case(s, rule).exact for s in studies for rule in ("single", "mc")) else ""


def noted(caption: str, studies: list[dict]) -> str:
    """``caption``, followed by :data:`NOTE` where one of ``studies`` shows a bounded figure."""
    return f"{caption} {NOTE}" if note(studies) else caption


def _doubled_alone(study: dict, rule: str) -> int:
    """At most how many examples the doubled PGD run broke that every other attack left correct (see the module docstring)."""
    doubling = study["doubling"]
    k = doubling["samples"]
    broken = k - round(doubling[rule]["doubled"] * k)
    return broken if study["randomized"] else min(broken, round(doubling[rule]["base"] * k))


def _bounds(saved: float, clean: float, n: int, doubled_alone: int, cap: int | None = None) -> Bounded:
    """The interval of an old figure ``saved`` over ``n`` examples, counted in whole examples (figures are counts / n)."""
    survived, correct = round(saved * n), round(clean * n)
    lo = max(0, survived - (n - correct) - doubled_alone)
    hi = min(survived, correct, n if cap is None else cap)
    return Bounded(saved, lo / n, hi / n)
