"""The per-step record of ``metrics.jsonl`` and reading/writing the log (pass@k: :mod:`entropy_lens.passk`).

One JSON object per RL step, exactly these keys (:data:`METRIC_KEYS`) plus the optional
``eval_accuracy``, ``pass_at_k``, ``truncated_frac`` (share of responses that hit the length limit)
and ``sampling`` (DAPO dynamic sampling: rounds, groups_sampled, groups_kept, groups_filled)::

    step, method, seed, reward_mean, accuracy, entropy_mean, clip_frac_high, clip_frac_low,
    weight_mean, weight_std, weight_min, weight_max,
    quadrant: {Q1..Q4: {token_share, dh_pred, dh_measured}},
    dh_pred: {omega_paper, dh_all_logit, dh_cov, dh_jvp}, dh_measured, loss, wall_s

Units: entropies and ΔH in nats; ``dh_*`` are batch sums over the step's valid response tokens.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from entropy_lens import scoring
from entropy_lens.io.tables import read_metrics
from entropy_lens.io.writers import atomic_write_bytes

METRIC_KEYS = (
    "step", "method", "seed", "reward_mean", "accuracy", "entropy_mean", "clip_frac_high", "clip_frac_low",
    "weight_mean", "weight_std", "weight_min", "weight_max", "quadrant", "dh_pred", "dh_measured", "loss", "wall_s",
)
OPTIONAL_KEYS = ("eval_accuracy", "pass_at_k", "truncated_frac", "sampling")
QUADRANT_KEYS = ("token_share", "dh_pred", "dh_measured")
DH_PRED_KEYS = ("omega_paper", "dh_all_logit", "dh_cov", "dh_jvp")
QUADRANTS = ("Q1", "Q2", "Q3", "Q4")


def check_record(rec: dict[str, Any]) -> None:
    """Raise ``ValueError`` unless ``rec`` follows the schema above (keys and value types)."""
    keys = set(rec)
    missing = [k for k in METRIC_KEYS if k not in keys]
    extra = sorted(keys - set(METRIC_KEYS) - set(OPTIONAL_KEYS))
    if missing or extra:
        raise ValueError(f"metrics record: missing {missing}, unexpected {extra}")
    if set(rec["quadrant"]) != set(QUADRANTS):
        raise ValueError(f"metrics record: quadrant keys {sorted(rec['quadrant'])}")
    for q in QUADRANTS:
        if set(rec["quadrant"][q]) != set(QUADRANT_KEYS):
            raise ValueError(f"metrics record: quadrant {q} keys {sorted(rec['quadrant'][q])}")
    if set(rec["dh_pred"]) != set(DH_PRED_KEYS):
        raise ValueError(f"metrics record: dh_pred keys {sorted(rec['dh_pred'])}")
    for k in METRIC_KEYS:
        if k in ("method", "quadrant", "dh_pred"):
            continue
        if not isinstance(rec[k], (int, float)) or isinstance(rec[k], bool):
            raise ValueError(f"metrics record: {k} is {type(rec[k]).__name__}, expected a number")
    if "pass_at_k" in rec and not all(str(k).isdigit() for k in rec["pass_at_k"]):
        raise ValueError("metrics record: pass_at_k keys must be the k values as strings")


def _num(x: Any) -> float | None:
    """A JSON number (NaN/inf → None)."""
    if x is None:
        return None
    v = float(x)
    return v if math.isfinite(v) else None


def weight_stats(weights: torch.Tensor) -> dict[str, float]:
    """Mean, population std, min and max of the per-token weights ``[N]`` (1.0s when empty)."""
    w = weights.double()
    if w.numel() == 0:
        return {"weight_mean": 1.0, "weight_std": 0.0, "weight_min": 1.0, "weight_max": 1.0}
    return {
        "weight_mean": float(w.mean()),
        "weight_std": float(w.std(unbiased=False)),
        "weight_min": float(w.min()),
        "weight_max": float(w.max()),
    }


def quadrant_table(
    quadrant: torch.Tensor, mask: torch.Tensor, dh_pred: torch.Tensor, dh_measured: torch.Tensor
) -> dict[str, dict[str, float]]:
    """Per quadrant Q1..Q4: share of the valid tokens and the sums of predicted and measured ΔH
    (nats). ``quadrant`` ``[B, T]`` int (0 = A = 0, not reported), the rest ``[B, T]``
    (:func:`entropy_lens.scoring.quadrant_table` on the valid tokens)."""
    table = scoring.quadrant_table(
        quadrant[mask].cpu().numpy(),
        {"dh_pred": dh_pred[mask].double().cpu().numpy(), "dh_measured": dh_measured[mask].double().cpu().numpy()},
        QUADRANTS,
    )
    return {q: {k: row[k] for k in QUADRANT_KEYS} for q, row in table.items()}


def make_record(**values: Any) -> dict[str, Any]:
    """The record in :data:`METRIC_KEYS` order (optional keys last, omitted when None); floats
    non-finite → None. Raises if a key is missing or unknown."""
    rec: dict[str, Any] = {}
    for k in METRIC_KEYS:
        v = values[k]
        if k == "quadrant":
            v = {q: {kk: _num(vv) for kk, vv in v[q].items()} for q in QUADRANTS}
        elif k == "dh_pred":
            v = {kk: _num(v.get(kk)) for kk in DH_PRED_KEYS}
        elif k in ("step", "seed"):
            v = int(v)
        elif k != "method":
            v = _num(v)
        rec[k] = v
    for k in OPTIONAL_KEYS:
        if values.get(k) is not None:
            rec[k] = values[k]
    unknown = set(values) - set(METRIC_KEYS) - set(OPTIONAL_KEYS)
    if unknown:
        raise ValueError(f"unknown metrics keys: {sorted(unknown)}")
    return rec


# ---------------------------------------------------------------------------------------------
# The log file
# ---------------------------------------------------------------------------------------------


def append_record(path: str | Path, rec: dict[str, Any]) -> None:
    """Append one line (flushed and fsynced, so a kill leaves at most one partial last line)."""
    line = json.dumps(rec, allow_nan=False) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def truncate_metrics(path: str | Path, last_step: int) -> list[dict[str, Any]]:
    """Keep only the records with ``step <= last_step`` (rewritten atomically); returns them."""
    keep = [r for r in read_metrics(path) if int(r["step"]) <= last_step]
    data = "".join(json.dumps(r, allow_nan=False) + "\n" for r in keep).encode()
    atomic_write_bytes(path, data)
    return keep
