"""Ablations of the reference trainer on ``arithmetic-tiny`` (docs/trainer.md), each a grid of
``entropy-lens train`` runs summarised with ``entropy-lens table``.

Experiments (``--experiment``):

- ``eps``: the clip-higher sweep, ε_high ∈ {0.2, 0.24, 0.28, 0.32} (ε_low 0.2) for ``grpo`` and
  ``steer`` (``--set method.eps_high=E``);
- ``mapping``: STEER's λ mapping, ``steer.mapping`` = ``exp`` (the default), ``linear`` and
  ``binary`` (``--set steer.mapping=M``; a mapping the installed registry does not know makes
  that run fail with one line, which the script reports and skips).

Every run is one ``entropy-lens train`` process (one CPU thread), in ``<out>/runs/<setting>__seed<S>``;
finished runs are skipped and interrupted ones resumed, so the script can be re-run at any time;
warm-ups are shared through ``sft.cache_dir``. Then, per experiment, ``entropy-lens table`` over
its finished runs writes ``<out>/<experiment>/<metric>/results.md`` and ``results.csv`` for the
metrics avg@k (mean sample accuracy on the held-out set), pass@16 and the greedy accuracy, and the
avg@k table is printed.

    nice -n 19 taskset -c 1 python analyses/ablation_experiments.py --experiment eps mapping \\
        --out runs/ablations --steps 200 --seeds 0 1 2
    python analyses/ablation_experiments.py --experiment eps --out runs/ablations --summarize-only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

EPS_HIGH = (0.2, 0.24, 0.28, 0.32)
MAPPINGS = ("exp", "linear", "binary")
#: experiment -> {setting name: (method, --set items)}
EXPERIMENTS: dict[str, dict[str, tuple[str, list[str]]]] = {
    "eps": {f"{m}_eh{e:g}": (m, [f"method.eps_high={e:g}"]) for m in ("grpo", "steer") for e in EPS_HIGH},
    "mapping": {f"steer_map_{m}": ("steer", [f"steer.mapping={m}"]) for m in MAPPINGS},
}
#: table metric -> the folder its results go in
METRICS = {"avg_at_k": "avg_at_k", "pass_at_k:16": "pass_at_16", "greedy": "greedy"}


def run_dir(root: Path, name: str, seed: int) -> Path:
    """The run folder of one setting × seed."""
    return root / "runs" / f"{name}__seed{seed}"


def is_done(out: Path) -> bool:
    """Whether the run folder holds a finished run."""
    p = out / "summary.json"
    return p.is_file() and json.loads(p.read_text()).get("status") == "completed"


def cli() -> list[str]:
    """The `entropy-lens` command of this interpreter."""
    return [sys.executable, "-m", "entropy_lens_cli.app"]


def train_command(root: Path, method: str, sets: list[str], seed: int, steps: int, out: Path) -> list[str]:
    """The `entropy-lens train` command line of one run (``--resume`` when it has checkpoints)."""
    items = ["threads=1", f"sft.cache_dir={root / 'sft_cache'}", *sets]
    cmd = [*cli(), "train", "--preset", "arithmetic-tiny", "--method", method, "--seed", str(seed),
           "--steps", str(steps), *[a for s in items for a in ("--set", s)], "-o", str(out)]
    return cmd + ["--resume"] if (out / "checkpoints").is_dir() else cmd


def run_one(root: Path, name: str, method: str, sets: list[str], seed: int, steps: int) -> int | None:
    """Run (or resume) one setting × seed, its output in ``<root>/logs``; the exit code, None when
    already finished."""
    out = run_dir(root, name, seed)
    if is_done(out):
        return None
    (root / "logs").mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(root / "logs" / f"{name}__seed{seed}.log", "a") as log:
        rc = subprocess.run(train_command(root, method, sets, seed, steps, out), check=False, stdout=log,
                            stderr=subprocess.STDOUT).returncode
    note = "" if rc == 0 else f" — see {root / 'logs' / f'{name}__seed{seed}.log'}"
    print(f"{name} seed {seed}: exit {rc}, {time.time() - t0:.0f} s{note}", flush=True)
    return rc


def tables(root: Path, experiment: str, seeds: list[int]) -> str | None:
    """``entropy-lens table`` over the experiment's run folders, one output folder per metric;
    returns the avg@k markdown (None when no run has started)."""
    runs = [str(run_dir(root, n, s)) for n in EXPERIMENTS[experiment] for s in seeds if run_dir(root, n, s).is_dir()]
    if not runs:
        return None
    text = None
    for metric, folder in METRICS.items():
        out = root / experiment / folder
        res = subprocess.run([*cli(), "table", *runs, "--metric", metric, "--skip-incomplete", "-o", str(out)],
                             check=False, capture_output=True, text=True)
        if res.returncode != 0:
            print(f"{experiment} {metric}: {res.stderr.strip()}", flush=True)
            continue
        if metric == "avg_at_k":
            text = (out / "results.md").read_text()
    return text


def main() -> None:
    """Run the chosen experiments' grids (unless --summarize-only), then their tables."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", nargs="+", choices=list(EXPERIMENTS), default=list(EXPERIMENTS))
    ap.add_argument("--out", type=Path, default=Path("runs/ablations"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--settings", nargs="+", help="only these settings (names as in EXPERIMENTS)")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra --set item for every run")
    ap.add_argument("--summarize-only", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.summarize_only:
        t0 = time.time()
        for seed in args.seeds:  # every setting of a seed before the next seed: a cut-short grid is balanced
            for exp in args.experiment:
                for name, (method, sets) in EXPERIMENTS[exp].items():
                    if args.settings is None or name in args.settings:
                        run_one(args.out, name, method, [*sets, *args.extra], seed, args.steps)
        print(f"grid wall time {time.time() - t0:.0f} s", flush=True)
    for exp in args.experiment:
        text = tables(args.out, exp, args.seeds)
        print(f"\n## {exp}\n\n{text or 'no runs yet'}", flush=True)


if __name__ == "__main__":
    main()
