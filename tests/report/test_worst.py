"""Worst cases saved before the clean-error fix: an upper bound, and the interval their saved accuracies allow."""

from dipsen.report.worst import NOTE, Bounded, mean, note, per_class, worst_case


def _old_study(randomized: bool, *, old: float, clean: float, base: float, doubled: float, per_class_old: list) -> dict:
    """A study as saved before per-example results: 10 examples (6 of class 0, 4 of class 1), doubling on the first 4."""
    recall = [{"recall": 5 / 6, "support": 6}, {"recall": 1.0, "support": 4}]
    return {
        "samples": 10,
        "randomized": randomized,
        "clean": {"metrics": {rule: {"accuracy": clean, "per_class": recall} for rule in ("single", "mc")}},
        "doubling": {"samples": 4, **{rule: {"base": base, "doubled": doubled} for rule in ("single", "mc")}},
        "worst_case": {
            **{rule: {"all": old} for rule in ("single", "mc")},
            "per_class": {rule: per_class_old for rule in ("single", "mc")},
        },
    }


def test_an_old_figure_is_bounded_by_clean_and_the_doubled_run_and_lowered_by_what_they_may_remove():
    # 8 old survivors; 1 example misclassified clean; the doubled run leaves 0 of its 4 correct
    study = _old_study(True, old=0.8, clean=0.9, base=0.5, doubled=0.0, per_class_old=[5 / 6, 0.75])
    # at most: 0 of the first 4 + all 6 others; at least: 8 - 1 (clean) - 4 (the doubled run's prefix)
    assert worst_case(study, "mc") == Bounded(0.8, 0.3, 0.6)
    assert str(worst_case(study, "mc")) == "0.800† (true value in [0.300, 0.600])"
    # per class: clean recall caps class 0 at 5/6; each class may lose all 4 of the doubled run's prefix
    assert per_class(study, "mc") == [Bounded(5 / 6, 0.0, 5 / 6), Bounded(0.75, 0.0, 0.75)]
    # a deterministic model: the first 4's old survivors are among the 2 that base PGD left correct
    deterministic = _old_study(False, old=0.8, clean=0.9, base=0.5, doubled=0.0, per_class_old=[5 / 6, 0.75])
    assert worst_case(deterministic, "single") == Bounded(0.8, 0.5, 0.6)
    assert note([study]) == NOTE


def test_an_old_figure_of_zero_is_exact_and_a_new_record_is_shown_as_saved():
    zero = _old_study(True, old=0.0, clean=0.9, base=0.0, doubled=0.0, per_class_old=[0.0, 0.0])
    assert worst_case(zero, "mc").exact and str(worst_case(zero, "mc")) == "0.000" and note([zero]) == ""
    new = _old_study(True, old=0.3, clean=0.9, base=0.5, doubled=0.0, per_class_old=[1 / 3, 0.25])
    new["clean"]["correct"] = {"single": "1" * 10, "mc": "1" * 10}  # per-example results saved: the figure is exact
    assert str(worst_case(new, "mc")) == "0.300" and per_class(new, "mc")[1] == Bounded(0.25, 0.25, 0.25)
    assert str(mean([Bounded(0.2, 0.1, 0.2), Bounded(0.4, 0.4, 0.4)])) == "0.300† (true value in [0.250, 0.300])"
