"""Experiment grid of the reference trainer on ``arithmetic-tiny`` (docs/trainer.md).

Settings: grpo, clip_higher, entropy_bonus, clip_cov, kl_cov, steer (λ_min 0.8); the extreme clip
setting (ε_low 0.99, ε_high 5) for grpo and steer; STEER λ_min ∈ {0.6, 0.7, 0.9}; STEER with ω from
the LM-head kernel scores (``steer_lm_head``: ``method.omega=lm_head``; ``steer_lm_head_source``:
``method.omega=lm_head_source``); each for every seed. Every run is one ``entropy-lens train``
process (one CPU thread); finished runs are skipped and interrupted ones resumed, so the script can
be re-run at any time. Runs go in :data:`ORDER`
(grpo and steer for every seed first). Then it writes

- ``<out>/train_grid_runs.csv``: one row per run (final entropy, entropy drop, accuracies, pass@k,
  how well each per-step ΔH prediction tracked the measured ΔH, wall time);
- ``<out>/train_grid.csv``: mean and spread (sample std) over seeds per setting;
- ``<out>/train_grid_curves.csv``: entropy / accuracy / eval accuracy per step, mean and std over seeds;
- ``<out>/train_grid_curves.png``: those curves;
- a markdown table on stdout (pasted into docs/trainer.md).

    nice -n 19 taskset -c 1 python analyses/train_experiments.py --out runs/train_grid --steps 200 --seeds 0 1 2
    python analyses/train_experiments.py --out runs/train_grid --summarize-only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

EXTREME = ["method.eps_low=0.99", "method.eps_high=5"]

#: setting name -> (method, extra --set items, group)
SETTINGS: dict[str, tuple[str, list[str], str]] = {
    "grpo": ("grpo", [], "methods"),
    "clip_higher": ("clip_higher", [], "methods"),
    "entropy_bonus": ("entropy_bonus", [], "methods"),
    "clip_cov": ("clip_cov", [], "methods"),
    "kl_cov": ("kl_cov", [], "methods"),
    "steer": ("steer", [], "methods"),
    "grpo_extreme": ("grpo", EXTREME, "extreme"),
    "steer_extreme": ("steer", EXTREME, "extreme"),
    "steer_lmin0.6": ("steer", ["method.lambda_min=0.6"], "lambda_min"),
    "steer_lmin0.7": ("steer", ["method.lambda_min=0.7"], "lambda_min"),
    "steer_lmin0.9": ("steer", ["method.lambda_min=0.9"], "lambda_min"),
    "steer_lm_head": ("steer", ["method.omega=lm_head"], "omega"),
    "steer_lm_head_source": ("steer", ["method.omega=lm_head_source"], "omega"),
}
#: run order: the core comparison first, so a grid cut short still answers it with every seed
ORDER = (
    ("grpo", "steer"),
    ("steer_lm_head", "steer_lm_head_source"),
    ("clip_higher", "entropy_bonus", "clip_cov", "kl_cov"),
    ("grpo_extreme", "steer_extreme"),
    ("steer_lmin0.6", "steer_lmin0.7", "steer_lmin0.9"),
)
ESTIMATORS = ("omega_paper", "dh_all_logit", "dh_cov", "dh_jvp")
LAST = 10  # steps averaged for "final" numbers


def run_dir(root: Path, name: str, seed: int) -> Path:
    return root / "runs" / f"{name}__seed{seed}"


def is_done(out: Path) -> bool:
    p = out / "summary.json"
    return p.is_file() and json.loads(p.read_text()).get("status") == "completed"


def run_one(root: Path, name: str, seed: int, steps: int, extra: list[str]) -> float | None:
    """Run (or resume) one setting × seed; returns the process wall time, None when skipped."""
    method, sets, _ = SETTINGS[name]
    out = run_dir(root, name, seed)
    if is_done(out):
        return None
    items = ["threads=1", f"sft.cache_dir={root / 'sft_cache'}", *sets, *extra]
    cmd = [
        sys.executable,
        "-m",
        "entropy_lens_cli.app",
        "train",
        "--preset",
        "arithmetic-tiny",
        "--method",
        method,
        "--seed",
        str(seed),
        "--steps",
        str(steps),
        *[a for s in items for a in ("--set", s)],
        "-o",
        str(out),
    ]
    if (out / "checkpoints").is_dir():
        cmd.append("--resume")
    (root / "logs").mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(root / "logs" / f"{name}__seed{seed}.log", "a") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.time() - t0
    print(f"{name} seed {seed}: exit {rc}, {wall:.0f} s", flush=True)
    return wall


def _pcc(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def run_row(root: Path, name: str, seed: int) -> dict | None:
    out = run_dir(root, name, seed)
    if not is_done(out):
        return None
    summary = json.loads((out / "summary.json").read_text())
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    df = pd.DataFrame(recs)
    meas = df["dh_measured"].to_numpy(float)
    row = {
        "setting": name,
        "method": SETTINGS[name][0],
        "group": SETTINGS[name][2],
        "seed": seed,
        "steps": len(df),
        "entropy_first": df["entropy_mean"].iloc[0],
        "entropy_final": df["entropy_mean"].iloc[-LAST:].mean(),
        "entropy_drop": df["entropy_mean"].iloc[0] - df["entropy_mean"].iloc[-LAST:].mean(),
        "acc_first": df["accuracy"].iloc[:LAST].mean(),
        "acc_final": df["accuracy"].iloc[-LAST:].mean(),
        "eval_acc_start": summary["eval_accuracy_step0"],
        "eval_acc_final": summary["eval_accuracy_last"],
        "pass@1": (summary.get("pass_at_k") or {}).get("1"),
        "pass@16": (summary.get("pass_at_k") or {}).get("16"),
        "weight_mean": df["weight_mean"].mean(),
        "weight_min": df["weight_min"].min(),
        "clip_frac_high": df["clip_frac_high"].mean(),
        "clip_frac_low": df["clip_frac_low"].mean(),
        "wall_s": summary["wall_s_steps"] + summary["info"].get("setup_wall_s", 0.0),
        "sft_steps": (summary["info"].get("sft") or {}).get("steps_run"),
        "measured_neg_share": float(np.mean(meas < 0)),  # baseline for the sign agreement
    }
    for e in ESTIMATORS:
        pred = np.array([np.nan if d[e] is None else d[e] for d in df["dh_pred"]], dtype=float)
        ok = np.isfinite(pred)
        p, m = pred[ok], meas[ok]
        nz = p != 0
        row[f"{e}_pcc"] = _pcc(p, m)
        row[f"{e}_sign"] = float(np.mean(np.sign(p[nz]) == np.sign(m[nz]))) if nz.any() else float("nan")
        row[f"{e}_scale"] = float(np.sum(p * m) / np.sum(p * p)) if np.sum(p * p) > 0 else float("nan")
        if e == "dh_jvp":
            row["dh_jvp_rel_err"] = (
                float(np.median(np.abs(p - m) / np.maximum(np.abs(m), 1e-12))) if ok.any() else float("nan")
            )
    return row


def summarize(root: Path, seeds: list[int]) -> pd.DataFrame:
    rows = [r for name in SETTINGS for s in seeds if (r := run_row(root, name, s)) is not None]
    if not rows:
        print("no finished runs yet")
        return pd.DataFrame()
    runs = pd.DataFrame(rows)
    # paired with the reference run of the same seed (same warm-up, same first batch): GRPO, or
    # GRPO in the extreme setting for the extreme runs
    runs["reference"] = np.where(runs["group"] == "extreme", "grpo_extreme", "grpo")
    ref = runs.set_index(["setting", "seed"])
    for col in ("entropy_final", "acc_final", "eval_acc_final"):
        runs[f"d_{col}"] = [
            r[col] - ref.loc[(r["reference"], r["seed"]), col] if (r["reference"], r["seed"]) in ref.index else np.nan
            for _, r in runs.iterrows()
        ]
    runs.to_csv(root / "train_grid_runs.csv", index=False)
    num = [c for c in runs.columns if c not in ("setting", "method", "group", "seed", "reference")]
    agg = runs.groupby("setting", sort=False)[num].agg(["mean", "std"])
    agg.columns = [f"{a}_{b}" for a, b in agg.columns]
    agg.insert(0, "n_seeds", runs.groupby("setting", sort=False)["seed"].count())
    agg.insert(0, "group", runs.groupby("setting", sort=False)["group"].first())
    agg = agg.reset_index()
    agg.to_csv(root / "train_grid.csv", index=False)
    curves(root, seeds)
    print(markdown(agg))
    return agg


def curves(root: Path, seeds: list[int]) -> None:
    frames = []
    for name in SETTINGS:
        for s in seeds:
            out = run_dir(root, name, s)
            if not is_done(out):
                continue
            d = pd.read_json(out / "metrics.jsonl", lines=True)[["step", "entropy_mean", "accuracy"]]
            ev = pd.read_json(out / "metrics.jsonl", lines=True)
            d["eval_accuracy"] = ev["eval_accuracy"] if "eval_accuracy" in ev else np.nan
            d["setting"], d["seed"] = name, s
            frames.append(d)
    if not frames:
        return
    long = pd.concat(frames)
    cur = long.groupby(["setting", "step"]).agg(["mean", "std"])[["entropy_mean", "accuracy", "eval_accuracy"]]
    cur.columns = [f"{a}_{b}" for a, b in cur.columns]
    cur.reset_index().to_csv(root / "train_grid_curves.csv", index=False)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ran = set(long["setting"])
    # one panel per group with a run of its own (grpo and steer are drawn in every panel as reference)
    groups = [g for g in dict.fromkeys(v[2] for v in SETTINGS.values())
              if any(SETTINGS[n][2] == g and n in ran and n not in ("grpo", "steer") for n in SETTINGS)
              or g == "methods"]
    fig, axes = plt.subplots(2, len(groups), figsize=(5 * len(groups), 8), sharex=True, squeeze=False)
    for j, g in enumerate(groups):
        names = (["grpo", "steer"] if g != "methods" else []) + [n for n in SETTINGS if SETTINGS[n][2] == g]
        for n in dict.fromkeys(names):
            sub = long[long["setting"] == n]
            if sub.empty:
                continue
            for i, col in enumerate(("entropy_mean", "accuracy")):
                m = sub.groupby("step")[col].mean().rolling(5, min_periods=1).mean()
                sd = sub.groupby("step")[col].std().rolling(5, min_periods=1).mean().fillna(0)
                axes[i, j].plot(m.index, m.values, label=n)
                axes[i, j].fill_between(m.index, m - sd, m + sd, alpha=0.15)
        axes[0, j].set_title(g)
        axes[0, j].set_ylabel("mean token entropy (nats)")
        axes[1, j].set_ylabel("sample accuracy")
        axes[1, j].set_xlabel("RL step")
        axes[0, j].legend(fontsize=8)
    fig.suptitle("arithmetic-tiny: mean ± std over seeds (5-step moving average)")
    fig.tight_layout()
    fig.savefig(root / "train_grid_curves.png", dpi=110)
    plt.close(fig)


def markdown(agg: pd.DataFrame) -> str:
    """Two tables: outcomes per setting, and how the per-step ΔH predictions tracked the measurement."""

    def ms(r, c, fmt=".3f"):
        m, s = r.get(f"{c}_mean"), r.get(f"{c}_std")
        if m is None or pd.isna(m):
            return "n/a"
        return f"{m:{fmt}} ± {s:{fmt}}" if not pd.isna(s) else f"{m:{fmt}}"

    def table(head: list[str], cells) -> list[str]:
        out = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
        out += ["| " + " | ".join(cells(r)) + " |" for _, r in agg.iterrows()]
        return out

    outcome = table(
        ["setting", "seeds", "steps", "final H (nats)", "H drop", "final H − ref (paired)", "sample acc",
         "acc − ref (paired)", "greedy eval acc", "pass@16", "mean λ", "clip frac hi / lo"],
        lambda r: [r["setting"], str(int(r["n_seeds"])), str(int(r["steps_mean"])), ms(r, "entropy_final"),
                   ms(r, "entropy_drop"), ms(r, "d_entropy_final"), ms(r, "acc_final"), ms(r, "d_acc_final"),
                   ms(r, "eval_acc_final"), ms(r, "pass@16"), ms(r, "weight_mean"),
                   f"{r['clip_frac_high_mean']:.4f} / {r['clip_frac_low_mean']:.4f}"],
    )
    tracking = table(
        ["setting", "PCC Ω", "PCC all-logit", "PCC cov", "sign agr. Ω", "steps with ΔH<0", "measured/Ω scale", "PCC jvp",
         "sign agr. jvp", "jvp median rel. err", "wall s/run"],
        lambda r: [r["setting"], ms(r, "omega_paper_pcc", ".2f"), ms(r, "dh_all_logit_pcc", ".2f"),
                   ms(r, "dh_cov_pcc", ".2f"), ms(r, "omega_paper_sign", ".2f"), ms(r, "measured_neg_share", ".2f"),
                   ms(r, "omega_paper_scale", ".2e"),
                   ms(r, "dh_jvp_pcc", ".2f"), ms(r, "dh_jvp_sign", ".2f"), ms(r, "dh_jvp_rel_err", ".2f"),
                   ms(r, "wall_s", ".0f")],
    )
    return "\n".join(outcome + [""] + tracking)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/train_grid"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra --set item for every run")
    ap.add_argument("--summarize-only", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.summarize_only:
        t0 = time.time()
        for block in ORDER:  # grpo and steer for every seed first, then the other methods, ...
            for seed in args.seeds:
                for name in block:
                    if name in args.settings:
                        run_one(args.out, name, seed, args.steps, args.extra)
        print(f"grid wall time {time.time() - t0:.0f} s", flush=True)
    summarize(args.out, args.seeds)


if __name__ == "__main__":
    main()
