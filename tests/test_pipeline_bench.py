"""benchmarks/pipeline_bench.py at the tiny shape on the CPU: every row runs and its JSON is complete
and consistent (timings are not asserted, only that they are finite and positive)."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

PATHS = {
    "analyze": ["bare forward", "response_stats (analyze's forward)", "analyze (run_analyze)"],
    "validate": ["forward + backward (one micro-batch)", "validate (run_validate)"],
    "sample": ["model.generate loop", "sample (run_sample)"],
}
ROW_KEYS = {"row", "paths", "ratio", "ratio_is", "target", "target_op", "met", "stages_ms"}
PATH_KEYS = {"path", "ms", "tokens", "tokens_per_s", "peak_mib", "peak_above_start_mib"}


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_pipeline_bench_tiny_cpu(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    bench = importlib.import_module("benchmarks.pipeline_bench")
    out, md = tmp_path / "pipe.json", tmp_path / "pipe.md"
    threads = torch.get_num_threads()
    try:  # one thread: a tiny model's many small ops are slowest when a second thread spins on a busy machine
        args = ["--shape", "tiny", "--device", "cpu", "--reps", "1", "--threads", "1", "--out", str(out), "--markdown", str(md)]
        assert bench.main(args) == 0
    finally:
        torch.set_num_threads(threads)
    res = json.loads(out.read_text())

    assert res["device"] == "cpu" and res["dtype"] == "float32" and res["reps"] == 1 and res["threads"] == 1
    assert res["device_name"] and res["torch"]
    assert res["shape"]["name"] == "tiny" and res["shape"]["vocab_size"] == 512
    w = res["workload"]
    assert [r["row"] for r in res["rows"]] == list(PATHS)
    table = md.read_text()
    for r in res["rows"]:
        assert "error" not in r, r
        assert ROW_KEYS <= set(r), (r["row"], ROW_KEYS - set(r))
        assert [p["path"] for p in r["paths"]] == PATHS[r["row"]]
        for p in r["paths"]:
            assert PATH_KEYS <= set(p), (r["row"], p)
            assert all(_positive(p[k]) for k in ("ms", "tokens", "tokens_per_s")), (r["row"], p)
            assert abs(p["tokens_per_s"] - p["tokens"] / (p["ms"] / 1e3)) <= 1e-3 * p["tokens_per_s"] + 0.1, p
            if sys.platform.startswith("linux"):  # peak resident set from /proc
                assert _positive(p["peak_mib"]), p
                assert p["peak_above_start_mib"] is not None and p["peak_above_start_mib"] >= 0, p
        assert _positive(r["ratio"]), r
        base, pipe = r["paths"][0], r["paths"][-1]
        if r["row"] == "validate":
            assert math.isclose(r["ratio"], pipe["ms"] / base["ms"], rel_tol=1e-2), r
        else:
            assert math.isclose(r["ratio"], pipe["tokens_per_s"] / base["tokens_per_s"], rel_tol=1e-2), r
        if r["target"] is None:
            assert r["met"] is None and r["row"] == "sample"
        else:
            ok = r["ratio"] >= r["target"] if r["target_op"] == ">=" else r["ratio"] <= r["target"]
            assert r["met"] is ok and r["target"] == {"analyze": 0.9, "validate": 4.0}[r["row"]]
        assert r["stages_ms"] and all(_positive(v) for v in r["stages_ms"].values()), r["stages_ms"]
        assert f"| {r['row']} | {pipe['path']} |" in table
    rows = {r["row"]: r for r in res["rows"]}
    # every path of a row works on the same tokens
    assert {p["tokens"] for p in rows["analyze"]["paths"]} == {w["seqs"] * w["tokens"]}
    assert {p["tokens"] for p in rows["validate"]["paths"]} == {w["seqs"] * w["tokens"]}
    # the generate loop uses the same batches, seeds and settings as sample: the same responses
    n_resp = w["prompts"] * w["n"]
    gen, smp = (p["tokens"] for p in rows["sample"]["paths"])
    assert rows["sample"]["same_responses"] is True
    assert gen == smp and n_resp <= smp <= n_resp * w["max_new_tokens"]
    assert rows["validate"]["jvp"] is True and rows["validate"]["micro_batch"] == w["seqs"]
