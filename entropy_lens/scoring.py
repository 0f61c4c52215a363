"""How well a prediction matches what happened, and the tables every run reports.

One home for: the agreement of a per-token ΔH prediction with the measured ΔH
(:func:`score_estimator`, :func:`score_frame`), the per-quadrant table (:func:`quadrant_table`,
labels :data:`QUADRANT_LABELS`, ``Q0`` = tokens with A = 0), the notes every run summary carries
(:func:`zero_advantage_notes`) and the accuracy–entropy fit R = −a·exp(H) + b
(:func:`fit_entropy_accuracy`). All ΔH values are in nats.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Mapping

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    import torch

#: Quadrant labels, indexed by the ``quadrant`` column's value; ``Q0`` holds the tokens with A = 0.
QUADRANT_LABELS = ("Q0", "Q1", "Q2", "Q3", "Q4")


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float("nan")


def score_estimator(pred: np.ndarray, measured: np.ndarray) -> dict[str, float]:
    """Agreement of a per-token prediction ``[N]`` with the measured ΔH ``[N]`` (nats, same tokens).

    ``pcc``: Pearson; ``srcc``: Spearman (Pearson of average ranks); ``mse``: mean squared error;
    ``sign_agreement``: share of tokens with a non-zero prediction whose sign matches; ``total_pred``
    and ``total_measured``: batch sums; ``n``: tokens. Correlations are NaN when either side is
    constant.
    """
    pred = np.asarray(pred, dtype=np.float64)
    measured = np.asarray(measured, dtype=np.float64)
    nz = pred != 0
    return {
        "pcc": _pearson(pred, measured),
        "srcc": _pearson(pd.Series(pred).rank().to_numpy(), pd.Series(measured).rank().to_numpy()),
        "mse": float(np.mean((pred - measured) ** 2)),
        "sign_agreement": float(np.mean(np.sign(pred[nz]) == np.sign(measured[nz]))) if nz.any() else float("nan"),
        "total_pred": float(pred.sum()),
        "total_measured": float(measured.sum()),
        "n": int(len(pred)),
    }


def score_frame(frame: pd.DataFrame, lr: float, n_tokens: int, names: Iterable[str] | None = None) -> dict[str, dict[str, float]]:
    """:func:`score_estimator` of every estimator column of a tokens frame against ``dh_measured``.

    Each column is first turned into a ΔH prediction in nats by
    :func:`entropy_lens.estimators.scaled_prediction` (η = ``lr``, L = ``n_tokens``). ``names``:
    the estimators to score (default: every one in :data:`entropy_lens.estimators.ESTIMATORS`
    present in the frame).
    """
    import torch  # the scaling is torch code; importing scoring stays light for the figures

    from entropy_lens import estimators as est

    measured = frame["dh_measured"].to_numpy()
    names = [n for n in (names if names is not None else est.ESTIMATORS) if n in frame.columns]
    return {
        name: score_estimator(est.scaled_prediction(name, torch.tensor(frame[name].to_numpy()), lr, n_tokens).numpy(), measured)
        for name in names
    }


def quadrant_table(
    quadrant: np.ndarray, values: Mapping[str, np.ndarray], labels: tuple[str, ...] = QUADRANT_LABELS
) -> dict[str, dict[str, float]]:
    """Per quadrant: ``n_tokens``, ``token_share`` and the sum of every value column (nats).

    ``quadrant`` ``[N]`` ints 0..4 (one per valid token); ``values`` name → ``[N]``;
    ``labels``: which quadrants to report (``QUADRANT_LABELS[1:]`` leaves out Q0). Shares are of
    all N tokens, so the reported shares sum to 1 only when every quadrant is reported.
    """
    quadrant = np.asarray(quadrant)
    n = max(len(quadrant), 1)
    out = {}
    for label in labels:  # at most five quadrants
        sel = quadrant == QUADRANT_LABELS.index(label)
        row = {"n_tokens": int(sel.sum()), "token_share": float(sel.sum()) / n}
        for name, v in values.items():
            row[name] = float(np.asarray(v, dtype=np.float64)[sel].sum())
        out[label] = row
    return out


def zero_advantage_notes(group_id: torch.Tensor, seq_adv: torch.Tensor) -> list[str]:
    """A note when some groups have all-equal rewards (advantage 0: no update from them).

    ``group_id`` ``[B]``; ``seq_adv`` ``[B]`` per-sequence advantage magnitude (any token's |A|).
    """
    groups = group_id.unique()
    zero = int(sum(1 for g in groups if bool((seq_adv[group_id == g] == 0).all())))  # loop over groups
    if not zero:
        return []
    return [f"{zero} of {len(groups)} groups have equal rewards: advantage 0, no update from them"]


def fit_entropy_accuracy(entropy: np.ndarray, accuracy: np.ndarray) -> dict[str, float]:
    """Least-squares fit of R = −a·exp(H) + b (Cui et al., arXiv 2505.22617).

    Linear in the regressors (exp(H), 1), so the closed form is ordinary least squares:
    with x = exp(H), a = −Cov(x, R)/Var(x), b = mean R + a·mean x. ``r2`` = 1 − SS_res/SS_tot.
    Returns ``a, b, r2, n``; NaN when fewer than 3 points or x is constant.
    """
    h = np.asarray(entropy, dtype=np.float64)
    r = np.asarray(accuracy, dtype=np.float64)
    ok = np.isfinite(h) & np.isfinite(r)
    h, r = h[ok], r[ok]
    nan = {"a": float("nan"), "b": float("nan"), "r2": float("nan"), "n": int(h.size)}
    if h.size < 3:
        return nan
    x = np.exp(h)
    dx = x - x.mean()
    var = float((dx * dx).sum())
    if var <= 0:
        return nan
    a = -float((dx * (r - r.mean())).sum()) / var
    b = float(r.mean()) + a * float(x.mean())
    res = r - (-a * x + b)
    ss_tot = float(((r - r.mean()) ** 2).sum())
    r2 = 1.0 - float((res * res).sum()) / ss_tot if ss_tot > 0 else float("nan")
    return {"a": a, "b": b, "r2": r2, "n": int(h.size)}
