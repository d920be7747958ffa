"""The GLUE metrics (:func:`compute_metrics`), as fractions in ``[0, 1]`` (multiply by 100 for the usual
tables).

``"main"`` follows the GLUE leaderboard: a task with two metrics scores their mean (MRPC/QQP: mean of F1
and accuracy; STS-B: mean of Pearson and Spearman); CoLA scores Matthews correlation; the rest accuracy
(MNLI: each of matched / mismatched separately).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from sora_jax.data.tasks import GlueDataError, get_task


def _correlation(fn: Any, x: np.ndarray, y: np.ndarray) -> float:
    """``fn(x, y)`` statistic; 0.0 where undefined (constant input), as sklearn does for MCC."""
    if x.size < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return 0.0
    return float(fn(x, y).statistic)


def compute_metrics(
    task: str, predictions: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None
) -> dict[str, float]:
    """GLUE metrics as fractions, plus ``"main"`` (see module docstring for the convention).

    ``predictions``: ``(N,)`` class ids or ``(N, C)`` logits (argmax), or ``(N,)`` / ``(N, 1)`` scores for
    STS-B. ``labels: (N,)``. ``weights: (N,)`` optional; rows with weight 0 (batch padding) are dropped.
    Returns accuracy (classification); ``f1`` (positive class 1) and accuracy (MRPC, QQP);
    ``matthews_corrcoef`` (CoLA); ``pearson``, ``spearman`` (STS-B).
    """
    from scipy import stats
    from sklearn import metrics as skm

    spec = get_task(task)
    preds = np.asarray(predictions)
    labels = np.asarray(labels)
    if spec.is_regression:
        if preds.ndim == 2 and preds.shape[1] == 1:
            preds = preds[:, 0]
    elif preds.ndim == 2:
        preds = preds.argmax(axis=-1)
    if preds.ndim != 1 or preds.shape != labels.shape:
        raise GlueDataError(
            f"compute_metrics({spec.name!r}): predictions {np.asarray(predictions).shape} do not match labels "
            f"{labels.shape}; pass (N,) predictions or (N, C) logits for N labels."
        )
    if weights is not None:
        keep = np.asarray(weights) > 0
        preds, labels = preds[keep], labels[keep]
    if labels.size == 0:
        raise GlueDataError(f"compute_metrics({spec.name!r}): no examples with nonzero weight.")
    out: dict[str, float] = {}
    if spec.is_regression:
        p, y = preds.astype(np.float64), labels.astype(np.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out["pearson"] = _correlation(stats.pearsonr, p, y)
            out["spearman"] = _correlation(stats.spearmanr, p, y)
        out["pearson_spearman_mean"] = (out["pearson"] + out["spearman"]) / 2
    else:
        out["accuracy"] = float(skm.accuracy_score(labels, preds))
        if spec.name == "cola":
            out["matthews_corrcoef"] = float(skm.matthews_corrcoef(labels, preds))
        if "f1" in spec.metric_names:
            out["f1"] = float(skm.f1_score(labels, preds, pos_label=1, average="binary", zero_division=0.0))
            out["f1_accuracy_mean"] = (out["f1"] + out["accuracy"]) / 2
    out["main"] = out[spec.main_metric]
    return out
