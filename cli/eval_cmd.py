"""`entropy-lens eval`: avg@k and pass@k of a model on math datasets (resumable)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from entropy_lens_cli.common import (
    ALLOW_PICKLE_HELP,
    add_command,
    check_choice,
    check_int,
    check_positive,
    console,
    err_console,
    input_id,
    load_checkpoint,
    prepare_out_dir,
    run_config,
)
from entropy_lens_cli.placement import (
    DEVICE_MAP_HELP,
    device_map_record,
    refuse_ranks,
    resolve_device_map,
    resolve_placement,
)
from entropy_lens_cli.sample_cmd import KV_CACHE_HELP, check_kv_cache, check_top_p

#: How summary.json names the default model.
BUNDLED = "bundled:smollm2-135m-instruct"


def parse_tags(tags: list[str]) -> dict[str, str]:
    """``--tag key=value`` options as a dict (a later tag wins); one line naming a malformed one."""
    out: dict[str, str] = {}
    for t in tags:
        key, sep, value = t.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--tag {t!r}: expected key=value")
        out[key.strip()] = value.strip()
    return out


def dataset_names(datasets: list[str]) -> list[str]:
    """The short names of ``--dataset`` options; two datasets with one name are refused."""
    from entropy_lens.io.datasets import dataset_name

    names = [dataset_name(d) for d in datasets]
    for i, n in enumerate(names):
        if n in names[:i]:
            raise ValueError(f"--dataset {datasets[i]}: a second dataset named {n!r} (names come from file names)")
    return names


def check_eval_options(datasets: list[str], k: int, temperature: float, top_p: float, max_new_tokens: int,
                       reward: str, limit: int | None, batch_size: int) -> None:
    """Every option of ``eval`` in range (one line naming the option, before any work)."""
    from entropy_lens.rewards import REWARDS

    if not datasets:
        raise ValueError("--dataset: give at least one dataset")
    check_int("-k", k)
    check_positive("--temperature", temperature)
    check_top_p("--top-p", top_p)
    check_int("--max-new-tokens", max_new_tokens)
    check_choice("--reward", reward, list(REWARDS))
    check_int("--limit", limit)
    check_int("--batch-size", batch_size)


def eval_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: eval.parquet, summary.json, config.yaml.")],
    dataset: Annotated[list[str] | None, typer.Option("--dataset", "-d", help="A dataset (verl-schema parquet, problem/answer table, or gsm8k-demo); repeatable.")] = None,
    model: Annotated[str | None, typer.Option("--model", help="HF folder, verl or trainer checkpoint (default: bundled SmolLM2-135M-Instruct).")] = None,
    k: Annotated[int, typer.Option("-k", help="Samples per unique problem.")] = 32,
    temperature: Annotated[float, typer.Option("--temperature")] = 1.0,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling in (0, 1]; 1 = the full softmax.")] = 1.0,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 1024,
    reward: Annotated[str, typer.Option("--reward", help="Verifier: math (math-verify) or dapo.")] = "math",
    limit: Annotated[int | None, typer.Option("--limit", help="The first N unique problems of each dataset.")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Responses generated together.")] = 16,
    device: Annotated[str, typer.Option("--device", help="auto (a GPU when one is visible, else cpu), cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="Model dtype: auto (bfloat16 on a GPU, float32 on the CPU), float32, bfloat16 or float16.")] = "auto",
    tag: Annotated[list[str] | None, typer.Option("--tag", help="key=value stored under summary.json's tags; repeatable.")] = None,
    device_map: Annotated[str, typer.Option("--device-map", help=DEVICE_MAP_HELP)] = "none",
    kv_cache: Annotated[str, typer.Option("--kv-cache", help=KV_CACHE_HELP)] = "dynamic",
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help=ALLOW_PICKLE_HELP)] = False,
    logger: Annotated[list[str] | None, typer.Option("--logger", help="also log the results to: tensorboard (OUT/tensorboard/, at the checkpoint's step tag or 0)")] = None,
) -> None:
    """Sample k answers per unique problem, grade them, and report avg@k and unbiased pass@k
    (resumable: a rerun with the same options continues where it stopped)."""
    from entropy_lens.io.datasets import load_problems
    from entropy_lens.model.load import model_device, model_dtype
    from entropy_lens.pipelines.evaluate import EvalSettings, checkpoint_tags

    dataset, tag = list(dataset or []), list(tag or [])
    for name in logger or []:
        check_choice("--logger", name, ("tensorboard",))
    refuse_ranks("eval")
    check_eval_options(dataset, k, temperature, top_p, max_new_tokens, reward, limit, batch_size)
    check_kv_cache(kv_cache)
    spread = resolve_device_map(device_map, device, "eval")
    where, dtype = resolve_placement(device, dtype)
    names = dataset_names(dataset)
    tags = parse_tags(tag)
    settings = EvalSettings(k=k, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, reward=reward,
                            seed=seed, limit=limit, batch_size=batch_size, kv_cache=kv_cache)
    model_id = input_id(model, "bundled")
    options = {"model": model_id, "datasets": [input_id(d, d) for d in dataset], "k": k, "temperature": temperature,
               "top_p": top_p, "max_new_tokens": max_new_tokens, "reward": reward, "limit": limit, "seed": seed,
               "batch_size": batch_size, "dtype": dtype}
    with prepare_out_dir(out, "eval", options):
        problems = {n: load_problems(d, limit) for n, d in zip(names, dataset)}
        tags = {**checkpoint_tags(model), **tags}
        with console.status("loading model"):
            mdl, tok = load_checkpoint("--model", model, allow_pickle, dtype, where, spread)
        placement = {"device": str(model_device(mdl)), "dtype": model_dtype(mdl), **device_map_record(spread, mdl)}
        summary = evaluate_into(out, mdl, tok, problems, settings, model_id, tags, options, placement)
        if logger:
            log_tensorboard(out, summary)
    print_summary(summary)
    console.print(f"wrote {out}/eval.parquet, {out}/summary.json")


def log_tensorboard(out: Path, summary: dict) -> None:
    """Every dataset's avg@k, pass@k, mean length and truncated share as TensorBoard scalars
    (``<dataset>/pass_at_k/4``) at the model's ``step`` tag (0 without one)."""
    from entropy_lens.tensorboard import TensorBoardLog

    try:
        step = int(summary.get("tags", {}).get("step", 0))
    except (TypeError, ValueError):
        step = 0
    tb = TensorBoardLog(out / "tensorboard")
    try:
        tb.log({"step": step, **summary["datasets"]})
    finally:
        tb.close()


def evaluate_into(out: Path, mdl, tok, problems: dict, settings, model_id: str, tags: dict, options: dict,
                  placement: dict | None = None) -> dict:
    """Write config.yaml (the run's identity, so a rerun with other options is refused), evaluate
    chunk by chunk in OUT/chunks, then write eval.parquet, summary.json (with ``placement``: where
    the model ran) and config.yaml together."""
    from dataclasses import asdict

    from entropy_lens.io.writers import atomic_write_files, atomic_write_yaml, versions
    from entropy_lens.pipelines.evaluate import run_eval, summarize

    config = {"command": "eval", "model": model_id, **asdict(settings), "tags": tags}
    atomic_write_yaml(out / "config.yaml", run_config(config, options, versions()))
    total = sum(len(df) for df in problems.values()) * settings.k
    t0 = time.perf_counter()
    with eval_progress(total) as advance:
        rows, timing = run_eval(mdl, tok, problems, settings, out / "chunks", model_id, progress=advance)
    summary = {
        "kind": "eval",
        "model": BUNDLED if model_id == "bundled" else model_id,
        "settings": {k: getattr(settings, k) for k in ("k", "temperature", "top_p", "max_new_tokens", "reward", "seed",
                                                      "limit")},
        "tags": tags,
        **(placement or {}),
        "datasets": summarize(rows, settings),
        "wall_s": round(timing["wall_s"], 2),
        "tokens_per_s": timing["tokens"] / timing["wall_s"] if timing["wall_s"] > 0 else None,
        "session_wall_s": round(time.perf_counter() - t0, 2),
    }
    atomic_write_files(out, {"eval.parquet": rows, "summary.json": summary,
                             "config.yaml": run_config(config, options, versions())})
    return summary


@contextmanager
def eval_progress(total: int) -> Iterator:
    """A progress bar over responses, with the generated tokens/s of this run; yields
    ``advance(responses, tokens)``."""
    start = time.perf_counter()
    with Progress(TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("[cyan]{task.fields[rate]}"), TimeElapsedColumn(), console=err_console) as prog:
        task = prog.add_task("responses", total=total, rate="")
        tokens = 0

        def advance(responses: int, new_tokens: int) -> None:
            nonlocal tokens
            tokens += new_tokens
            dt = time.perf_counter() - start
            prog.update(task, advance=responses, rate=f"{tokens / dt:,.0f} tok/s" if tokens and dt > 0 else "")

        yield advance


def print_summary(summary: dict) -> None:
    """avg@k and pass@k of each dataset as a table."""
    ks = sorted({int(x) for d in summary["datasets"].values() for x in d["pass_at_k"]})
    t = Table(title=f"eval of {summary['model']}")
    for col in ("dataset", "n", "avg@k", *[f"pass@{x}" for x in ks], "len", "trunc"):
        t.add_column(col, justify="left" if col == "dataset" else "right", no_wrap=True)
    t.caption = "n: unique problems; len: mean response tokens; trunc: fraction cut at --max-new-tokens"
    for name, d in summary["datasets"].items():
        t.add_row(name, str(d["n_problems"]), f"{d['avg_at_k']:.3f}",
                  *[f"{d['pass_at_k'][str(x)]:.3f}" if str(x) in d["pass_at_k"] else "" for x in ks],
                  f"{d['mean_length']:.0f}", f"{d['truncated_frac']:.2f}")
    console.print(t)
    rate = summary["tokens_per_s"]
    console.print(f"wall {summary['wall_s']:.0f} s" + (f", {rate:,.0f} tokens/s" if rate else ""))


def register(app: typer.Typer) -> None:
    add_command(app, "eval", eval_command)
