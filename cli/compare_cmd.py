"""``entropy-lens compare`` and ``entropy-lens methods`` (thin: parsing, files, tables).

The main app calls :func:`register` to add both commands. All numbers come from
:func:`entropy_lens.pipelines.compare.compare_methods` and the method registry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from entropy_lens.io.tables import read_parquet
from entropy_lens.io.writers import atomic_write_files, versions
from entropy_lens.methods import (
    get_method,
    list_methods,
    params_from_dict,
    params_sources,
    params_table,
)
from entropy_lens.overrides import parse_set_items, split_method_keys
from entropy_lens.pipelines.compare import (
    COMPARE_ESTIMATORS,
    compare_methods,
    validate_tokens_frame,
)
from entropy_lens_cli.common import (
    ALLOW_PICKLE_HELP,
    DTYPES,
    add_command,
    check_choice,
    check_int,
    check_positive,
    console,
    input_id,
    prepare_out_dir,
    recorded,
)
from entropy_lens_cli.placement import (
    REFUSED_DEVICE_MAP_HELP,
    check_device,
    refuse_ranks,
    resolve_device_map,
    resolve_placement,
)


def parse_overrides(items: list[str], methods: list[str]) -> dict[str, dict[str, Any]]:
    """``["steer.lambda_min=0.7", ...]`` → ``{"steer": {"lambda_min": 0.7}}`` (the one ``--set``
    grammar, :mod:`entropy_lens.overrides`); ValueError (one line) on a malformed item, a method
    not being compared, a config key (compare has none), or an unknown key / bad value."""
    out, config = split_method_keys(parse_set_items(items), methods)
    if config:
        key = next(iter(config))
        raise ValueError(f"--set {key}: compare takes METHOD.PARAM=VALUE with a registered method, e.g. steer.lambda_min=0.7")
    for meth, values in out.items():
        params_from_dict(meth, values)
    return out


def _fmt(x: Any) -> str:
    return "n/a" if x is None else f"{x:+.3e}"


def compare(
    tokens: Annotated[Path, typer.Argument(help="tokens.parquet written by `entropy-lens analyze`")],
    out: Annotated[Path, typer.Option("-o", "--out", help="output directory (compare.parquet, summary.json)")],
    method: Annotated[
        Optional[list[str]],
        typer.Option("-m", "--method", help="method to compare (repeatable); default: every registered method"),
    ] = None,
    set_: Annotated[
        Optional[list[str]],
        typer.Option("--set", help="parameter override METHOD.PARAM=VALUE, e.g. steer.lambda_min=0.7 (repeatable)"),
    ] = None,
    lr: Annotated[float, typer.Option("--lr", help="learning rate η of the first-order predictions")] = 1e-6,
    seed: Annotated[int, typer.Option("--seed", help="seed of every random choice (Clip-Cov)")] = 0,
    micro_batch: Annotated[
        Optional[int],
        typer.Option("--micro-batch", help="samples per micro-batch of the methods' micro scope (consecutive samples; the STEER reference uses 8); default: the whole batch"),
    ] = None,
    measure: Annotated[bool, typer.Option("--measure", help="also take one real optimizer step per method from --model on --rollouts and measure ΔH")] = False,
    model: Annotated[Optional[str], typer.Option("--model", help="with --measure: HF folder or verl checkpoint (default: bundled model)")] = None,
    rollouts: Annotated[Optional[Path], typer.Option("--rollouts", "-r", help="with --measure: the rollouts TOKENS was computed from")] = None,
    optimizer: Annotated[str, typer.Option("--optimizer", help="with --measure: sgd or adamw")] = "sgd",
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help=f"with --measure: {ALLOW_PICKLE_HELP}")] = False,
    device: Annotated[str, typer.Option("--device", help="with --measure: auto (a GPU when one is visible, else cpu), cpu, cuda or cuda:N")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="with --measure: model dtype auto (bfloat16 on a GPU, float32 on the CPU), float32, bfloat16 or float16; low precision updates an fp32 master copy")] = "auto",
    device_map: Annotated[str, typer.Option("--device-map", hidden=True, help=REFUSED_DEVICE_MAP_HELP)] = "none",
) -> None:
    """Predict each method's entropy change on one recorded batch (closed-form estimators)."""
    methods = list(method) if method else list_methods()
    for m in methods:
        get_method(m)
    if len(set(methods)) != len(methods):
        raise ValueError("-m/--method: a method is listed more than once")
    overrides = parse_overrides(list(set_ or []), methods)
    check_positive("--lr", lr)
    check_int("--micro-batch", micro_batch)
    check_choice("--optimizer", optimizer, ("sgd", "adamw"))
    resolve_device_map(device_map, device, "compare")
    refuse_ranks("compare")
    if measure:
        device, dtype = resolve_placement(device, dtype)
    else:  # nothing runs on a model: the options are only checked
        check_choice("--dtype", dtype, DTYPES)
        check_device(device)
    options = {"tokens": input_id(tokens, ""), "method": methods, "set": list(set_ or []), "lr": lr, "seed": seed,
               "measure": measure, "micro_batch": micro_batch}
    if measure:
        options.update(model=input_id(model, "bundled"), rollouts=input_id(rollouts, "shipped"), optimizer=optimizer,
                       dtype=dtype)
    with prepare_out_dir(out, "compare", options):
        df = read_parquet(tokens)
        try:
            validate_tokens_frame(df)
            long_df, summary = compare_methods(df, methods, overrides, lr=lr, seed=seed, micro_batch=micro_batch,
                                               skip_missing=not method)
        except ValueError as e:
            raise ValueError(f"{tokens}: {e}") from e
        if measure:
            ran = [m for m in methods if m not in summary["skipped"]]
            long_df, summary = _measure(long_df, summary, df, ran, overrides, lr, seed,
                                        (model, allow_pickle, device, dtype), rollouts, optimizer, micro_batch)
        summary = {"command": "compare", "tokens": str(tokens), "methods_requested": methods, "overrides": overrides,
                   "options": recorded(options), "versions": versions(), **summary}
        atomic_write_files(out, {"compare.parquet": long_df, "summary.json": summary})
    console.print(_results_table(summary, lr, measure))
    for name, reason in summary["skipped"].items():
        console.print(f"note: {name} skipped: {reason}")
    console.print(f"wrote {out / 'compare.parquet'} and {out / 'summary.json'}")


def _results_table(summary: dict, lr: float, measure: bool) -> Table:
    """Per method: touched share, mean weight, predicted batch ΔH per estimator, penalty, measured."""
    table = Table(title=f"predicted batch ΔH (nats, lr={lr:g}, {summary['n_tokens']} tokens)")
    for col in ("method", "touched", "mean w", *COMPARE_ESTIMATORS, "penalty") + (("measured", "sign ok") if measure else ()):
        table.add_column(col, justify="left" if col in ("method", "penalty") else "right")
    for name, res in summary["methods"].items():
        pen = res["penalty_dh"]
        extra = []
        if measure:
            extra = [_fmt(res["measured_dh"]), " ".join(e[:6] if ok else "-" for e, ok in res["sign_matches"].items())]
        note = "" if pen is None else ("folded in" if pen["folded_into"] else "not included (see summary)")
        table.add_row(name, f"{100 * res['touched_share']:.1f}%", f"{res['weight_mean']:.3f}",
                      *[_fmt(res["predicted_dh"][e]) for e in COMPARE_ESTIMATORS], note, *extra)
    return table


def _measure(long_df, summary, tokens_df, methods, overrides, lr, seed, model_spec, rollouts, optimizer, micro_batch=None):
    """Measured ΔH of one real step per method, merged into ``long_df`` and ``summary``;
    ``model_spec``: ``(--model, --allow-pickle, device, dtype)``."""
    import numpy as np

    from entropy_lens.io.rollouts import load_rollouts
    from entropy_lens.pipelines.compare import measure_methods
    from entropy_lens.pipelines.validate import ValidateSettings
    from entropy_lens_cli.common import (
        default_rollouts,
        load_checkpoint,
        stage_progress,
    )

    model, allow_pickle, device, dtype = model_spec
    src = rollouts if rollouts is not None else default_rollouts()
    frame = load_rollouts(src)
    mdl, tok = load_checkpoint("--model", model, allow_pickle, dtype, device)
    with stage_progress({"methods": len(methods)}) as advance:
        meas_df, totals = measure_methods(mdl, tok, frame, methods, overrides,
                                          ValidateSettings(lr=lr, optimizer=optimizer), seed, str(src), advance,
                                          scope_micro_batch=micro_batch)
    n_rows = int(meas_df["method"].eq(methods[0]).sum())
    if n_rows != len(tokens_df):
        raise ValueError(f"{src}: gives {n_rows} response tokens but the tokens file has {len(tokens_df)}; "
                         "pass the rollouts the tokens file was computed from")
    long_df = long_df.merge(meas_df, on=["method", "sample", "pos"], how="left")
    for name, res in summary["methods"].items():
        t = totals[name]
        res["measured_dh"] = t["dh_measured"]
        res["measured_quadrants"] = {k: t[k] for k in ("Q1", "Q2", "Q3", "Q4")}
        res["sign_matches"] = {e: bool(np.sign(v) == np.sign(t["dh_measured"])) if v is not None else False
                               for e, v in res["predicted_dh"].items()}
    summary["measure"] = {"model": model or "bundled:smollm2-135m-instruct", "rollouts": str(src),
                          "optimizer": optimizer, "lr": lr, "device": device, "dtype": dtype,
                          "note": "counterfactual: one step per method from the same parameters on the same batch"}
    return long_df, summary


def methods() -> None:
    """List the registered methods: name, summary, parameters with defaults and the source of each
    default, factors touched, inputs required beyond the batch (reward, ref_logp)."""
    table = Table(title="entropy_lens methods", show_lines=True)
    table.add_column("method", no_wrap=True)
    table.add_column("summary", ratio=2)
    table.add_column("parameter = default: source of the default", ratio=3)
    table.add_column("factors", max_width=14)
    table.add_column("needs", max_width=9)
    for name in list_methods():
        spec = get_method(name)
        sources = params_sources(name)
        params = Table.grid(padding=(0, 1))  # one line per parameter, its source beside it
        params.add_column(no_wrap=True)
        params.add_column()
        for k, v in params_table(name):
            params.add_row(f"{k}={v}", sources[k] or "-")
        table.add_row(name, spec.summary, params, ", ".join(spec.factors) or "-", ", ".join(spec.needs) or "-")
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add the ``compare`` and ``methods`` commands to the main app."""
    add_command(app, "compare", compare)
    add_command(app, "methods", methods)
