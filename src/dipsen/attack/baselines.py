"""Reference classifiers that show how hard a binary task is, clean and under the strongest attack.

Beside every CTU-13 model figure the report shows what trivial rules achieve on the same examples:

- ``majority``:        always the most frequent training class;
- ``one-feature``:     the best single threshold on one feature of the classified flow (the bottom
                       row): a depth-1 decision tree on the bottom row's features;
- ``tree-bottom-row``: a depth-2 decision tree on the bottom row;
- ``tree-context``:    a depth-2 decision tree on the context rows only (every row but the bottom one:
                       the host's earlier flows, never the flow being classified);
- ``logistic``:        L2 logistic regression (C = 1, lbfgs) on the flattened window.

Every rule is fitted on the training examples only. Each gets clean accuracy, balanced accuracy
(mean of the per-class recalls) and the recall of the positive class (class 1, named by ``classes``),
and the same three figures under the strongest possible attack at ``eps`` inside the feasible domain
(:class:`~dipsen.attack.domain.FeasibleDomain`): the attacker may move each perturbable coordinate
(``domain.mask``: on CTU-13 the four volume features of real, non-padding flows) by at most ``eps``
and within [0, 1]; nothing else changes.

How the attacked figures are computed, and what they guarantee
----------------------------------------------------------------
No attack algorithm is run: the worst case is computed, per example, over the *relaxed* domain, the
box ``{x' : x'_j in [clip(x_j - eps - slack, 0, 1), clip(x_j + eps + slack, 0, 1)] for perturbable j,
x'_j = x_j otherwise}`` with real-valued coordinates. The relaxation ignores the integer snapping of
packet and byte counts that :meth:`FeasibleDomain.project` applies, and ``slack`` (default 1e-5) widens
the box to cover float32 rounding and the projection's 1e-6 snapping tolerance. Every input the real
domain can produce lies in this box, so:

    ``robust_*``  exact for the relaxed box, hence a LOWER bound on the true robust figure: no attack
                  inside the feasible domain can push the classifier below it (the true robust
                  accuracy over the integer-snapped domain is >= ``robust_accuracy``).

- majority: the prediction does not depend on x; robust = clean.
- trees (axis-aligned thresholds, depth 1 and 2; sklearn goes left iff x_f <= t): every leaf is the
  box of its path's constraints l_f < x_f <= u_f. An example is broken iff it is misclassified or a
  leaf whose label differs from its true label intersects the feasible box, i.e. lo_f <= u_f and
  hi_f > l_f on every constrained feature. Leaves are enumerated from sklearn's ``tree_`` arrays.
- logistic regression (binary, decision f(x) = w.x + b, class 1 iff f > 0): f is linear, so its
  minimum (true class 1) or maximum (true class 0) over the box is attained coordinate by coordinate:
  each perturbable coordinate goes to the end of its interval that works against the true class. An
  example is broken iff min f <= 0 (class 1) or max f > 0 (class 0).

An UPPER bound comes with it: for every broken example the worst case's witness (a point of the
wrong leaf, or the worst vertex of the box) is passed through ``domain.project`` (counts snapped to
integers) and given to the classifier. ``attack_*`` are the figures under that concrete, feasible
attack (together with the unperturbed input), so the true robust accuracy lies in
[``robust_accuracy``, ``attack_accuracy``]; ``robust_exact`` says whether the two coincide on every
example, in which case ``robust_*`` are exact for the real domain too.

Values are plain floats, ints, strings and lists (JSON-serialisable); a recall of a class missing
from the evaluated examples is None. Rendering is left to the report.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.tree import DecisionTreeClassifier

from ..data import Dataset
from ..errors import DipsenError
from .domain import FeasibleDomain, feasible_domain

BASELINES = ("majority", "one-feature", "tree-bottom-row", "tree-context", "logistic")
POSITIVE = 1
SLACK = 1e-5
LOGISTIC_MAX_ITER = 1000
UNITS = {"Dur": "s", "TotPkts": "packets", "TotBytes": "bytes", "SrcBytes": "bytes"}
INTEGER_FEATURES = ("TotPkts", "TotBytes", "SrcBytes")
GUARANTEES = {
    "constant": "constant prediction: robust = clean",
    "relaxed": "exact over the real-valued box (integer snapping of counts ignored): a lower bound on the "
    "true robust figure; attack_* is an upper bound from a concrete projected attack",
}


def reference_baselines(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_eval: np.ndarray,
    y_eval: np.ndarray,
    *,
    domain: FeasibleDomain,
    eps: float,
    classes: Sequence[str],
    feature_names: Sequence[str] | None = None,
    scaler: dict | None = None,
    seed: int = 0,
    slack: float = SLACK,
) -> dict:
    """The five reference classifiers, fitted on (x_train, y_train), measured on (x_eval, y_eval).

    ``x_*`` are windows of shape (N, ..., rows, features) with at least 2 rows; the bottom row is the
    classified flow, the rows above it the context. ``feature_names`` (one per column) and ``scaler``
    (``dataset.info["scaler"]``: min-max of log1p values) only label the rules and turn their
    thresholds back into original units. See the module docstring for the figures and their guarantees.
    """
    classes = tuple(classes)
    if len(classes) != 2:
        raise DipsenError(f"reference baselines need a binary task, got {len(classes)} classes")
    x_train, x_eval = np.asarray(x_train), np.asarray(x_eval)
    y_train, y_eval = np.asarray(y_train).astype(np.int64), np.asarray(y_eval).astype(np.int64)
    if x_train.ndim < 3 or x_train.shape[-2] < 2 or x_train.shape[1:] != x_eval.shape[1:]:
        raise DipsenError(
            f"reference baselines need windows (N, ..., rows >= 2, features) of one shape, got {x_train.shape} and {x_eval.shape}"
        )
    if len(y_train) != len(x_train) or len(y_eval) != len(x_eval) or not len(y_eval):
        raise DipsenError(
            f"reference baselines: {len(x_train)}/{len(y_train)} training and "
            f"{len(x_eval)}/{len(y_eval)} evaluation examples/labels"
        )
    if set(np.unique(y_train)) != {0, 1} or not set(np.unique(y_eval)) <= {0, 1}:
        raise DipsenError("reference baselines need labels 0 and 1, both present in the training set")
    if not 0 <= eps <= 1:
        raise DipsenError(f"eps must be in [0, 1], got {eps}")
    width = x_train.shape[-1]
    if feature_names is not None and len(feature_names) != width:
        raise DipsenError(f"{len(feature_names)} feature names for {width} columns")

    mask = domain.mask(x_eval)
    mask = np.ones(x_eval.shape, dtype=bool) if mask is None else mask.astype(bool)
    lo, hi = feasible_box(x_eval, mask, eps, slack)
    namer = _Namer(x_train.shape[1:], feature_names, scaler)
    ctx = _Context(x_eval, y_eval, lo, hi, domain, eps, classes)

    majority = int(np.bincount(y_train, minlength=2).argmax())
    results = {"majority": ctx.constant(majority)}
    trees = {}
    for name, depth, view in (("one-feature", 1, "bottom"), ("tree-bottom-row", 2, "bottom"), ("tree-context", 2, "context")):
        trees[name] = DecisionTreeClassifier(max_depth=depth, random_state=seed).fit(_view(x_train, view), y_train)
        results[name] = ctx.tree(trees[name], view, namer)
    logistic = LogisticRegression(max_iter=LOGISTIC_MAX_ITER, random_state=seed)
    logistic.fit(_view(x_train, "all"), y_train)
    results["logistic"] = ctx.logistic(logistic)

    results["majority"]["description"] = f"always {classes[majority]!r}, the most frequent training class"
    results["one-feature"].update(_stump_rule(trees["one-feature"], classes, namer))
    results["tree-bottom-row"]["description"] = "depth-2 decision tree on the classified flow (bottom row)"
    results["tree-context"]["description"] = "depth-2 decision tree on the context rows only (bottom row left out)"
    results["logistic"]["description"] = (
        f"logistic regression (L2, C=1, lbfgs, max_iter={LOGISTIC_MAX_ITER}, seed {seed}) on the flattened window"
    )
    counts = np.bincount(y_eval, minlength=2)
    return {
        "eps": float(eps),
        "slack": float(slack),
        "samples": int(len(y_eval)),
        "train_samples": int(len(y_train)),
        "classes": list(classes),
        "positive_class": classes[POSITIVE],
        "eval_class_counts": {name: int(c) for name, c in zip(classes, counts, strict=True)},
        "domain": domain.description,
        "baselines": results,
    }


def dataset_baselines(
    dataset: Dataset,
    eps: float,
    x_eval: np.ndarray | None = None,
    y_eval: np.ndarray | None = None,
    *,
    seed: int = 0,
    slack: float = SLACK,
) -> dict:
    """:func:`reference_baselines` of ``dataset``: fitted on its training split, measured on (x_eval, y_eval).

    Pass the examples the models are attacked on (``RobustnessEvaluation.data``); None takes the
    whole test set.
    """
    if x_eval is None or y_eval is None:
        x_eval, y_eval = dataset.x_test, dataset.y_test
    features = dataset.info.get("features")
    names = (
        [f["name"] for f in features]
        if isinstance(features, list) and all(isinstance(f, dict) and "name" in f for f in features)
        else None
    )
    if names is not None and len(names) != x_eval.shape[-1]:
        names = None
    return reference_baselines(
        dataset.x_train,
        dataset.y_train,
        x_eval,
        y_eval,
        domain=feasible_domain(dataset),
        eps=eps,
        classes=dataset.classes,
        feature_names=names,
        scaler=dataset.info.get("scaler"),
        seed=seed,
        slack=slack,
    )


def feasible_box(x: np.ndarray, mask: np.ndarray, eps: float, slack: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Per-coordinate bounds (float64) of the relaxed feasible set around ``x``: see the module docstring."""
    x = x.astype(np.float64)
    reach = eps + slack
    lo = np.where(mask, np.clip(x - reach, 0.0, 1.0), x)
    hi = np.where(mask, np.clip(x + reach, 0.0, 1.0), x)
    return np.minimum(lo, x), np.maximum(hi, x)


def tree_leaves(tree: DecisionTreeClassifier) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every leaf of a fitted tree as a box l < x <= u: (leaf node ids, labels, l, u), l and u (leaves, features)."""
    t = tree.tree_
    n_features = tree.n_features_in_
    nodes, labels, lower, upper = [], [], [], []
    stack = [(0, np.full(n_features, -np.inf), np.full(n_features, np.inf))]
    while stack:
        node, low, up = stack.pop()
        left, right = t.children_left[node], t.children_right[node]
        if left == right:  # a leaf (both are -1)
            nodes.append(node)
            labels.append(tree.classes_[int(np.argmax(t.value[node, 0]))])
            lower.append(low)
            upper.append(up)
            continue
        feature, threshold = t.feature[node], t.threshold[node]
        up_left, low_right = up.copy(), low.copy()
        up_left[feature] = min(up[feature], threshold)
        low_right[feature] = max(low[feature], threshold)
        stack += [(right, low_right, up), (left, low, up_left)]
    return np.array(nodes), np.array(labels), np.array(lower), np.array(upper)


def tree_worst_case(
    tree: DecisionTreeClassifier,
    x: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    y: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Per example: whether a leaf labelled != y meets the box [lo, hi] around x, and a point of the first one.

    Returns (broken, witness), both per example. The witness is x, except on the features that leaf
    constrains, where it is the midpoint of the leaf's interval intersected with [lo, hi]; it is NaN
    for examples that are not broken.
    """
    _, labels, lower, upper = tree_leaves(tree)
    lo, hi = lo[:, None, :], hi[:, None, :]
    reachable = np.all((lo <= upper) & (hi > lower) & (lower < upper), axis=2)  # (examples, leaves)
    wrong = reachable & (labels[None, :] != y[:, None])
    broken = wrong.any(axis=1)
    leaf = wrong.argmax(axis=1)
    a = np.maximum(lo[:, 0], lower[leaf])
    b = np.minimum(hi[:, 0], upper[leaf])
    constrained = np.isfinite(lower[leaf]) | np.isfinite(upper[leaf])
    witness = np.where(constrained, (a + b) / 2, x)
    return broken, np.where(broken[:, None], witness, np.nan)


def linear_worst_decision(
    w: np.ndarray,
    b: float,
    lo: np.ndarray,
    hi: np.ndarray,
    y: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """For f(x) = w.x + b over the box [lo, hi]: min f where y = 1, max f where y = 0, and the vertex attaining it."""
    against = np.where(y[:, None] == 1, -1.0, 1.0) * w[None, :]  # the direction that hurts the true class
    vertex = np.where(against > 0, hi, np.where(against < 0, lo, (lo + hi) / 2))
    return vertex @ w + b, vertex


class _Context:
    """The evaluated examples, their feasible box and the attack needed to check the witnesses."""

    def __init__(self, x, y, lo, hi, domain, eps, classes):
        self.x, self.y, self.lo, self.hi = x, y, lo, hi
        self.domain, self.eps, self.classes = domain, eps, classes

    def constant(self, label: int) -> dict:
        correct = self.y == label
        return {
            "description": "",
            **_scores("", self.y, correct),
            **_scores("robust_", self.y, correct),
            **_scores("attack_", self.y, correct),
            "robust_exact": True,
            "guarantee": GUARANTEES["constant"],
        }

    def tree(self, tree: DecisionTreeClassifier, view: str, namer: _Namer) -> dict:
        clean = tree.predict(_view(self.x, view)) == self.y
        broken, witness = tree_worst_case(
            tree, _view(self.x, view).astype(np.float64), _view(self.lo, view), _view(self.hi, view), self.y
        )
        attacked = self._attack(witness, broken, view, tree.predict)
        return self._figures(clean, clean & ~broken, attacked) | {"rules": namer.rules(tree, view, self.classes)}

    def logistic(self, model: LogisticRegression) -> dict:
        x = _view(self.x, "all")
        clean = model.predict(x) == self.y
        w, b = model.coef_[0].astype(np.float64), float(model.intercept_[0])
        worst, vertex = linear_worst_decision(w, b, _view(self.lo, "all"), _view(self.hi, "all"), self.y)
        broken = np.where(self.y == 1, worst <= 0, worst > 0)
        attacked = self._attack(np.where(broken[:, None], vertex, np.nan), broken, "all", model.predict)
        return self._figures(clean, clean & ~broken, attacked) | {"iterations": int(model.n_iter_[0])}

    def _attack(self, witness: np.ndarray, broken: np.ndarray, view: str, predict) -> np.ndarray:
        """Correct after the witnesses are projected into the real domain (unbroken examples stay as they are)."""
        x_adv = self.x.astype(np.float64)
        flat = _view(x_adv, view).copy()
        flat[broken] = witness[broken]
        x_adv = _unview(x_adv, flat, view)
        projected = self.domain.project(x_adv.astype(np.float32), self.x, self.eps)
        return predict(_view(projected, view)) == self.y

    def _figures(self, clean: np.ndarray, robust: np.ndarray, attacked: np.ndarray) -> dict:
        attacked = attacked & clean
        if np.any(robust & ~attacked):  # cannot happen: the witness lies in the box
            raise AssertionError("a concrete attack broke an example the exact worst case called robust")
        return {
            "description": "",
            **_scores("", self.y, clean),
            **_scores("robust_", self.y, robust),
            **_scores("attack_", self.y, attacked),
            "robust_exact": bool(np.array_equal(robust, attacked)),
            "guarantee": GUARANTEES["relaxed"],
        }


def _scores(prefix: str, y: np.ndarray, correct: np.ndarray) -> dict:
    recalls = {c: float(correct[y == c].mean()) if np.any(y == c) else None for c in (0, 1)}
    present = [r for r in recalls.values() if r is not None]
    return {
        f"{prefix}accuracy": float(correct.mean()),
        f"{prefix}balanced_accuracy": float(np.mean(present)),
        f"{prefix}recall": recalls[POSITIVE],
    }


def _view(x: np.ndarray, view: str) -> np.ndarray:
    """(N, d) features of a view: the bottom row, the context rows, or the whole window."""
    part = {"bottom": x[..., -1, :], "context": x[..., :-1, :], "all": x}[view]
    return part.reshape(len(x), -1)


def _unview(x: np.ndarray, flat: np.ndarray, view: str) -> np.ndarray:
    out = x.copy()
    if view == "bottom":
        out[..., -1, :] = flat.reshape(out[..., -1, :].shape)
    elif view == "context":
        out[..., :-1, :] = flat.reshape(out[..., :-1, :].shape)
    else:
        out = flat.reshape(x.shape)
    return out


class _Namer:
    """Names of a view's features and thresholds in original units (from a log1p min-max scaler)."""

    def __init__(self, shape: tuple[int, ...], feature_names: Sequence[str] | None, scaler: dict | None):
        self.shape = shape  # one example's shape: (..., rows, features)
        self.names = list(feature_names) if feature_names is not None else [f"f{j}" for j in range(shape[-1])]
        self.scaler = scaler if scaler and scaler.get("space") == "log1p" else {}

    def column(self, index: int, view: str) -> tuple[int, str]:
        """The window column and a readable name of feature ``index`` of ``view``."""
        if view == "bottom":
            return index, f"{self.names[index]} of the classified flow"
        if view == "context":
            where = np.unravel_index(index, (*self.shape[:-2], self.shape[-2] - 1, self.shape[-1]))
        else:
            where = np.unravel_index(index, self.shape)
        row, column = int(where[-2]), int(where[-1])
        back = self.shape[-2] - 1 - row
        return column, f"{self.names[column]} of " + ("the classified flow" if back == 0 else f"flow -{back}")

    def original(self, column: int, threshold: float) -> float | None:
        entry = self.scaler.get(self.names[column])
        if not isinstance(entry, dict):
            return None
        return float(np.expm1(threshold * (entry["max"] - entry["min"]) + entry["min"]))

    def condition(self, name: str, column: int, side: str, threshold: float) -> str:
        """``name side threshold`` in original units where the scaler knows the column, e.g. "TotBytes <= 186 bytes".

        Integer counts are shown as the integer the rule really splits at (x <= 186.997 is x <= 186).
        """
        value = self.original(column, threshold)
        if value is None:
            return f"{name} {side} {threshold:.4g}"
        feature = self.names[column]
        shown = f"{np.floor(value + 1e-6):.0f}" if feature in INTEGER_FEATURES else f"{value:.4g}"
        unit = UNITS.get(feature, "")
        return f"{name} {side} {shown}{' ' + unit if unit else ''} (scaled {threshold:.4g})"

    def rules(self, tree: DecisionTreeClassifier, view: str, classes: Sequence[str]) -> list[str]:
        """One line per leaf: its path's conditions -> its label."""
        _, labels, lower, upper = tree_leaves(tree)
        lines = []
        for label, low, up in zip(labels, lower, upper, strict=True):
            conditions = []
            for feature in np.flatnonzero(np.isfinite(low) | np.isfinite(up)):
                column, name = self.column(int(feature), view)
                if np.isfinite(low[feature]):
                    conditions.append(self.condition(name, column, ">", low[feature]))
                if np.isfinite(up[feature]):
                    conditions.append(self.condition(name, column, "<=", up[feature]))
            lines.append(f"{' and '.join(conditions) or 'always'} -> {classes[int(label)]}")
        return lines


def _stump_rule(stump: DecisionTreeClassifier, classes: Sequence[str], namer: _Namer) -> dict:
    """The one-feature rule: which feature, its threshold (scaled and original), which side is positive."""
    rule = {
        "feature": None,
        "column": None,
        "threshold_scaled": None,
        "threshold_original": None,
        "unit": None,
        "positive_side": None,
        "rule": None,
    }
    t = stump.tree_
    labels = [int(stump.classes_[int(np.argmax(t.value[child, 0]))]) for child in (t.children_left[0], t.children_right[0])]
    if t.node_count == 1 or labels[0] == labels[1]:
        label = int(stump.classes_[int(np.argmax(t.value[0, 0]))]) if t.node_count == 1 else labels[0]
        return rule | {
            "description": f"always {classes[label]!r}: no single threshold on the classified flow "
            "separates the classes (depth-1 tree)"
        }
    column, threshold = int(t.feature[0]), float(t.threshold[0])
    name = namer.names[column]
    original = namer.original(column, threshold)
    side = "<=" if labels[0] == POSITIVE else ">"
    condition = namer.condition(f"{name} of the classified flow", column, side, threshold)
    return rule | {
        "feature": name,
        "column": column,
        "threshold_scaled": threshold,
        "threshold_original": original,
        "unit": UNITS.get(name) if original is not None else None,
        "positive_side": side,
        "rule": condition,
        "description": f"{classes[POSITIVE]} iff {condition} (best depth-1 tree on the bottom row)",
    }
