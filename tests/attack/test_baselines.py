"""Reference classifiers: hand-computed stumps, exact worst cases against brute force, and CTU-13."""

import itertools
import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.tree import DecisionTreeClassifier

from dipsen.attack import FeasibleDomain, feasible_domain
from dipsen.attack.baselines import (
    BASELINES,
    dataset_baselines,
    feasible_box,
    linear_worst_decision,
    reference_baselines,
    tree_worst_case,
)
from dipsen.errors import DipsenError

CLASSES = ("normal", "botnet")
VOLUME_ONLY = FeasibleDomain("column 0 of real rows", perturbable_columns=1)


def _windows(bottom, context=None):
    """(N, 1, 2, 2) windows: one context row (constant 0.5 unless given) above the classified row."""
    bottom = np.asarray(bottom, dtype=np.float32)
    context = np.full_like(bottom, 0.5) if context is None else np.asarray(context, dtype=np.float32)
    return np.stack([context, bottom], axis=1)[:, None]


# The informative feature is column 0: class 1 at 0.1-0.3, class 0 at 0.7-0.9, so the stump splits at 0.5.
TRAIN_X = _windows([[0.1, 0.5], [0.2, 0.5], [0.3, 0.5], [0.7, 0.5], [0.8, 0.5], [0.9, 0.5]])
TRAIN_Y = np.array([1, 1, 1, 0, 0, 0])
# Distances to the threshold 0.5: 0.05, 0.3, 0.3, 0.5; the last bottom row is all zero (padding: immovable,
# so it survives eps = 0.6).
EVAL_X = _windows([[0.45, 0.5], [0.2, 0.5], [0.8, 0.5], [0.0, 0.0]])
EVAL_Y = np.array([1, 1, 0, 1])


@pytest.mark.parametrize(("eps", "robust", "robust_recall"), [(0.0, 1.0, 1.0), (0.1, 0.75, 2 / 3), (0.6, 0.25, 1 / 3)])
def test_stump_threshold_and_exact_robust_accuracy_by_hand(eps, robust, robust_recall):
    result = reference_baselines(TRAIN_X, TRAIN_Y, EVAL_X, EVAL_Y, domain=VOLUME_ONLY, eps=eps, classes=CLASSES, slack=0.0)
    stump = result["baselines"]["one-feature"]
    assert stump["column"] == 0 and stump["positive_side"] == "<="
    assert stump["threshold_scaled"] == pytest.approx(0.5, abs=1e-6)
    assert stump["accuracy"] == 1.0 and stump["recall"] == 1.0 and stump["balanced_accuracy"] == 1.0
    assert stump["robust_accuracy"] == pytest.approx(robust)
    assert stump["robust_recall"] == pytest.approx(robust_recall)
    # Class 0 (one example, at 0.8) only falls once eps exceeds 0.3.
    assert stump["robust_balanced_accuracy"] == pytest.approx((robust_recall + (eps < 0.3)) / 2)
    assert stump["attack_accuracy"] == pytest.approx(robust) and stump["robust_exact"]
    majority = result["baselines"]["majority"]
    assert majority["accuracy"] == majority["robust_accuracy"] == 0.25  # trained on 3 vs 3: class 0 (first) wins
    assert result["positive_class"] == "botnet" and set(result["baselines"]) == set(BASELINES)


def test_a_coordinate_the_attacker_cannot_move_keeps_the_stump_robust():
    swap = lambda x: x[..., ::-1].copy()  # noqa: E731 - the informative feature moves to column 1
    result = reference_baselines(
        swap(TRAIN_X), TRAIN_Y, swap(EVAL_X), EVAL_Y, domain=VOLUME_ONLY, eps=0.6, classes=CLASSES, slack=0.0
    )
    stump = result["baselines"]["one-feature"]
    assert stump["column"] == 1
    assert stump["accuracy"] == stump["robust_accuracy"] == 1.0
    everything = FeasibleDomain("every coordinate")  # the same data when column 1 may move too
    moved = reference_baselines(
        swap(TRAIN_X), TRAIN_Y, swap(EVAL_X), EVAL_Y, domain=everything, eps=0.6, classes=CLASSES, slack=0.0
    )["baselines"]["one-feature"]
    assert moved["robust_accuracy"] == 0.0  # the padding row too: nothing is immovable now


def test_threshold_in_original_units():
    result = reference_baselines(
        TRAIN_X,
        TRAIN_Y,
        EVAL_X,
        EVAL_Y,
        domain=VOLUME_ONLY,
        eps=0.1,
        classes=CLASSES,
        feature_names=("TotBytes", "Proto"),
        scaler={"space": "log1p", "TotBytes": {"min": 0.0, "max": 10.0}},
    )
    stump = result["baselines"]["one-feature"]
    assert stump["feature"] == "TotBytes" and stump["unit"] == "bytes"
    assert stump["threshold_original"] == pytest.approx(np.expm1(5.0), rel=1e-5)  # 147.4 bytes: <= 147
    assert "TotBytes of the classified flow <= 147 bytes" in stump["description"]


def test_a_stump_without_a_useful_split_is_reported_as_constant():
    x_train = _windows([[0.3, 0.5]] * 4)  # nothing to split on
    result = reference_baselines(x_train, np.array([1, 1, 1, 0]), EVAL_X, EVAL_Y, domain=VOLUME_ONLY, eps=0.6, classes=CLASSES)
    stump = result["baselines"]["one-feature"]
    assert stump["feature"] is None and stump["description"].startswith("always 'botnet'")
    assert stump["accuracy"] == stump["robust_accuracy"] == 0.75


def test_multiclass_is_refused():
    with pytest.raises(DipsenError, match="binary"):
        reference_baselines(TRAIN_X, TRAIN_Y, EVAL_X, EVAL_Y, domain=VOLUME_ONLY, eps=0.1, classes=("a", "b", "c"))


def _boxes(rng, n, d, eps):
    x = rng.uniform(0, 1, size=(n, d))
    x[rng.uniform(size=x.shape) < 0.1] = rng.choice([0.0, 1.0])  # some coordinates on the edge of [0, 1]
    mask = rng.uniform(size=(n, d)) < 0.7
    lo, hi = feasible_box(x, mask, eps)
    return x, lo, hi


@pytest.mark.parametrize("d", [2, 3, 4])
def test_logistic_worst_case_matches_brute_force_over_the_box_vertices(d):
    rng = np.random.default_rng(d)
    x_train = rng.uniform(size=(200, d))
    y_train = (x_train @ rng.normal(size=d) + 0.3 * rng.normal(size=200) > 0).astype(int)
    model = LogisticRegression(random_state=0).fit(x_train, y_train)
    x, lo, hi = _boxes(rng, 50, d, eps=0.2)
    y = rng.integers(0, 2, size=50)
    worst, vertex = linear_worst_decision(model.coef_[0], float(model.intercept_[0]), lo, hi, y)
    for i in range(len(y)):
        corners = np.array(list(itertools.product(*zip(lo[i], hi[i], strict=True))))
        values = model.decision_function(corners)
        assert worst[i] == pytest.approx(values.min() if y[i] == 1 else values.max(), abs=1e-6)
        assert model.decision_function(vertex[i : i + 1])[0] == pytest.approx(worst[i], abs=1e-6)
        assert np.all((vertex[i] >= lo[i]) & (vertex[i] <= hi[i]))


def test_logistic_robust_accuracy_of_the_entry_point_matches_brute_force():
    rng = np.random.default_rng(7)
    x_train = rng.uniform(size=(300, 1, 2, 2)).astype(np.float32)
    y_train = (x_train.reshape(300, -1) @ [1.0, -2.0, 3.0, -1.0] + 0.2 * rng.normal(size=300) > 0.5).astype(np.int64)
    x_eval = rng.uniform(size=(60, 1, 2, 2)).astype(np.float32)
    y_eval = rng.integers(0, 2, size=60)
    eps = 0.08
    for domain in (FeasibleDomain("everything"), VOLUME_ONLY):
        result = reference_baselines(x_train, y_train, x_eval, y_eval, domain=domain, eps=eps, classes=CLASSES, slack=0.0)[
            "baselines"
        ]["logistic"]
        model = LogisticRegression(max_iter=1000, random_state=0).fit(x_train.reshape(300, -1), y_train)
        mask = np.ones(x_eval.shape, bool) if domain.mask(x_eval) is None else domain.mask(x_eval).astype(bool)
        lo, hi = feasible_box(x_eval.reshape(60, -1), mask.reshape(60, -1), eps)
        survived = [
            np.all(model.predict(np.array(list(itertools.product(*zip(lo[i], hi[i], strict=True))))) == y_eval[i])
            for i in range(60)
        ]
        assert result["robust_accuracy"] == pytest.approx(np.mean(survived))
        assert 0 < result["robust_accuracy"] < result["accuracy"]  # the check is not vacuous


def _brute_force_tree(tree, lo, hi, y):
    """Broken iff some candidate point (box ends, x, each threshold and the float32 just above it) is misclassified."""
    t = tree.tree_
    broken = []
    for i in range(len(y)):
        axes = []
        for f in range(lo.shape[1]):
            thresholds = t.threshold[t.feature == f]
            above = np.nextafter(thresholds.astype(np.float32), np.float32(np.inf)).astype(np.float64)
            values = np.concatenate([[lo[i, f], hi[i, f]], thresholds, above])
            axes.append(np.unique(values[(values >= lo[i, f]) & (values <= hi[i, f])]))
        points = np.array(list(itertools.product(*axes)))
        broken.append(bool(np.any(tree.predict(points) != y[i])))
    return np.array(broken)


@pytest.mark.parametrize(("d", "depth"), [(2, 1), (2, 2), (3, 2), (3, 3)])
def test_tree_worst_case_matches_brute_force(d, depth):
    rng = np.random.default_rng(10 * d + depth)
    x_train = rng.uniform(size=(300, d))
    y_train = ((x_train[:, 0] > 0.4) ^ (x_train[:, 1] < 0.6) ^ (rng.uniform(size=300) < 0.1)).astype(int)
    tree = DecisionTreeClassifier(max_depth=depth, random_state=0).fit(x_train, y_train)
    for eps in (0.03, 0.15):
        x, lo, hi = _boxes(rng, 80, d, eps)
        y = rng.integers(0, 2, size=80)
        broken, witness = tree_worst_case(tree, x, lo, hi, y)
        assert np.array_equal(broken, _brute_force_tree(tree, lo, hi, y))
        assert 0 < broken.sum() < len(y)
        w = witness[broken]
        assert np.all((w >= lo[broken]) & (w <= hi[broken]))
        assert np.all(tree.predict(w) != y[broken])  # the witness is a real counterexample


@pytest.fixture(scope="module")
def ctu13():
    from dipsen.data import load_dataset

    return load_dataset("ctu13")


def test_ctu13_baselines(ctu13):
    result = dataset_baselines(ctu13, eps=0.3)
    json.dumps(result)  # plain values only
    baselines = result["baselines"]
    majority = np.bincount(ctu13.y_train).argmax()
    assert baselines["majority"]["accuracy"] == pytest.approx(np.mean(ctu13.y_test == majority))
    assert baselines["majority"]["accuracy"] == pytest.approx(np.bincount(ctu13.y_test).max() / len(ctu13.y_test))
    stump = baselines["one-feature"]
    assert stump["accuracy"] >= 0.9 and stump["feature"] in ("Dur", "TotPkts", "TotBytes", "SrcBytes", "Proto", "DportClass")
    for name, entry in baselines.items():
        assert entry["robust_accuracy"] <= entry["attack_accuracy"] <= entry["accuracy"], name
        assert entry["robust_recall"] <= entry["recall"], name
    assert feasible_domain(ctu13).description == result["domain"]
    assert dataset_baselines(ctu13, 0.3, ctu13.x_test[:200], ctu13.y_test[:200])["samples"] == 200
