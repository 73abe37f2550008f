"""Validation metrics, in plain torch (no scikit-learn at run time)."""

from __future__ import annotations

import torch
from torch import Tensor


def auroc(score: Tensor, label: Tensor) -> float:
    """Area under the ROC curve via the rank-sum (Mann-Whitney U) statistic, ties averaged."""
    label = label.bool()
    n_pos, n_neg = int(label.sum()), int((~label).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # Average the ranks of tied scores so the AUROC of a constant predictor is exactly 0.5.
    _, inverse, counts = torch.unique(score.double(), return_inverse=True, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    ranks = (starts.double() + (counts.double() + 1) / 2)[inverse]
    u = ranks[label].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def average_precision(score: Tensor, label: Tensor) -> float:
    """Average precision: mean of precision at each positive, ranked by descending score."""
    label = label.bool()
    n_pos = int(label.sum())
    if n_pos == 0:
        return float("nan")
    order = torch.argsort(score, descending=True, stable=True)
    hits = label[order].double()
    precision = torch.cumsum(hits, 0) / torch.arange(1, len(hits) + 1, dtype=torch.float64)
    return float((precision * hits).sum() / n_pos)


def mae(pred: Tensor, target: Tensor) -> float:
    return float((pred.double() - target.double()).abs().mean())


def rmse(pred: Tensor, target: Tensor) -> float:
    return float(((pred.double() - target.double()) ** 2).mean().sqrt())


def accuracy(pred: Tensor, target: Tensor) -> float:
    return float((pred == target).double().mean()) if target.numel() else float("nan")


def macro_f1(pred: Tensor, target: Tensor, num_classes: int) -> float:
    """Unweighted mean of per-class F1 over classes present in target or prediction."""
    if target.numel() == 0:
        return float("nan")
    f1s = []
    for c in range(num_classes):
        tp = int(((pred == c) & (target == c)).sum())
        fp = int(((pred == c) & (target != c)).sum())
        fn = int(((pred != c) & (target == c)).sum())
        if tp + fp + fn == 0:
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / len(f1s)


def task_metrics(kind: str, output: Tensor, target: Tensor, num_classes: int = 0) -> dict[str, float]:
    """Metrics of one task; ``output`` in reported units (probability, dollars, class probabilities)."""
    if kind == "binary":
        return {"auroc": auroc(output, target), "ap": average_precision(output, target)}
    if kind == "regression":
        return {"mae": mae(output, target), "rmse": rmse(output, target)}
    pred = output.argmax(dim=-1)
    return {"accuracy": accuracy(pred, target), "macro_f1": macro_f1(pred, target.long(), num_classes)}


def task_score(kind: str, metrics: dict[str, float], baseline_mae: float | None = None) -> float:
    """One number in [0, 1]-ish per task, higher is better, for early stopping on a combined score.

    binary: AUROC; multiclass: macro-F1; regression: 1 - MAE / MAE of predicting the training median
    (so 0 = no better than a constant, 1 = perfect).
    """
    if kind == "binary":
        return metrics["auroc"]
    if kind == "multiclass":
        return metrics["macro_f1"]
    assert baseline_mae is not None and baseline_mae > 0
    return 1.0 - metrics["mae"] / baseline_mae
