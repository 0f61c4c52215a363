"""The paper-style results table: method × benchmark, mean ± std over seeds, best per column.

Inputs are run folders of one kind per table:

- **trainer runs** (``entropy-lens train -o RUN``): ``config.yaml`` (``config.method``,
  ``config.seed``, ``config.task``) and ``summary.json`` (:func:`entropy_lens.train.loop.summarize_run`:
  ``status``, ``steps``, ``method_params``, ``pass_at_k`` ``{"1": …}``, ``eval_accuracy_last``).
  The benchmark is the run's held-out task set (:func:`task_benchmark`);
- **eval runs** (``entropy-lens eval``): ``summary.json`` with ``"kind": "eval"``, ``tags``
  (``method``, ``seed``) and ``datasets`` (``{name: {"avg_at_k", "pass_at_k": {"1": …}, "k", …}}``);
  one benchmark per dataset.

The value of a cell is chosen by a metric (:func:`parse_metric`): ``avg_at_k`` (default; mean
accuracy over the k samples per problem — for a trainer run its unbiased pass@1 over the
``max(log.pass_k)`` samples, the same number), ``pass_at_1``, ``pass_at_k:K``, or ``greedy``
(trainer runs only: greedy accuracy on the held-out set at the last step).

Flow (pure functions, no printing): :func:`collect_rows` (one row per run × benchmark) →
:func:`aggregate` (mean, sample std and count over seeds per method × benchmark, plus an
``average`` column over benchmarks, and the best mean per column) → :func:`results_markdown` /
:func:`results_csv`. :func:`results_table` does all three. Bad input raises
:class:`~entropy_lens.io.tables.InputError` with one line naming the run.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from entropy_lens.io.tables import InputError, read_json, read_yaml

#: Metric names :func:`parse_metric` accepts (``pass_at_k:K`` with an integer K ≥ 1).
METRICS = ("avg_at_k", "pass_at_1", "pass_at_k:K", "greedy")
#: The column over all benchmarks (mean over a seed's benchmarks, then over seeds).
AVERAGE = "average"
#: Trailing parts of a checkpoint path that do not name the model (``.../steer/checkpoints/step_000200``).
_CHECKPOINT_PART = re.compile(r"^(global_step_\d+|step_\d+|checkpoint-\d+|checkpoints|actor|huggingface|hf)$")


@dataclass(frozen=True)
class Metric:
    """A parsed ``--metric``: ``name`` (``avg_at_k``, ``pass_at_k``, ``greedy``) and ``k`` (pass@k only)."""

    name: str
    k: int | None = None

    @property
    def label(self) -> str:
        """How the metric is named in the table's caption."""
        return {"avg_at_k": "avg@k", "greedy": "greedy accuracy"}.get(self.name, f"pass@{self.k}")


@dataclass
class ResultsTable:
    """What :func:`results_table` returns: the per-run ``rows``, the aggregated ``table``, its
    ``markdown`` text, and ``skipped`` (one line per run left out by ``skip_incomplete``)."""

    rows: pd.DataFrame
    table: pd.DataFrame
    markdown: str
    skipped: list[str] = field(default_factory=list)


def parse_metric(text: str) -> Metric:
    """``avg_at_k`` | ``pass_at_1`` | ``pass_at_k:K`` | ``greedy`` → :class:`Metric`; else ValueError."""
    text = text.strip()
    if text in ("avg_at_k", "greedy"):
        return Metric(text)
    if text == "pass_at_1":
        return Metric("pass_at_k", 1)
    m = re.fullmatch(r"pass_at_k:(\d+)", text)
    if m and int(m.group(1)) >= 1:
        return Metric("pass_at_k", int(m.group(1)))
    raise ValueError(f"--metric must be one of {', '.join(METRICS)} (K an integer >= 1), got {text!r}")


# ---------------------------------------------------------------------------------------------
# Reading run folders
# ---------------------------------------------------------------------------------------------


class IncompleteRun(InputError):
    """A run folder without a finished result (no summary.json, diverged, or fewer steps than planned)."""


def run_kind(run: Path) -> str:
    """``"train"`` or ``"eval"`` by the folder's files; IncompleteRun when it has no summary.json
    yet, InputError for a folder that is neither (another command's run, or not a run)."""
    if not run.is_dir():
        raise InputError(f"{run}: no such run folder" if not run.exists() else f"{run}: is a file, not a run folder")
    summary = read_json(run / "summary.json") if (run / "summary.json").is_file() else None
    if summary is not None and summary.get("kind") == "eval":
        return "eval"
    config = read_yaml(run / "config.yaml").get("config") if (run / "config.yaml").is_file() else None
    if isinstance(config, dict) and "preset" in config and "method" in config and "command" not in config:
        if summary is None:
            raise IncompleteRun(f"{run}: unfinished trainer run (no summary.json)")
        return "train"
    if summary is None and isinstance(config, dict) and config.get("command") == "eval":
        raise IncompleteRun(f"{run}: unfinished eval run (no summary.json)")
    if summary is None and ((run / "metrics.jsonl").exists() or (run / "checkpoints").is_dir()):
        raise IncompleteRun(f"{run}: unfinished trainer run (no summary.json)")
    if summary is None:
        raise InputError(f"{run}: no summary.json (not a trainer or eval run)")
    raise InputError(f"{run}: not a trainer or eval run (summary.json has no \"kind\": \"eval\" and "
                     "config.yaml is not a trainer's)")


def task_benchmark(task: dict[str, Any]) -> str:
    """The benchmark name of a trainer run's held-out set, from ``config.task``:
    ``arithmetic 2×2-digit +`` (operands × digits, operators) or the GSM8K file's stem."""
    name = str(task.get("name", "task"))
    if name == "arithmetic":
        return f"arithmetic {task.get('n_operands', 2)}×{task.get('digits', 2)}-digit {task.get('ops', '+')}"
    path = task.get("path")
    return Path(str(path)).stem if path else name


def method_label(method: str, params: dict[str, Any] | None) -> str:
    """``method`` plus the method parameters the run set explicitly (config.yaml's
    ``method_params``, the ``--set`` values as given), e.g. ``steer (eps_high=0.24, mapping=linear)``;
    just ``method`` when it set none. Taken from the run, not from the registry's current
    defaults, so a label does not change when a default does."""
    given = [f"{k}={_short(v)}" for k, v in sorted((params or {}).items())]
    return f"{method} ({', '.join(given)})" if given else method


def _short(v: Any) -> str:
    if v is None:
        return "none"
    return f"{v:g}" if isinstance(v, float) else str(v)


def model_label(model: str) -> str:
    """A method label from a model path: its last part that is not a checkpoint folder
    (``runs/steer/checkpoints/step_000200`` → ``steer``, ``Qwen/Qwen2.5-Math-7B`` → ``Qwen2.5-Math-7B``)."""
    parts = [p for p in re.split(r"[\\/]+", str(model)) if p and p != "."]
    while len(parts) > 1 and _CHECKPOINT_PART.match(parts[-1]):
        parts.pop()
    return parts[-1] if parts else str(model)


def _number(run: Path, what: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{run}/summary.json: {what} is {value!r}, expected a finite number")
    return float(value)


def _pass_at(run: Path, table: Any, k: int, where: str) -> float:
    if not isinstance(table, dict) or not table:
        raise InputError(f"{run}/summary.json: {where}no pass@k values")
    if str(k) not in table:
        raise InputError(f"{run}/summary.json: {where}no pass@{k} (has pass@{', pass@'.join(map(str, table))})")
    return _number(run, f"{where}pass_at_k[{k}]", table[str(k)])


def train_rows(run: Path, metric: Metric) -> list[dict[str, Any]]:
    """The one row of a finished trainer run; IncompleteRun when it diverged or stopped early."""
    summary = read_json(run / "summary.json")
    config = read_yaml(run / "config.yaml").get("config") or {}
    status = summary.get("status")
    if status != "completed":
        raise IncompleteRun(f"{run}: trainer run {status or 'without status'} (summary.json status {status!r})")
    planned = config.get("steps")
    if isinstance(planned, int) and isinstance(summary.get("steps"), int) and summary["steps"] < planned:
        raise IncompleteRun(f"{run}: unfinished trainer run ({summary['steps']} of {planned} steps)")
    method = str(config.get("method", summary.get("method")))
    given = config.get("method_params") if isinstance(config.get("method_params"), dict) else {}
    if metric.name == "greedy":
        if summary.get("eval_accuracy_last") is None:
            raise InputError(f"{run}/summary.json: no greedy eval accuracy (the run had no held-out set)")
        value = _number(run, "eval_accuracy_last", summary["eval_accuracy_last"])
    else:
        k = 1 if metric.name == "avg_at_k" else metric.k
        value = _pass_at(run, summary.get("pass_at_k"), k, "")
    ks = [int(k) for k in (summary.get("pass_at_k") or {})]
    return [{
        "run": str(run), "kind": "train", "method": method_label(method, given),
        "seed": config.get("seed", summary.get("seed")), "benchmark": task_benchmark(config.get("task") or {}),
        "value": value, "k": max(ks) if ks else None,
    }]


def _seed(value: Any) -> Any:
    """A seed tag as a number where it is one (eval tags are text: ``"0"`` → 0)."""
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        return int(value)
    return value


def eval_rows(run: Path, metric: Metric) -> list[dict[str, Any]]:
    """One row per dataset of an eval run's summary.json."""
    summary = read_json(run / "summary.json")
    status = summary.get("status")
    if status is not None and status != "completed":
        raise IncompleteRun(f"{run}: eval run {status} (summary.json status {status!r})")
    if metric.name == "greedy":
        raise InputError(f"{run}: --metric greedy is for trainer runs; an eval run has avg_at_k and pass_at_k")
    tags = summary.get("tags") if isinstance(summary.get("tags"), dict) else {}
    datasets = summary.get("datasets")
    if not isinstance(datasets, dict) or not datasets:
        raise InputError(f"{run}/summary.json: no datasets")
    method = tags.get("method") or model_label(str(summary.get("model", run.name)))
    rows = []
    for name, d in datasets.items():
        if not isinstance(d, dict):
            raise InputError(f"{run}/summary.json: datasets.{name} is not an object")
        if metric.name == "avg_at_k":
            value = _number(run, f"datasets.{name}.avg_at_k", d.get("avg_at_k"))
        else:
            value = _pass_at(run, d.get("pass_at_k"), metric.k, f"datasets.{name}: ")
        rows.append({"run": str(run), "kind": "eval", "method": str(method), "seed": _seed(tags.get("seed")),
                     "benchmark": str(name), "value": value, "k": d.get("k")})
    return rows


def collect_rows(runs: list[str | Path], metric: str | Metric = "avg_at_k",
                 skip_incomplete: bool = False) -> tuple[pd.DataFrame, list[str]]:
    """One row per run × benchmark (``run, kind, method, seed, benchmark, value, k``) and the lines
    of the runs skipped. All runs must be of one kind; an incomplete run raises unless
    ``skip_incomplete``; two runs with the same (method, seed, benchmark) raise, naming both."""
    metric = parse_metric(metric) if isinstance(metric, str) else metric
    if not runs:
        raise ValueError("no run folders given")
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    kinds: dict[str, Path] = {}
    for run in map(Path, runs):
        try:
            kind = run_kind(run)
            kinds.setdefault(kind, run)
            if len(kinds) > 1:
                (a, ra), (b, rb) = kinds.items()
                raise InputError(f"runs of different kinds in one table: {ra} is {_a(a)} run, {rb} {_a(b)} run")
            rows += train_rows(run, metric) if kind == "train" else eval_rows(run, metric)
        except IncompleteRun as exc:
            if not skip_incomplete:
                raise IncompleteRun(f"{exc} (pass --skip-incomplete to leave it out)") from None
            skipped.append(str(exc))
    if not rows:
        raise InputError(f"no finished runs among the {len(runs)} given")
    frame = pd.DataFrame(rows)
    frame["seed"] = pd.Series([r["seed"] for r in rows], dtype=object)  # ints stay ints beside None
    frame["k"] = pd.Series([r["k"] for r in rows], dtype=object)
    check_duplicates(frame)
    return frame, skipped


def _a(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def check_duplicates(rows: pd.DataFrame) -> None:
    """InputError naming both runs when two rows share (method, seed, benchmark)."""
    seen: dict[tuple, str] = {}
    for r in rows.itertuples(index=False):
        key = (r.method, r.seed, r.benchmark)
        if key in seen:
            raise InputError(f"{seen[key]} and {r.run}: both are method {r.method!r}, seed {key[1]}, "
                             f"benchmark {r.benchmark!r}; give each (method, seed) one run")
        seen[key] = r.run


# ---------------------------------------------------------------------------------------------
# Aggregating and formatting
# ---------------------------------------------------------------------------------------------


def _with_average(rows: pd.DataFrame, benchmarks: list[str]) -> pd.DataFrame:
    """``rows`` plus one ``average`` row per (method, seed) that has every benchmark (mean over them)."""
    if len(benchmarks) < 2:
        return rows
    keyed = rows.assign(seed_key=[repr(x) for x in rows["seed"]])  # None is a seed of its own
    full = keyed.groupby(["method", "seed_key"], sort=False).filter(lambda g: g["benchmark"].nunique() == len(benchmarks))
    if full.empty:
        return rows
    avg = full.groupby(["method", "seed_key"], sort=False).agg(seed=("seed", lambda x: x.iloc[0]), value=("value", "mean")).reset_index()
    avg = avg.drop(columns="seed_key").assign(benchmark=AVERAGE)
    return pd.concat([rows, avg], ignore_index=True)


def aggregate(rows: pd.DataFrame, decimals: int = 1) -> pd.DataFrame:
    """Method × benchmark cells: ``method, benchmark, mean, std`` (sample std over seeds; NaN for
    one seed), ``n_seeds``, ``seeds`` (``;``-joined) and ``best`` (the highest mean of its column
    once rounded to ``decimals`` places in percent, ties all best). Methods and benchmarks keep the
    order in which they first appear; ``average`` (over benchmarks, per seed) comes last when there
    are two or more benchmarks."""
    methods = list(dict.fromkeys(rows["method"]))
    benchmarks = list(dict.fromkeys(rows["benchmark"]))
    data = _with_average(rows, benchmarks)
    cells = []
    for (method, bench), g in data.groupby(["method", "benchmark"], sort=False):
        vals = g["value"].to_numpy(float)
        cells.append({"method": method, "benchmark": bench, "mean": float(vals.mean()),
                      "std": float(vals.std(ddof=1)) if len(vals) > 1 else float("nan"),
                      "n_seeds": len(vals), "seeds": ";".join(str(s) for s in g["seed"])})
    table = pd.DataFrame(cells)
    order = {b: i for i, b in enumerate([*benchmarks, AVERAGE])}
    table["_b"] = table["benchmark"].map(order)
    table["_m"] = table["method"].map({m: i for i, m in enumerate(methods)})
    table = table.sort_values(["_b", "_m"]).drop(columns=["_b", "_m"]).reset_index(drop=True)
    shown = (table["mean"] * 100).round(decimals)
    table["best"] = shown == shown.groupby(table["benchmark"]).transform("max")
    return table


def _cell(c: pd.Series, n_method: int, decimals: int) -> str:
    text = f"{c['mean'] * 100:.{decimals}f}"
    if not np.isnan(c["std"]):
        text += f" ± {c['std'] * 100:.{decimals}f}"
    if c["best"]:
        text = f"**{text}**"
    return text + (f" (n={c['n_seeds']})" if c["n_seeds"] != n_method else "")


def results_markdown(table: pd.DataFrame, metric: str | Metric = "avg_at_k", decimals: int = 1) -> str:
    """The table as markdown: one row per method, one column per benchmark (then ``average``),
    cells ``mean ± std`` in percent, the best of each column in bold; a caption line first."""
    metric = parse_metric(metric) if isinstance(metric, str) else metric
    methods = list(dict.fromkeys(table["method"]))
    benchmarks = list(dict.fromkeys(table["benchmark"]))
    cells = {(r["method"], r["benchmark"]): r for _, r in table.iterrows()}
    n_seeds = {m: int(table.loc[table["method"] == m, "n_seeds"].max()) for m in methods}
    lines = [
        f"{metric.label} (%), mean ± sample std over seeds; best per column in bold"
        + ("; average = mean over the benchmarks per seed" if AVERAGE in benchmarks else "") + ".",
        "",
        "| method | seeds | " + " | ".join(benchmarks) + " |",
        "|---|---:|" + "---:|" * len(benchmarks),
    ]
    for m in methods:
        row = [_cell(cells[(m, b)], n_seeds[m], decimals) if (m, b) in cells else "–" for b in benchmarks]
        lines.append(f"| {m} | {n_seeds[m]} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def results_csv(table: pd.DataFrame, metric: str | Metric = "avg_at_k") -> str:
    """The aggregated table as CSV text (fractions, not percent), with a ``metric`` column."""
    metric = parse_metric(metric) if isinstance(metric, str) else metric
    name = metric.name if metric.k is None else f"pass_at_k:{metric.k}"
    return table.assign(metric=name).to_csv(index=False)


def results_table(runs: list[str | Path], metric: str | Metric = "avg_at_k",
                  skip_incomplete: bool = False, decimals: int = 1) -> ResultsTable:
    """:func:`collect_rows` → :func:`aggregate` → :func:`results_markdown`, in one call."""
    metric = parse_metric(metric) if isinstance(metric, str) else metric
    rows, skipped = collect_rows(runs, metric, skip_incomplete)
    table = aggregate(rows, decimals)
    return ResultsTable(rows, table, results_markdown(table, metric, decimals), skipped)
