"""Loading one run folder into a :class:`Run` (the only file reading of the figures and the report).

A run folder may hold ``tokens.parquet`` + ``summary.json`` (``validate`` / ``analyze``),
``compare/compare.parquet`` + ``compare/summary.json`` (``compare``; a ``compare`` output folder
can be given directly) and ``metrics.jsonl`` + ``config.yaml`` (the trainer). Anything missing is
simply absent. Every file is read through :mod:`entropy_lens.io.tables`, so a malformed file raises
``ValueError`` (:class:`~entropy_lens.io.tables.InputError`) with one line naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from entropy_lens.io.tables import (
    InputError,
    read_json,
    read_metrics,
    read_parquet,
    read_yaml,
)

#: Files that make a folder a run (at least one must exist).
RUN_FILES = ("tokens.parquet", "compare/compare.parquet", "metrics.jsonl")


@dataclass
class Run:
    """Everything one run folder holds; absent parts are None.

    ``metrics``: one row per (step) of metrics.jsonl, flattened (``q1_token_share`` …,
    ``pred_omega_paper`` …), with ``run, method, seed, setting, lambda_min`` columns.
    ``pass_at_k``: long frame ``run, method, seed, setting, step, k, pass_at_k``.
    """

    path: Path
    name: str
    tokens: pd.DataFrame | None = None
    summary: dict | None = None
    compare: pd.DataFrame | None = None
    compare_summary: dict | None = None
    metrics: pd.DataFrame | None = None
    pass_at_k: pd.DataFrame | None = None
    config: dict | None = None
    attribution: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def lr(self) -> float | None:
        """The learning rate η of the recorded update (summary.json), if known."""
        s = (self.summary or {}).get("settings") or {}
        lr = s.get("lr", (self.summary or {}).get("lr"))
        return float(lr) if lr is not None else None

    @property
    def n_tokens(self) -> int | None:
        """L, the number of response tokens of the batch (summary.json, else the tokens frame)."""
        n = (self.summary or {}).get("n_tokens")
        if n is None and self.tokens is not None:
            n = len(self.tokens)
        return int(n) if n is not None else None


# ---------------------------------------------------------------------------------------------
# metrics.jsonl and config.yaml
# ---------------------------------------------------------------------------------------------


def _set_items(cfg: dict) -> dict[str, Any]:
    """The run's settings as dotted keys: the ``set`` overrides, then the resolved
    ``method_params`` of the trainer's config (``method_params.<name>``), which win."""
    out: dict[str, Any] = {}

    def walk(prefix: str, obj: Any) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = obj

    walk("", cfg.get("set") or {})
    mp = cfg.get("method_params")
    if isinstance(mp, dict):
        walk("method_params", mp)
    return out


def _leaf_value(items: dict[str, Any], leaf: str) -> Any:
    """The value of the last key whose final dotted part is ``leaf`` (method_params come last)."""
    found = None
    for key, v in items.items():
        if key.rsplit(".", 1)[-1] == leaf:
            found = v
    return found


def _float(v: Any) -> float | None:
    """``float(v)``, or None when ``v`` is not a number."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def setting_label(cfg: dict) -> str:
    """``normal`` or ``extreme`` (or an explicit label) of a run config (config.yaml's ``config``:
    ``method, seed, preset, set``, and for the trainer also ``method_params``).

    An explicit ``setting`` (top level or in ``set``) wins; otherwise a run is ``extreme`` when
    clipping is effectively off (docs/science.md §6: ε_low ≥ 0.99 or ε_high ≥ 1, read from a key ending
    in ``eps_low`` / ``eps_high``) or its preset name contains "extreme".
    """
    items = _set_items(cfg)
    explicit = cfg.get("setting", items.get("setting"))
    if isinstance(explicit, str) and explicit:
        return explicit
    lo, hi = _float(_leaf_value(items, "eps_low")), _float(_leaf_value(items, "eps_high"))
    if (lo is not None and lo >= 0.99) or (hi is not None and hi >= 1.0):
        return "extreme"
    if "extreme" in str(cfg.get("preset") or "").lower():
        return "extreme"
    return "normal"


def lambda_min_of(cfg: dict, method: str) -> float | None:
    """λ_min of a run: a key ending in ``lambda_min`` (``method_params`` or ``set``), else the
    registry default for ``steer``, else None."""
    v = _float(_leaf_value(_set_items(cfg), "lambda_min"))
    if v is not None:
        return v
    if method == "steer":  # the one reference above io: the registry's default, imported on use
        from entropy_lens.methods import params_from_dict

        return float(params_from_dict("steer", {}).lambda_min)
    return None


def _flat_record(rec: dict) -> dict:
    """One metrics record as a flat row: scalars, ``q1_token_share``…, ``pred_<estimator>``."""
    row = {k: v for k, v in rec.items() if not isinstance(v, (dict, list))}
    for q, d in (rec.get("quadrant") or {}).items():
        if isinstance(d, dict):
            for k, v in d.items():
                row[f"{str(q).lower()}_{k}"] = v
    for k, v in (rec.get("dh_pred") or {}).items():
        row[f"pred_{k}"] = v
    return row


def _pass_at_k_rows(rec: dict) -> list[dict]:
    """``step, k, pass_at_k`` rows of one record's ``pass_at_k`` mapping (unparsable entries dropped)."""
    rows = []
    for k, v in (rec.get("pass_at_k") or {}).items():
        try:
            rows.append({"step": rec["step"], "k": int(k), "pass_at_k": float(v)})
        except (TypeError, ValueError):
            continue
    return rows


def metrics_frames(records: list[dict], cfg: dict, run: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Flatten metrics records into ``(metrics, pass_at_k)`` frames (see :class:`Run`)."""
    df = pd.DataFrame([_flat_record(rec) for rec in records])
    pkdf = pd.DataFrame([row for rec in records for row in _pass_at_k_rows(rec)], columns=["step", "k", "pass_at_k"])
    method = str(df["method"].iloc[0]) if "method" in df and len(df) else str(cfg.get("method") or run)
    seed = df["seed"].iloc[0] if "seed" in df and len(df) else cfg.get("seed", 0)
    ident = {
        "run": run,
        "method": method,
        "seed": seed,
        "setting": setting_label(cfg),
        "lambda_min": lambda_min_of(cfg, method),
    }
    for k, v in ident.items():
        df[k] = v
        pkdf[k] = v
    for c in df.columns:
        if c not in ("run", "method", "setting"):
            df[c] = pd.to_numeric(df[c], errors="coerce")
    return df, pkdf


# ---------------------------------------------------------------------------------------------
# The run folder
# ---------------------------------------------------------------------------------------------


def _compare_dir(path: Path) -> Path:
    """Where the compare outputs are: ``path/compare``, or ``path`` itself for a compare folder."""
    if (path / "compare.parquet").is_file() and not (path / "tokens.parquet").is_file():
        return path
    return path / "compare"


def _check_run_folder(path: Path, cmp_dir: Path) -> None:
    """ValueError (one line) unless ``path`` is a folder holding at least one of :data:`RUN_FILES`."""
    if not path.exists():
        raise InputError(f"{path}: no such folder")
    if not path.is_dir():
        raise InputError(f"{path}: not a folder (give the run directory)")
    found = [p for p in ("tokens.parquet", "metrics.jsonl") if (path / p).is_file()]
    if not found and not (cmp_dir / "compare.parquet").is_file():
        raise InputError(f"{path}: no run files (expected one of {', '.join(RUN_FILES)})")


def _load_tokens(run: Run, folder: Path, note_missing_summary: bool) -> None:
    """``tokens.parquet`` of ``folder`` and the ``summary.json`` beside it into ``run``."""
    run.tokens = read_parquet(folder / "tokens.parquet")
    if (folder / "summary.json").is_file():
        run.summary = read_json(folder / "summary.json")
    elif note_missing_summary:
        run.notes.append(f"{folder / 'summary.json'} missing: lr unknown, omega_code not scaled")


def _load_compare(run: Run, cmp_dir: Path) -> None:
    """The compare outputs into ``run``; without tokens of its own, the tokens its summary names."""
    run.compare = read_parquet(cmp_dir / "compare.parquet")
    if (cmp_dir / "summary.json").is_file():
        run.compare_summary = read_json(cmp_dir / "summary.json")
    if run.tokens is None:  # the compare summary names the tokens it was made from
        src = (run.compare_summary or {}).get("tokens")
        if src and Path(src).is_file():
            run.tokens = read_parquet(Path(src))
            if (Path(src).parent / "summary.json").is_file():
                run.summary = read_json(Path(src).parent / "summary.json")


def _load_metrics(run: Run, path: Path) -> None:
    """``metrics.jsonl`` (+ ``config.yaml``) of ``path`` into ``run.metrics`` / ``run.pass_at_k``."""
    cfg: Any = {}
    if (path / "config.yaml").is_file():
        cfg = read_yaml(path / "config.yaml").get("config") or {}
        if not isinstance(cfg, dict):
            raise InputError(f"{path / 'config.yaml'}: 'config' is not a mapping")
    records = read_metrics(path / "metrics.jsonl")
    if records:
        run.config = cfg
        run.metrics, run.pass_at_k = metrics_frames(records, cfg, run.name)
    else:
        run.notes.append(f"{path / 'metrics.jsonl'} has no complete records yet")


def load_run(path: str | Path) -> Run:
    """Read every known input of one run folder (a ``compare`` output folder also works).

    Raises ValueError (one line) if ``path`` is not a folder or holds none of :data:`RUN_FILES`.
    """
    path = Path(path)
    cmp_dir = _compare_dir(path)
    _check_run_folder(path, cmp_dir)
    run = Run(path=path, name=path.resolve().name)
    if (path / "tokens.parquet").is_file():
        _load_tokens(run, path, note_missing_summary=True)
    if (cmp_dir / "compare.parquet").is_file():
        _load_compare(run, cmp_dir)
    if (path / "metrics.jsonl").is_file():
        _load_metrics(run, path)
    if (path / "attribution.parquet").is_file():  # entropy-lens attribute
        run.attribution = read_parquet(path / "attribution.parquet")
    return run
