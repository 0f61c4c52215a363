"""`entropy-lens demo`: the embedded default, end to end on the bundled model and shipped data."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from entropy_lens_cli.common import (
    add_command,
    check_int,
    check_positive,
    console,
    default_rollouts,
    estimator_table,
    load_checkpoint,
    prepare_out_dir,
    run_config,
    stage_progress,
    write_run,
)
from entropy_lens_cli.placement import refuse_ranks, resolve_placement


def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Run directory."),
    prompts: Optional[int] = typer.Option(None, "--prompts", help="Shipped GSM8K problems to sample (default: all of them)."),
    n: int = typer.Option(4, "-n", help="Responses per problem."),
    max_new_tokens: int = typer.Option(96, "--max-new-tokens"),
    lr: float = typer.Option(1e-4, "--lr", help="SGD learning rate of the validation step."),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device", help="auto (a GPU when one is visible, else cpu), cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", "--dtype", help="Model dtype: auto (bfloat16 on a GPU, float32 on the CPU), float32, bfloat16 or float16; the validation step updates an fp32 master copy and measures in float32."),
) -> None:
    """Sample → analyze → validate (one real SGD step) → compare methods → figures and report, in runs/demo.

    The analyzed batch is the fresh samples plus the shipped rollouts of the same model on the same
    problems, so that it holds groups with mixed rewards (non-zero advantages) even when every
    fresh sample is wrong."""
    from entropy_lens.io.datasets import load_prompts

    refuse_ranks("demo")
    check_int("--prompts", prompts)
    check_int("-n", n)
    check_int("--max-new-tokens", max_new_tokens)
    check_positive("--lr", lr)
    device, dtype = resolve_placement(device, dtype)
    options = {"prompts": prompts, "n": n, "max_new_tokens": max_new_tokens, "lr": lr, "seed": seed, "dtype": dtype,
               "device": device.split(":")[0]}
    t0 = time.time()
    with prepare_out_dir(out, "demo", options):
        table = load_prompts("gsm8k-demo", prompts)
        if prompts is not None and len(table) < prompts:
            console.print(f"note: the shipped gsm8k-demo set has {len(table)} problems; using all {len(table)} "
                          f"(--prompts {prompts})", soft_wrap=True)
        with console.status("loading the bundled model (first run converts it into the cache, ~1 min)"):
            model, tok = load_checkpoint("--model", None, dtype=dtype, device=device)
        rollouts, rollouts_path = demo_rollouts(out, model, tok, table, n, max_new_tokens, seed, options)
        run_stages(out, model, tok, rollouts, rollouts_path, lr, seed)
        made = render_outputs(out)
    console.print(f"\n[bold]done in {time.time() - t0:.0f} s.[/] {out}/ holds:")
    for line in [
        "rollouts.parquet            fresh samples + shipped rollouts (exact ids, behaviour log-probs, rewards)",
        "analyze/tokens.parquet      per-token p, H, Σp², estimators, quadrants; analyze/summary.json",
        "validate/tokens.parquet     + dh_jvp and dh_measured of one real SGD step; validate/summary.json",
        "validate/compare/           per-method weights and predicted ΔH (compare.parquet, summary.json)",
        *made,
    ]:
        console.print(f"  {line}", soft_wrap=True)


def demo_rollouts(out: Path, model, tok, table, n: int, max_new_tokens: int, seed: int, options: dict):
    """The demo's batch: OUT/rollouts.parquet when a demo with the same options wrote it, else
    fresh samples + the shipped rollouts, written together with OUT/config.yaml (the options)."""
    from entropy_lens.io import rollouts as ro
    from entropy_lens.io.writers import atomic_write_files, versions
    from entropy_lens.pipelines.sample import sample_rollouts

    rollouts_path = out / "rollouts.parquet"
    if rollouts_path.exists():
        console.print(f"reusing {rollouts_path}")
    else:
        with stage_progress({"sample": len(table) * n}) as advance:
            fresh = sample_rollouts(model, tok, table, n=n, max_new_tokens=max_new_tokens, seed=seed,
                                    batch_size=len(table) * n, progress=lambda k: advance("sample", k))
        acc = float((fresh["reward"] > 0).mean())
        console.print(f"[bold]1. sampled[/] {len(fresh)} responses to {len(table)} shipped GSM8K problems, "
                      f"accuracy {acc:.3f}")
        atomic_write_files(out, {"rollouts.parquet": demo_batch(fresh, ro.read_table(default_rollouts())),
                                 "config.yaml": run_config({"command": "demo"}, options, versions())})
    rollouts = ro.load_rollouts(rollouts_path)
    console.print(f"   batch: {len(rollouts)} responses = the fresh samples + the {int(rollouts['source'].eq('shipped').sum())} "
                  "shipped rollouts of the same model (so that some groups have mixed rewards)", soft_wrap=True)
    return rollouts, rollouts_path


def run_stages(out: Path, model, tok, rollouts, rollouts_path: Path, lr: float, seed: int) -> None:
    """analyze → validate → compare on the demo batch, each into its own sub-folder of OUT."""
    from entropy_lens.io.writers import atomic_write_json, atomic_write_parquet
    from entropy_lens.logits import recording_paths
    from entropy_lens.methods import list_methods
    from entropy_lens.model.load import model_device, model_dtype
    from entropy_lens.pipelines.analyze import AnalyzeSettings, run_analyze
    from entropy_lens.pipelines.compare import compare_methods
    from entropy_lens.pipelines.validate import ValidateSettings, run_validate

    n_tok = int(sum(len(r) for r in rollouts["response_ids"]))
    with stage_progress({"tokens": n_tok}) as advance, recording_paths() as paths:
        tokens, summary = run_analyze(model, tok, rollouts, AnalyzeSettings(lr=lr), out / "analyze" / "shards",
                                      source=str(rollouts_path), progress=advance)
    placement = {"device": str(model_device(model)), "dtype": model_dtype(model)}
    summary.update(placement, statistics_path=dict(paths))
    write_run(out / "analyze", tokens, summary, {"command": "demo/analyze", "lr": lr, **placement})
    q = summary["quadrants"]
    console.print("[bold]2. analyzed[/] " + ", ".join(f"{k}: {v['token_share']:.2f}" for k, v in q.items()) + " (token shares)")

    B = len(rollouts)
    with stage_progress({"forward": B, "update": B, "forward after": B, "jvp": B}) as advance, recording_paths() as paths:
        vtokens, vsummary = run_validate(model, tok, rollouts, ValidateSettings(lr=lr, optimizer="sgd"),
                                         str(rollouts_path), progress=advance)
    vsummary.update(placement, statistics_path=dict(paths))
    write_run(out / "validate", vtokens, vsummary, {"command": "demo/validate", "lr": lr, "optimizer": "sgd", **placement})
    console.print(estimator_table(vsummary["estimators"], f"3. ΔH estimators vs one real SGD step (lr={lr:g})"))

    long_df, csummary = compare_methods(vtokens, list_methods(), {}, lr=lr, seed=seed)
    atomic_write_parquet(out / "validate" / "compare" / "compare.parquet", long_df)
    atomic_write_json(out / "validate" / "compare" / "summary.json", csummary)
    skipped = csummary["skipped"]
    note = f" ({', '.join(skipped)} skipped: {'; '.join(skipped.values())})" if skipped else ""
    console.print(f"[bold]4. compared[/] {len(csummary['methods'])} methods on the same tokens{note}")


def demo_batch(fresh, shipped):
    """Fresh samples and the shipped rollouts in one rollout frame (groups kept apart, ``source``
    column says which is which)."""
    import pandas as pd

    cols = ["prompt", "response", "reward", "ground_truth", "group", "prompt_ids", "response_ids", "old_logp"]
    a = fresh[cols].assign(group="sampled-" + fresh["group"].astype(str), source="sampled")
    b = shipped[cols].assign(group="shipped-" + shipped["group"].astype(str), source="shipped")
    return pd.concat([a, b], ignore_index=True)


def render_outputs(out: Path) -> list[str]:
    """Figures (PNG + CSV) and the HTML report of the validate run."""
    from entropy_lens.plots import save_run_figures
    from entropy_lens_cli.report_cmd import report

    names = save_run_figures(out / "validate", out / "figures", registry=True)
    console.print(f"wrote {len(names)} figures (PNG + CSV) to {out}/figures: {', '.join(names)}")
    report(run=out / "validate", out=out / "report.html", max_responses=12, max_tokens=400, seed=0, figures=True, dpi=100)
    return [
        "figures/                    paper-style figures (PNG) and the numbers behind each (CSV)",
        "report.html                 one self-contained page: tables, figures, tokens coloured by ΔH",
    ]


def register(app: typer.Typer) -> None:
    add_command(app, "demo", demo)
