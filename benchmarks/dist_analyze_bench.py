"""`analyze` on one process against the same run under torchrun with N processes, on the CPU.

    python -m benchmarks.dist_analyze_bench [--procs 2] [--shard-size 2] [--reps 2]

Each repetition runs, one after the other (round-robin, so a change of load hits both alike):

- ``1 process``: ``entropy-lens analyze`` on the bundled model and rollouts, with every CPU thread
  (``OMP_NUM_THREADS`` = the CPU count);
- ``N processes``: ``torchrun --standalone --nproc-per-node N --no-python entropy-lens analyze``
  with the same options and ``OMP_NUM_THREADS`` = CPU count / N per rank (the same cores in all).

Columns: median wall seconds of the command (model loading and the merge included), tokens/s
(response tokens of the run / wall seconds), the throughput ratio against one process, and the peak
resident memory of the largest process of the command's tree (per rank under torchrun). The two runs' ``tokens.parquet`` are compared column by column (max
abs difference of the float columns). Writes ``benchmarks/results/dist_analyze_cpu.json``; nothing
is asserted (equality is tested in tests/test_dist.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd


def _run(cmd: list[str], threads: int, log: Path) -> tuple[float, float]:
    """(wall seconds, max RSS in MiB over ``cmd``'s process tree) of one run: ``os.wait4`` reports
    the child's usage including its waited-for descendants (under torchrun: the largest rank)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    t0 = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:]
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {tail}")
    return wall, usage.ru_maxrss / 1024.0  # KiB -> MiB (Linux)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--shard-size", type=int, default=2, help="sequences per shard (the bundled rollouts hold 8)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/dist_analyze_cpu.json"))
    a = ap.parse_args()
    cpus = os.cpu_count() or 1
    exe = shutil.which("entropy-lens") or sys.exit("entropy-lens is not on PATH")
    torchrun = shutil.which("torchrun") or sys.exit("torchrun is not on PATH")
    common = ["analyze", "--shard-size", str(a.shard_size), "--no-figures", "--device", "cpu"]
    runs = {
        "1 process": ([exe], max(1, cpus)),
        f"{a.procs} processes": ([torchrun, "--standalone", f"--nproc-per-node={a.procs}", "--no-python", exe],
                                 max(1, cpus // a.procs)),
    }
    walls: dict[str, list[float]] = {k: [] for k in runs}
    rss: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(a.reps):
            for name, (prefix, threads) in runs.items():
                out = Path(tmp) / f"{name.split()[0]}_{rep}"
                wall, peak = _run(prefix + common + ["-o", str(out)], threads, Path(tmp) / f"{out.name}.log")
                walls[name].append(wall)
                rss[name] = max(rss.get(name, 0.0), peak)
        frames = {name: pd.read_parquet(Path(tmp) / f"{name.split()[0]}_0" / "tokens.parquet") for name in runs}
    one, many = frames.values()
    floats = [c for c in one.columns if one[c].dtype.kind == "f"]
    max_diff = float(max(np.nanmax(np.abs(one[c].to_numpy() - many[c].to_numpy())) for c in floats))
    n_tok = len(one)
    base = statistics.median(walls["1 process"])
    rows = []
    for name in runs:
        w = statistics.median(walls[name])
        rows.append({"run": name, "wall_s": round(w, 2), "tokens": n_tok, "tokens_per_s": round(n_tok / w, 1),
                     "throughput_vs_1": round(base / w, 3), "threads_per_process": runs[name][1],
                     "peak_rss_mib_largest_process": round(rss[name], 1)})
    result = {"device": "cpu", "cpus": cpus, "procs": a.procs, "shard_size": a.shard_size,
              "reps": a.reps, "rows": rows, "max_abs_diff_float_columns": max_diff}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| run | threads/process | wall s (median) | tokens/s | throughput vs 1 process | peak RSS MiB (largest process) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['threads_per_process']} | {r['wall_s']} | {r['tokens_per_s']} | {r['throughput_vs_1']} "
              f"| {r['peak_rss_mib_largest_process']} |")
    print(f"max |Δ| over float columns: {max_diff:.2e}")


if __name__ == "__main__":
    main()
