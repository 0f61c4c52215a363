"""`analyze`, `validate` and `sample` against their baselines, per batch, in one process.

    python -m benchmarks.pipeline_bench [--device cpu|cuda] [--dtype float32|bfloat16] \
        [--shape tiny|1.5b|7b] [--rows analyze validate sample] [--reps 3] [--threads N] [--seqs N] \
        [--prompt-len N] [--tokens N] [--micro-batch N] [--prompts N] [--n N] [--batch-size N] \
        [--max-new-tokens N] [--out FILE.json] [--markdown FILE.md]

A randomly initialised Qwen2-shaped model built from a config (nothing downloaded): ``1.5b``
(hidden 1536, 28 layers, 12 heads, 2 KV heads, MLP 8960, vocabulary 151,936, tied head), ``7b``
(3584, 28, 28, 4, 18944, 152,064, untied) or ``tiny`` (64, 2, 4, 2, 128, 512: seconds on a CPU),
in ``--dtype`` on ``--device``, SDPA attention as :func:`entropy_lens.model.load.load_model`
loads it. The tokenizer is a word-level one over the model's whole vocabulary with a ChatML-like
template (as ``make_tokenizer`` in tests/conftest.py). Rollouts: ``--seqs`` sequences of
``--tokens`` random response tokens after a ``--prompt-len``-token prompt, exact ids, rewards
1, 0, 1, ... in one group, no ``old_logp`` (on-policy: every token takes part in the update).
Each row times the library function its CLI command runs (model loading and reading files
excluded) against its baseline, round-robin over ``--reps`` repetitions after one warm-up call
of each (median ms; CUDA synchronised):

- ``analyze``: :func:`entropy_lens.pipelines.analyze.run_analyze` (the settings of the CLI's
  defaults, a fresh shard folder per call: every shard is computed and written, then merged, with
  advantages, estimators, the tokens frame and the summary) and, inside it, the forward
  :func:`entropy_lens.model.forward.response_stats`, against a bare forward of the same packed
  tokens (``model(input_ids, attention_mask).logits`` under ``no_grad``, ``--micro-batch``
  sequences at a time, analyze's micro-batch: the CLI's default 4). Ratio: analyze's response tokens/s over the bare forward's; target ≥ 0.9.
- ``validate``: :func:`entropy_lens.pipelines.validate.run_validate` (SGD, η = 1e-4, with the
  JVP: the forward, the update, the forward after and the η = 0 floor, ``dh_jvp``, the frame and
  summary) with the ``--seqs`` sequences as one micro-batch against one forward + backward of it (:func:`entropy_lens.model.forward.response_logp_entropy` and the
  backward of Σ log p + Σ H, as in benchmarks/jvp_bench.py). Ratio: validate ms over forward +
  backward ms; target ≤ 4.
- ``sample``: :func:`entropy_lens.pipelines.sample.run_sample` (``--prompts`` prompts × ``--n``
  responses, ``--batch-size`` per batch, ``--max-new-tokens``, τ = 1, the ``math`` verifier, a
  fresh shard folder per call) against a plain ``model.generate`` loop over the same prompt ids
  with the same batches, seeds and sampling settings (no logits returned, nothing decoded or
  scored; ``same_responses`` records whether both sampled the same tokens). Ratio: sample's
  response tokens/s over the loop's; no target is set.

Per path: median ms, response tokens/s, and the peak memory of the timed calls (the largest over
the repetitions): on CUDA ``torch.cuda.max_memory_allocated`` reset before each call (absolute,
weights included, and above the allocation at the start of the call); on the CPU the process's
peak resident set (VmHWM, reset through ``/proc/self/clear_refs`` before each call; absolute and
above the resident set at the start), null where that cannot be read. Per pipeline, the median
time of its stages, each measured from the previous progress report the pipeline makes (the
``progress`` callback the CLI passes; ``rest``: after the last one), so a stage holds the work
between two reports: analyze's shards (prepare, manifest, forward, shard files) and the rest
(merge, advantages, estimators, frame, summary); validate's forward (prepare, memory check,
statistics at θ), update (estimators, snapshot, loss, forward + backward per micro-batch), forward
after (the optimizer step; with low-precision weights the fp32 measuring copy and the entropies
before; the entropies after), η = 0 floor + ``dh_jvp``, and the rest (frame, summary); sample's
generation (prompt ids, manifest, ``generate_batches`` with the behaviour log-probs) and the rest
(decode, verifier, shard file, merge). A row that fails (e.g. out of memory) is recorded with its
error and the others still run. Writes ``benchmarks/results/pipeline_<device>_<shape>.json`` and
the ``--markdown`` table after every row (a run cut short by a time limit keeps its finished rows)
and prints the table at the end. Nothing is asserted (tests/test_pipeline_bench.py runs it at the tiny shape).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch

from benchmarks.logits_bench import QWEN2_1P5B, device_name
from benchmarks.logits_bench import _proc_status_kb as _status_kb
from entropy_lens.testing.tokenizers import SPECIALS

SHAPES = {
    "tiny": {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
             "rope_theta": 1_000_000.0, "tie_word_embeddings": True},
    "1.5b": QWEN2_1P5B,
    "7b": {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
           "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 32768,
           "rope_theta": 1_000_000.0, "tie_word_embeddings": False},
}

#: Default token counts per shape (each overridable by its flag).
_GPU_WORKLOAD = {"seqs": 4, "prompt_len": 64, "tokens": 1024, "micro_batch": 4, "prompts": 2, "n": 8,
                 "batch_size": 16, "max_new_tokens": 256}
WORKLOADS = {
    "tiny": {"seqs": 4, "prompt_len": 16, "tokens": 64, "micro_batch": 4, "prompts": 2, "n": 2, "batch_size": 4,
             "max_new_tokens": 16},
    "1.5b": _GPU_WORKLOAD,
    "7b": _GPU_WORKLOAD,
}

ROWS = ("analyze", "validate", "sample")
#: (what the ratio is, target, how the ratio must compare with it) per row.
TARGETS = {
    "analyze": ("analyze tokens/s ÷ bare forward tokens/s", 0.9, ">="),
    "validate": ("validate ms ÷ forward + backward ms", 4.0, "<="),
    "sample": ("sample tokens/s ÷ model.generate loop tokens/s", None, None),
}
FIRST_WORD = len(SPECIALS)  # ids below are special tokens; random prompts and responses avoid them


def build(shape: str, device: str, dtype: str):
    """A Qwen2-shaped causal LM with random weights, initialised directly on ``device`` in ``dtype``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(**SHAPES[shape], attn_implementation="sdpa")
    prev = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(prev)
    return model


def make_tokenizer(vocab: int):
    """A word-level fast tokenizer whose ids cover the model's vocabulary: the specials, then words
    ``w6 … w{vocab-1}`` (every id decodes), with a ChatML-like template; EOS ``<|im_end|>``."""
    from entropy_lens.testing.tokenizers import word_level_tokenizer

    return word_level_tokenizer([f"w{i}" for i in range(FIRST_WORD, vocab)])


def make_rollouts(tok, vocab: int, seqs: int, prompt_len: int, tokens: int) -> pd.DataFrame:
    """A validated rollouts frame (as ``entropy-lens analyze/validate`` read it): exact random ids,
    rewards alternating 1, 0 in one group, no ``old_logp``."""
    from entropy_lens.io.rollouts import validate_rollouts

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(FIRST_WORD, vocab, (seqs, prompt_len + tokens), generator=g)
    prompts, responses = [r[:prompt_len].tolist() for r in ids], [r[prompt_len:].tolist() for r in ids]
    frame = pd.DataFrame({"prompt": [tok.decode(p) for p in prompts], "response": [tok.decode(r) for r in responses],
                          "reward": [1.0 if i % 2 == 0 else 0.0 for i in range(seqs)], "group": ["g"] * seqs,
                          "prompt_ids": prompts, "response_ids": responses})
    return validate_rollouts(frame, "<pipeline_bench>")


def make_prompts(vocab: int, n_prompts: int, prompt_len: int) -> pd.DataFrame:
    """``sample``'s prompt table (``load_prompts``' columns that ``run_sample`` reads): one user
    message of random words each, ``prompt_len`` tokens after the chat template."""
    g = torch.Generator().manual_seed(2)
    words = max(1, prompt_len - 5)  # the template adds <|im_start|> user … <|im_end|> <|im_start|> assistant
    ids = torch.randint(FIRST_WORD, vocab, (n_prompts, words), generator=g)
    return pd.DataFrame({"prompt": [[{"role": "user", "content": " ".join(f"w{i}" for i in r.tolist())}] for r in ids],
                         "ground_truth": ["42"] * n_prompts})


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _mem_start(device: str) -> int | None:
    """Reset the peak-memory counter; the bytes in use now (None where unknown)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        return _status_kb("VmRSS") * 1024
    except (OSError, RuntimeError):
        return None


def _mem_peak(device: str) -> int | None:
    """Peak bytes since :func:`_mem_start` (None where unknown)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    try:
        return _status_kb("VmHWM") * 1024
    except (OSError, RuntimeError):
        return None


class Stages:
    """A pipeline's ``progress(stage, n)`` callback that books the time since the previous report
    (CUDA synchronised) to ``stage``; reports of stages outside ``only`` are ignored."""

    def __init__(self, device: str, only: tuple[str, ...] | None = None):
        self.device, self.only = device, only
        self.runs: list[dict[str, float]] = []

    def start(self) -> None:
        self.ms: dict[str, float] = {}
        self.last = time.perf_counter()

    def __call__(self, stage: str, n: int = 0) -> None:
        if self.only is not None and stage not in self.only:
            return
        _sync(self.device)
        t = time.perf_counter()
        self.ms[stage] = self.ms.get(stage, 0.0) + (t - self.last) * 1e3
        self.last = t

    def finish(self) -> None:
        _sync(self.device)
        self.ms["rest"] = (time.perf_counter() - self.last) * 1e3
        self.runs.append(self.ms)

    def medians(self) -> dict[str, float]:
        keys = dict.fromkeys(k for r in self.runs for k in r)
        return {k: round(statistics.median(r.get(k, 0.0) for r in self.runs), 1) for k in keys}


def measure(paths: dict[str, Callable[[], object]], device: str, reps: int, scratch: Path,
            stages: dict[str, Stages] | None = None) -> dict[str, dict]:
    """Time ``paths`` round-robin (one warm-up call each, then ``reps`` rounds); per path the list of
    ms and the largest peak / peak above start (bytes) of the timed calls. ``scratch`` is emptied
    after every call (outside the timing)."""
    stages = stages or {}
    out = {k: {"ms": [], "peak": None, "above": None} for k in paths}

    def call(name: str, fn: Callable[[], object], timed: bool) -> None:
        start = _mem_start(device)
        if name in stages:
            stages[name].start()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ms = (time.perf_counter() - t0) * 1e3
        peak = _mem_peak(device)
        if name in stages:
            stages[name].finish()
            if not timed:
                stages[name].runs.pop()
        for p in scratch.iterdir():
            shutil.rmtree(p, ignore_errors=True)
        if timed:
            r = out[name]
            r["ms"].append(ms)
            if peak is not None and start is not None:
                r["peak"] = max(r["peak"] or 0, peak)
                r["above"] = max(r["above"] or 0, peak - start)

    for name, fn in paths.items():  # warm-up
        call(name, fn, timed=False)
    for _ in range(reps):
        for name, fn in paths.items():
            call(name, fn, timed=True)
    return out


def _mib(x: int | None) -> float | None:
    return None if x is None else round(x / 2**20, 1)


def path_rows(times: dict[str, dict], tokens: dict[str, int]) -> list[dict]:
    rows = []
    for name, r in times.items():
        ms = statistics.median(r["ms"])
        rows.append({"path": name, "ms": round(ms, 2), "tokens": tokens[name],
                     "tokens_per_s": round(tokens[name] / (ms / 1e3), 1),
                     "peak_mib": _mib(r["peak"]), "peak_above_start_mib": _mib(r["above"])})
    return rows


def finish_row(row: str, paths: list[dict], ratio: float, stages: dict[str, float], extra: dict) -> dict:
    what, target, op = TARGETS[row]
    met = None if target is None else (ratio >= target if op == ">=" else ratio <= target)
    return {"row": row, "paths": paths, "ratio": round(ratio, 3), "ratio_is": what, "target": target,
            "target_op": op, "met": met, "stages_ms": stages, **extra}


def row_analyze(model, tok, w: dict, device: str, reps: int, scratch: Path) -> dict:
    from entropy_lens.model.forward import response_stats
    from entropy_lens.pipelines.analyze import AnalyzeSettings, run_analyze
    from entropy_lens.pipelines.prepare import prepare

    vocab = model.get_output_embeddings().weight.shape[0]
    frame = make_rollouts(tok, vocab, w["seqs"], w["prompt_len"], w["tokens"])
    settings = AnalyzeSettings(micro_batch=w["micro_batch"])  # the CLI's defaults otherwise
    packed = prepare(frame, tok).packed().to(device)
    n_tok = int(packed.mask.sum())
    mb = settings.micro_batch
    stages = {"analyze (run_analyze)": Stages(device, only=("tokens",))}
    count = iter(range(10**9))

    @torch.no_grad()
    def bare() -> None:
        for i in range(0, packed.input_ids.shape[0], mb):
            model(input_ids=packed.input_ids[i : i + mb], attention_mask=packed.attention_mask[i : i + mb],
                  use_cache=False)  # logits of every position, as the model returns them

    def analyze() -> None:
        run_analyze(model, tok, frame, settings, scratch / f"shards{next(count)}",
                    progress=stages["analyze (run_analyze)"])

    paths = {"bare forward": bare,
             "response_stats (analyze's forward)": lambda: response_stats(model, packed, settings.temperature,
                                                                           micro_batch=mb),
             "analyze (run_analyze)": analyze}
    times = measure(paths, device, reps, scratch, stages)
    rows = path_rows(times, dict.fromkeys(paths, n_tok))
    ratio = rows[2]["tokens_per_s"] / rows[0]["tokens_per_s"]
    st = stages["analyze (run_analyze)"].medians()
    st = {"shards (forward + shard files)": st.get("tokens"), "merge, estimators, frame, summary": st.get("rest")}
    return finish_row("analyze", rows, ratio, st, {
        "sequences": w["seqs"], "prompt_tokens": w["prompt_len"], "response_tokens": n_tok,
        "micro_batch": mb, "response_stats_vs_bare": round(rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"], 3)})


def row_validate(model, tok, w: dict, device: str, reps: int, scratch: Path) -> dict:
    from entropy_lens.model.forward import response_logp_entropy
    from entropy_lens.pipelines.prepare import prepare
    from entropy_lens.pipelines.validate import ValidateSettings, run_validate

    vocab = model.get_output_embeddings().weight.shape[0]
    frame = make_rollouts(tok, vocab, w["seqs"], w["prompt_len"], w["tokens"])
    settings = ValidateSettings(micro_batch=w["seqs"])  # one micro-batch; the CLI's defaults otherwise
    packed = prepare(frame, tok).packed().to(device)
    n_tok = int(packed.mask.sum())
    mb = packed.select(slice(0, settings.micro_batch))
    stages = {"validate (run_validate)": Stages(device)}

    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)
        logp, ent = response_logp_entropy(model, mb, settings.temperature)
        (logp.sum() + ent.sum()).backward()
        model.zero_grad(set_to_none=True)

    def validate() -> None:
        run_validate(model, tok, frame, settings, progress=stages["validate (run_validate)"])

    paths = {"forward + backward (one micro-batch)": forward_backward, "validate (run_validate)": validate}
    times = measure(paths, device, reps, scratch, stages)
    rows = path_rows(times, {"forward + backward (one micro-batch)": int(mb.mask.sum()),
                             "validate (run_validate)": n_tok})
    ratio = rows[1]["ms"] / rows[0]["ms"]
    st = stages["validate (run_validate)"].medians()
    names = {"forward": "prepare + forward at θ", "update": "estimators + update forward/backward",
             "forward after": "optimizer step + forward after", "jvp": "η = 0 floor + dh_jvp",
             "rest": "frame, summary"}
    return finish_row("validate", rows, ratio, {names.get(k, k): v for k, v in st.items()}, {
        "sequences": w["seqs"], "prompt_tokens": w["prompt_len"], "response_tokens": n_tok,
        "micro_batch": settings.micro_batch, "optimizer": settings.optimizer, "lr": settings.lr, "jvp": settings.jvp})


def row_sample(model, tok, w: dict, device: str, reps: int, scratch: Path) -> dict:
    from entropy_lens.io.prompts import chat_prompt_ids
    from entropy_lens.model.generate import batch_seed, response_jobs
    from entropy_lens.pipelines.sample import SampleSettings, run_sample

    vocab = model.get_output_embeddings().weight.shape[0]
    prompts = make_prompts(vocab, w["prompts"], w["prompt_len"])
    settings = SampleSettings(n=w["n"], max_new_tokens=w["max_new_tokens"], batch_size=w["batch_size"])
    jobs = response_jobs([chat_prompt_ids(tok, list(m)) for m in prompts["prompt"]], settings.n)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    stages = {"sample (run_sample)": Stages(device, only=("responses",))}
    got: dict[str, list[list[int]]] = {}  # the responses of each path's last call
    count = iter(range(10**9))

    @torch.no_grad()
    def generate_loop() -> None:
        responses = []
        for k in range(-(-len(jobs) // settings.batch_size)):
            chunk = [p for _, p in jobs[k * settings.batch_size : (k + 1) * settings.batch_size]]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
            attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
            torch.manual_seed(batch_seed(settings.seed, k))
            seq = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=settings.max_new_tokens,
                                 pad_token_id=pad, eos_token_id=eos, do_sample=True, temperature=settings.temperature,
                                 top_k=0, top_p=settings.top_p)[:, width:].cpu()
            for r in seq.tolist():  # up to and including the first EOS, as sample cuts them
                responses.append(r[: r.index(eos) + 1] if eos in r else r)
        got["model.generate loop"] = responses

    def sample() -> None:
        frame = run_sample(model, tok, prompts, settings, scratch / f"parts{next(count)}",
                           progress=stages["sample (run_sample)"])
        got["sample (run_sample)"] = [list(r) for r in frame["response_ids"]]

    paths = {"model.generate loop": generate_loop, "sample (run_sample)": sample}
    times = measure(paths, device, reps, scratch, stages)
    rows = path_rows(times, {k: sum(len(r) for r in v) for k, v in got.items()})
    ratio = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    same = got["model.generate loop"] == got["sample (run_sample)"]
    st = stages["sample (run_sample)"].medians()
    st = {"prompts + generate_batches": st.get("responses"), "decode, score, shard file, merge": st.get("rest")}
    return finish_row("sample", rows, ratio, st, {
        "prompts": w["prompts"], "n": settings.n, "responses": len(jobs), "prompt_tokens": len(jobs[0][1]),
        "batch_size": settings.batch_size, "max_new_tokens": settings.max_new_tokens, "reward": settings.reward,
        "same_responses": same})


RUNNERS = {"analyze": row_analyze, "validate": row_validate, "sample": row_sample}


def _fmt(x, spec: str = "") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown(result: dict) -> str:
    """The result as a header line and one table (one line per path; ratio, target and stages on
    the pipeline's line)."""
    s = result["shape"]
    head = (f"Pipelines against their baselines: {result['device_name']}, Qwen2-shaped `{s['name']}` "
            f"(hidden {s['hidden_size']}, {s['num_hidden_layers']} layers, V = {s['vocab_size']:,}), "
            f"{result['dtype']}, torch {result['torch']}, median of {result['reps']}, {result['date']}")
    lines = [head, "",
             "| row | path | tokens | ms | tokens/s | peak MiB | above start MiB | ratio | target | met | stages (ms) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['row']} | failed: {r['error'][:120]} | | | | | | | | | |")
            continue
        for i, p in enumerate(r["paths"]):
            last = i == len(r["paths"]) - 1
            target = f"{r['target_op'].replace('>=', '≥ ').replace('<=', '≤ ')}{r['target']}" if r["target"] else "–"
            stages = "; ".join(f"{k} {_fmt(v, ',.1f')}" for k, v in r["stages_ms"].items())
            met = {True: "yes", False: "no", None: "–"}[r["met"]]
            lines.append(f"| {r['row']} | {p['path']} | {p['tokens']:,} | {_fmt(p['ms'], ',.1f')} | "
                         f"{_fmt(p['tokens_per_s'], ',.0f')} | {_fmt(p['peak_mib'], ',.0f')} | "
                         f"{_fmt(p['peak_above_start_mib'], ',.0f')} | "
                         + (f"{r['ratio']:.2f} | {target} | {met} | {stages} |" if last else "| | | |"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--shape", default="tiny", choices=tuple(SHAPES))
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    for k in WORKLOADS["tiny"]:
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=None, help="default: per --shape")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, default=None)
    a = ap.parse_args(argv)
    w = {k: getattr(a, k) or v for k, v in WORKLOADS[a.shape].items()}
    if a.threads:
        torch.set_num_threads(a.threads)
    model = build(a.shape, a.device, a.dtype)
    tok = make_tokenizer(SHAPES[a.shape]["vocab_size"])
    kind = a.device.split(":")[0]
    out = a.out or Path(f"benchmarks/results/pipeline_{kind}_{a.shape}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"device": a.device, "device_name": device_name(kind), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "dtype": a.dtype,
              "shape": {"name": a.shape, **SHAPES[a.shape]}, "workload": w, "reps": a.reps,
              "date": f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC", "rows": []}
    with tempfile.TemporaryDirectory(prefix="el_pipe_") as tmp:
        for row in a.rows:
            if kind == "cuda":
                torch.cuda.empty_cache()
            try:
                result["rows"].append(RUNNERS[row](model, tok, w, a.device, a.reps, Path(tmp)))
            except Exception as exc:  # noqa: BLE001 - a failed row (e.g. out of memory) is recorded, the others run
                result["rows"].append({"row": row, "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]})
            out.write_text(json.dumps(result, indent=2) + "\n")
            if a.markdown:
                a.markdown.write_text(markdown(result) + "\n")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
