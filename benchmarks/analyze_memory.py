"""Peak memory of analyzing long sequences on the bundled model, against a naive forward.

    python -m benchmarks.analyze_memory [--seq-len 4096] [--batch 2] [--json OUT.json] [--markdown OUT.md]

Every measurement runs in a fresh Python process (one per row), which loads the bundled
SmolLM2-135M-Instruct (fp32, SDPA attention) and builds ``--batch`` sequences of ``--seq-len``
tokens (a 64-token prompt + the response; token ids drawn uniformly from the vocabulary with a fixed
seed: memory does not depend on the text), runs one 16-token forward (pages in the memory-mapped
weights, which would otherwise count as the first call's memory), then the kernel's RSS high-water mark is reset
(``/proc/self/clear_refs``) and one call is measured:

- ``load only``: nothing (the baseline the other rows add to);
- ``naive``: ``model(input_ids).logits`` for every position, ``.float()``, ``log_softmax`` over the
  vocabulary, log-prob of the next token and H = −Σ p log p — the plain way to get the same two
  per-token numbers;
- ``entropy_lens forward``: :func:`entropy_lens.model.forward.response_stats` with the ``analyze`` default
  micro-batch (decoder hidden states, then the LM head one chunk of response rows at a time,
  consumed in place by the statistics pass);
- ``entropy-lens analyze``: the whole command on a rollout file with exact ids (forward,
  advantages, all closed-form estimators, quadrants, shards, tokens.parquet and summary.json),
  handed the already loaded model so that loading is not counted.

Columns: peak RSS above the state before the call (MiB; includes what the allocator keeps mapped
and kernels' internal workspaces, so it varies from run to run), absolute peak RSS of the process
(MiB), and for the naive and entropy_lens rows the peak bytes of all live tensors and of live
tensors of vocabulary width created during the call (``entropy_lens.testing.memtrack``, deterministic; a
separate process, since tracking slows the call), wall seconds of the measured call. Nothing here
is asserted; the bound on vocabulary-width tensors is tested exactly in ``tests/test_forward.py``
on a tiny model.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.logits_bench import _proc_status_kb as _status_kb

MODES = ("load", "naive", "entropy_lens", "analyze")
LABELS = {"load": "load only", "naive": "naive forward + full log_softmax", "entropy_lens": "entropy_lens forward",
          "analyze": "entropy-lens analyze (whole command)"}
PROMPT_LEN = 64


def _inputs(tok_vocab: int, batch: int, seq_len: int, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, tok_vocab, (batch, seq_len), generator=g)
    return [r[:PROMPT_LEN].tolist() for r in ids], [r[PROMPT_LEN:].tolist() for r in ids]


def naive_stats(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain per-token log-prob of the next token and entropy from full logits ``[B, S, V]``."""
    with torch.no_grad():
        logits = model(input_ids=input_ids, use_cache=False).logits.float()
        logq = torch.log_softmax(logits, dim=-1)
        logp = logq[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        ent = -(logq.exp() * logq).sum(-1)
    return logp, ent


def child(mode: str, batch: int, seq_len: int, track: bool) -> dict:
    """Runs in the fresh process: set up, reset the high-water mark, run ``mode`` once."""
    from entropy_lens.model.forward import pack, response_stats
    from entropy_lens.model.load import load_model
    from entropy_lens.testing.memtrack import live_peak_bytes

    model, tok = load_model(None)
    vocab = model.get_output_embeddings().weight.shape[0]
    prompts, responses = _inputs(vocab, batch, seq_len)
    packed = pack(prompts, responses, pad_id=tok.pad_token_id or 0)
    with torch.no_grad():  # page in the (memory-mapped) weights and warm the kernels: not counted
        model(input_ids=packed.input_ids[:1, :16], use_cache=False)
    run_dir = None
    if mode == "analyze":
        import pandas as pd

        run_dir = Path(tempfile.mkdtemp(prefix="el_mem_"))
        frame = pd.DataFrame({
            "prompt": [tok.decode(p) for p in prompts], "response": [tok.decode(r) for r in responses],
            "reward": [1.0 if i % 2 == 0 else 0.0 for i in range(batch)], "group": ["g"] * batch,
            "prompt_ids": prompts, "response_ids": responses,
        })
        frame.to_parquet(run_dir / "rollouts.parquet", index=False)
        import entropy_lens.model.load as models_mod

        models_mod.load_model = lambda *a, **k: (model, tok)  # the command gets the loaded model: load not counted
    calls = {
        "load": lambda: None,
        "naive": lambda: naive_stats(model, packed.input_ids),
        "entropy_lens": lambda: response_stats(model, packed),
    }
    wide = lambda t: t.dim() >= 1 and t.shape[-1] == vocab  # noqa: E731
    res: dict = {"mode": mode, "vocab": vocab}
    if track and mode in calls:
        res["wide_peak_bytes"] = live_peak_bytes(calls[mode], wide)
        res["all_peak_bytes"] = live_peak_bytes(calls[mode])
        return res
    if mode == "analyze":  # imports are not counted
        from typer.testing import CliRunner

        from entropy_lens_cli.app import app
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kb("VmRSS")
    t0 = time.perf_counter()
    if mode == "analyze":
        out = CliRunner().invoke(app, ["analyze", "--rollouts", str(run_dir / "rollouts.parquet"), "-o", str(run_dir / "a")])
        if out.exit_code != 0:
            raise RuntimeError(out.output)
    else:
        kept = calls[mode]()
    res["seconds"] = time.perf_counter() - t0
    res["peak_rss_delta_bytes"] = (_status_kb("VmHWM") - before) * 1024
    res["peak_rss_bytes"] = _status_kb("VmHWM") * 1024
    if mode != "analyze":
        del kept
    return res


def measure(mode: str, batch: int, seq_len: int, track: bool = False, timeout: float = 1800) -> dict:
    """Run :func:`child` in a fresh interpreter and return its JSON result."""
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "benchmarks.analyze_memory", "--child", mode, "--batch", str(batch), "--seq-len", str(seq_len)]
    if track:
        cmd.append("--track")
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{mode}: child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--track", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.seq_len <= PROMPT_LEN:
        ap.error(f"--seq-len must exceed the {PROMPT_LEN}-token prompt")
    if a.child:
        print(json.dumps(child(a.child, a.batch, a.seq_len, a.track)))
        return 0
    rows = []
    for mode in MODES:
        r = measure(mode, a.batch, a.seq_len)
        if mode in ("naive", "entropy_lens"):
            tr = measure(mode, a.batch, a.seq_len, track=True)
            r["wide_peak_bytes"], r["all_peak_bytes"] = tr["wide_peak_bytes"], tr["all_peak_bytes"]
        rows.append(r)
        print(f"{mode}: {r}", file=sys.stderr)
    mib = 2**20
    vocab = rows[0]["vocab"]
    base = {r["mode"]: r for r in rows}
    lines = [
        f"Analyze memory, bundled SmolLM2-135M (fp32, V = {vocab:,}), {a.batch} × {a.seq_len} tokens "
        f"({platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC)",
        "",
        "| call | peak RSS above start (MiB) | peak RSS of the process (MiB) | peak live tensors, all (MiB) | peak live vocabulary-width tensors (MiB) | s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        wide, every = r.get("wide_peak_bytes"), r.get("all_peak_bytes")
        lines.append(f"| {LABELS[r['mode']]} | {r['peak_rss_delta_bytes'] / mib:,.0f} | {r['peak_rss_bytes'] / mib:,.0f} | "
                     f"{'–' if every is None else f'{every / mib:,.1f}'} | "
                     f"{'–' if wide is None else f'{wide / mib:,.1f}'} | {r['seconds']:.1f} |")
    n, e = base["naive"], base["entropy_lens"]
    lines += ["", f"Full fp32 logits of the batch: {a.batch * a.seq_len * vocab * 4 / mib:,.0f} MiB. "
              f"Peak RSS above start: naive / entropy_lens = {n['peak_rss_delta_bytes'] / max(e['peak_rss_delta_bytes'], 1):.1f}×; "
              f"vocabulary-width tensors: {n['wide_peak_bytes'] / max(e['wide_peak_bytes'], 1):,.0f}×."]
    text = "\n".join(lines)
    print(text)
    if a.markdown:
        a.markdown.write_text(text + "\n")
    if a.json:
        a.json.write_text(json.dumps({"batch": a.batch, "seq_len": a.seq_len, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
