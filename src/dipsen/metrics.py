"""Classification metrics of a global model: accuracy, precision, recall, F1, support (scikit-learn)."""

from __future__ import annotations

import numpy as np
from torch import nn

from .models import predict_proba, prediction_rule


def predict_labels(model: nn.Module, x: np.ndarray, mc_samples: int = 1) -> np.ndarray:
    return predict_proba(model, x, mc_samples).argmax(axis=1)


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, class_names: tuple[str, ...] | list[str]) -> dict:
    """Accuracy, macro and weighted precision/recall/F1, and per-class figures with support."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support  # slow to import: only here

    labels = list(range(len(class_names)))
    result: dict = {"accuracy": float(accuracy_score(y_true, y_pred)), "samples": int(len(y_true))}
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=average, zero_division=0)
        result[average] = {"precision": float(p), "recall": float(r), "f1": float(f)}
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    result["per_class"] = [
        {"class": name, "precision": float(pi), "recall": float(ri), "f1": float(fi), "support": int(si)}
        for name, pi, ri, fi, si in zip(class_names, p, r, f, s, strict=True)
    ]
    return result


def evaluate_model(model: nn.Module, x: np.ndarray, y: np.ndarray, class_names, mc_samples: int = 1) -> dict:
    """Metrics of ``model`` on (x, y), labelled with the prediction rule that produced them."""
    metrics = classification_metrics(y, predict_labels(model, x, mc_samples), class_names)
    metrics["prediction_rule"] = prediction_rule(model, mc_samples)
    return metrics
