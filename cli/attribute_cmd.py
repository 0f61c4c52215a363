"""`entropy-lens attribute`: where each token's first-order entropy change comes from."""

from __future__ import annotations

import math
import time
from pathlib import Path

import typer

from entropy_lens_cli.common import (
    ALLOW_PICKLE_HELP,
    add_command,
    check_choice,
    check_int,
    check_non_negative,
    check_positive,
    console,
    default_rollouts,
    estimator_table,
    input_id,
    load_checkpoint,
    prepare_out_dir,
    stage_progress,
)
from entropy_lens_cli.placement import REFUSED_DEVICE_MAP_HELP, refuse_ranks, resolve_device_map


def parse_by(by: str) -> tuple[str, ...]:
    """``--by`` as a tuple of split names (comma-separated; unknown names: one line, exit 2)."""
    from entropy_lens.pipelines.attribute import check_splits

    parts = tuple(dict.fromkeys(p.strip() for p in by.split(",") if p.strip()))
    check_splits(parts)
    return parts


def check_attribute_options(lr: float, optimizer: str, temperature: float, eps_low: float, eps_high: float,
                            micro_batch: int, limit: int | None, max_len: int | None, chunk_rows: int) -> None:
    """Every numeric option of ``attribute`` in range (one line naming the option, before any work)."""
    check_choice("--optimizer", optimizer, ("sgd", "adamw"))
    check_positive("--lr", lr)
    check_positive("--temperature", temperature)
    check_non_negative("--eps-low", eps_low)
    check_non_negative("--eps-high", eps_high, allow_inf=True)
    check_int("--micro-batch", micro_batch)
    check_int("--limit", limit)
    check_int("--max-len", max_len)
    check_int("--chunk-rows", chunk_rows)


def attribution_table(summary: dict):
    """Rich table of the attribution: per split and part, share of Σ|ΔH|, Σ ΔH and PCC with dh_jvp."""
    from rich.table import Table

    t = Table(title="attribution of dh_jvp (share of Σ|ΔH| per part)")
    for col in ("by", "part", "share |ΔH|", "Σ ΔH", "share of Σ", "PCC total"):
        t.add_column(col, justify="left" if col in ("by", "part") else "right", no_wrap=True)

    def f(x, fmt):
        return "nan" if x is None or math.isnan(x) else format(x, fmt)

    for kind, res in summary["attribution"].items():
        for part, r in res["parts"].items():
            t.add_row(kind, part, f(r["share_abs"], ".3f"), f(r["sum"], ".2e"), f(r["share_total"], ".3f"),
                      f(r["pcc_total"], ".3f"))
    return t


def attribute(
    rollouts: Path | None = typer.Option(None, "--rollouts", "-r", help="Rollouts (parquet/JSONL). Default: the shipped SmolLM2 GSM8K rollouts."),
    model: str | None = typer.Option(None, "--model", help="HF model folder or verl checkpoint. Default: the bundled SmolLM2-135M-Instruct."),
    lr: float = typer.Option(1e-4, "--lr", help="Learning rate η of the one real update."),
    optimizer: str = typer.Option("sgd", "--optimizer", help="sgd or adamw (AdamW: parts by the linear per-coordinate scaling of the real step)."),
    by: str = typer.Option("layer,source", "--by", help="Splits, comma-separated: layer (per block), kind (attn/mlp/norm summed over blocks), source (own/group/other), quadrant (source quadrant)."),
    limit: int | None = typer.Option(None, "--limit", help="Use only the first N responses."),
    max_len: int | None = typer.Option(None, "--max-len", help="Cut every response to its first N tokens (noted in summary.json)."),
    temperature: float = typer.Option(1.0, "--temperature", help="Sampling temperature τ (entropy is measured at τ)."),
    eps_low: float = typer.Option(0.2, "--eps-low"),
    eps_high: float = typer.Option(0.2, "--eps-high"),
    micro_batch: int = typer.Option(4, "--micro-batch", help="Sequences per forward/backward/JVP."),
    chunk_rows: int = typer.Option(256, "--chunk-rows", help="Tokens per chunk of the LM-head estimator (memory only; the result does not change)."),
    figures: bool = typer.Option(True, "--figures/--no-figures", help="Write the figures the run supports into OUT/figures."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=ALLOW_PICKLE_HELP),
    device_map: str = typer.Option("none", "--device-map", hidden=True, help=REFUSED_DEVICE_MAP_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory to write."),
) -> None:
    """Split each token's dh_jvp by parameter group and by source; LM-head estimators (writes
    tokens.parquet, attribution.parquet, summary.json)."""
    import torch

    from entropy_lens.io import rollouts as ro
    from entropy_lens.pipelines.attribute import (
        AttributeSettings,
        check_advantages,
        run_attribute,
        stage_totals,
    )

    check_attribute_options(lr, optimizer, temperature, eps_low, eps_high, micro_batch, limit, max_len, chunk_rows)
    refuse_ranks("attribute")
    resolve_device_map(device_map, "cpu", "attribute")
    splits = parse_by(by)
    src = rollouts if rollouts is not None else default_rollouts()
    options = {"model": input_id(model, "bundled"), "rollouts": input_id(src, ""), "lr": lr, "optimizer": optimizer,
               "by": list(splits), "limit": limit, "max_len": max_len, "temperature": temperature, "eps_low": eps_low,
               "eps_high": eps_high}
    with prepare_out_dir(out, "attribute", options):
        frame = ro.load_rollouts(src)
        if limit:
            frame = ro.validate_rollouts(frame.head(limit), src)
        if "reward" not in frame.columns:
            raise ValueError(f"{src}: no reward column: no advantages, nothing to attribute")
        check_advantages(torch.tensor(frame["reward"].to_numpy(), dtype=torch.float64),
                         torch.tensor(frame["group_id"].to_numpy()))
        t0 = time.time()
        with console.status("loading model"):
            mdl, tok = load_checkpoint("--model", model, allow_pickle)
        settings = AttributeSettings(lr=lr, optimizer=optimizer, temperature=temperature, eps_low=eps_low,
                                     eps_high=eps_high, micro_batch=micro_batch, by=splits, max_len=max_len,
                                     chunk_rows=chunk_rows)
        with stage_progress(stage_totals(mdl, len(frame), splits)) as advance:
            tokens, parts, summary = run_attribute(mdl, tok, frame, settings, str(src), progress=advance)
        summary["model"] = model or "bundled:smollm2-135m-instruct"
        summary["rollouts"] = str(src)
        summary["wall_seconds"] = round(time.time() - t0, 1)
        write_attribution(out, tokens, parts, summary, options)
    console.print(estimator_table(summary["estimators"], f"ΔH estimators vs measured ({optimizer}, lr={lr:g}, "
                                                         f"{summary['n_tokens']} tokens)"))
    console.print(attribution_table(summary))
    for note in summary["notes"]:
        console.print(f"note: {note}")
    if figures:
        from entropy_lens.plots import save_run_figures

        names = save_run_figures(out, out / "figures")
        console.print(f"wrote {len(names)} figures (PNG + CSV) to {out}/figures")
    console.print(f"wrote {out}/tokens.parquet, {out}/attribution.parquet, {out}/summary.json")


def write_attribution(out: Path, tokens, parts, summary: dict, options: dict) -> None:
    """tokens.parquet, attribution.parquet, summary.json and config.yaml, all or nothing."""
    from entropy_lens.io.writers import atomic_write_files, versions
    from entropy_lens_cli.common import run_config

    config = {"command": "attribute", "model": summary["model"], "rollouts": summary["rollouts"], **summary["settings"]}
    atomic_write_files(out, {"tokens.parquet": tokens, "attribution.parquet": parts, "summary.json": summary,
                             "config.yaml": run_config(config, options, versions())})


def register(app: typer.Typer) -> None:
    add_command(app, "attribute", attribute)
