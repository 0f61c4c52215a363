"""Figures (synthetic frames in the real formats): run loading (``entropy_lens.plots.runs``), the data and
figure builders of ``entropy_lens.plots``, its figure registry, ``analyses/figure.py`` and the ``plot``
command. The run-folder fixtures here are shared with tests/test_report.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import typer
import yaml
from typer.testing import CliRunner

from entropy_lens import estimators as est
from entropy_lens import plots
from entropy_lens.advantages import broadcast_to_tokens
from entropy_lens.advantages import grpo as grpo_adv
from entropy_lens.objective import clip_active
from entropy_lens.pipelines.compare import compare_methods
from entropy_lens.plots import style
from entropy_lens.tokens import TokenBatch

LR = 1e-3
runner = CliRunner()


# --------------------------------------------------------------------------------------------
# Synthetic inputs in the formats of validate / compare / the trainer
# --------------------------------------------------------------------------------------------


def make_tokens(
    seed: int = 0, B: int = 8, T: int = 12, V: int = 9, texts: list[str] | None = None, measured: bool = True
) -> tuple[pd.DataFrame, dict]:
    """A tokens.parquet frame (exact statistics of random softmaxes, every estimator column, a noisy
    'measured' ΔH) and its summary.json."""
    g = torch.Generator().manual_seed(seed)
    logpi = torch.log_softmax(torch.randn(B, T, V, generator=g) * 2.0, -1)
    pi = logpi.exp()
    tok = torch.multinomial(pi.reshape(-1, V), 1, generator=g).reshape(B, T)
    logp = logpi.gather(-1, tok[..., None])[..., 0]
    lengths = torch.randint(4, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]
    reward = torch.tensor([1.0, -1.0] * (B // 2))
    group = torch.arange(B) // 4
    adv = broadcast_to_tokens(grpo_adv(reward, group), mask)
    old = logp + 0.05 * torch.randn(B, T, generator=g)
    H = -(pi * logpi).sum(-1)
    b = TokenBatch(
        token_ids=tok,
        mask=mask,
        logp=logp,
        old_logp=old,
        entropy=H,
        sum_p2=(pi**2).sum(-1),
        sum_p2_logp=(pi**2 * logpi).sum(-1),
        adv=adv,
        group_id=group,
        reward=reward,
    )
    r = b.ratio
    ica = clip_active(r, adv, 0.2, 0.2, 3.0)
    L = b.n_tokens
    all_logit = est.dh_all_logit(logp, H, b.sum_p2, b.sum_p2_logp, adv, r, ica.float(), LR, L)
    extra = {
        "ratio": r,
        "clip_active": ica,
        "omega_paper": est.omega_paper(logp, H, adv, r, ica.float(), LR, L),
        "omega_code": est.omega_code(logp, old, H, adv),
        "dh_all_logit": all_logit,
        "dh_cov": est.dh_cov(logp, adv, mask, LR),
        "quadrant": est.quadrant(logp, H, adv),
    }
    if measured:
        extra["dh_jvp"] = all_logit * 1.1
        extra["dh_measured"] = all_logit * (1 + 0.3 * torch.randn(B, T, generator=g)) + 1e-7 * torch.randn(
            B, T, generator=g
        )
    words = texts or ["the", " cat", " 12", "\n", " =", " Answer:", " 4", "."]
    token_text = [[words[(i + t) % len(words)] for t in range(T)] for i in range(B)]
    df = b.to_frame(extra=extra, token_text=token_text)
    df["quadrant"] = df["quadrant"].astype(np.int8)
    summary = {
        "n_tokens": L,
        "n_sequences": B,
        "settings": {"lr": LR, "optimizer": "sgd"},
        "estimators": {},
        "notes": ["synthetic"],
    }
    return df, summary


def write_token_run(d: Path, seed: int = 0, with_compare: bool = True, **kw) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    df, summary = make_tokens(seed, **kw)
    df.to_parquet(d / "tokens.parquet", index=False)
    (d / "summary.json").write_text(json.dumps(summary))
    if with_compare:
        long_df, cs = compare_methods(df, ["grpo", "clip_cov", "steer"], {"steer": {"lambda_min": 0.7}}, lr=LR)
        (d / "compare").mkdir(exist_ok=True)
        long_df.to_parquet(d / "compare" / "compare.parquet", index=False)
        (d / "compare" / "summary.json").write_text(json.dumps({**cs, "tokens": str(d / "tokens.parquet")}))
    return d


def metrics_records(
    method: str, seed: int, setting: str = "normal", steps: int = 12, tau: float = 6.0, lambda_min: float | None = None
) -> list[dict]:
    """Trainer records: entropy decays with step, accuracy = −a·exp(H) + b exactly (a=0.1, b=0.8)."""
    rng = np.random.default_rng(seed)
    out = []
    steer = method == "steer"
    for step in range(steps):
        H = 0.3 + 1.0 * math.exp(-step / tau) + 0.01 * rng.standard_normal()
        acc = -0.1 * math.exp(H) + 0.8
        rec = {
            "step": step,
            "method": method,
            "seed": seed,
            "reward_mean": 2 * acc - 1,
            "accuracy": acc,
            "entropy_mean": H,
            "clip_frac_high": 0.01,
            "clip_frac_low": 0.0,
            "weight_mean": 0.9 if steer else 1.0,
            "weight_std": 0.05 if steer else 0.0,
            "weight_min": (lambda_min or 0.8) if steer else 1.0,
            "weight_max": 1.0,
            "quadrant": {f"Q{i}": {"token_share": 0.25, "dh_pred": -1e-4, "dh_measured": -1e-4} for i in (1, 2, 3, 4)},
            "dh_pred": {"omega_paper": -1e-4, "dh_all_logit": -1e-4, "dh_cov": -2e-4, "dh_jvp": None},
            "dh_measured": -1e-4,
            "loss": 0.1,
            "wall_s": float(step),
        }
        if step % 4 == 3:
            rec["eval_accuracy"] = acc
            rec["pass_at_k"] = {str(k): 1 - (1 - acc) ** k for k in (1, 2, 4, 8)}
        out.append(rec)
    return out


def write_metrics_run(
    d: Path,
    method: str,
    seed: int,
    setting: str = "normal",
    lambda_min: float | None = None,
    partial_tail: bool = False,
    **kw,
) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    sets = {"clip.eps_low": 0.99, "clip.eps_high": 5.0} if setting == "extreme" else {}
    if lambda_min is not None:
        sets["steer.lambda_min"] = lambda_min
    (d / "config.yaml").write_text(
        yaml.safe_dump({"config": {"method": method, "seed": seed, "preset": "arithmetic-tiny", "set": sets}})
    )
    text = "".join(json.dumps(r) + "\n" for r in metrics_records(method, seed, setting, lambda_min=lambda_min, **kw))
    if partial_tail:
        text += '{"step": 99, "method": "gr'  # a record still being written
    (d / "metrics.jsonl").write_text(text)
    return d


def metrics_runs(root: Path) -> list[Path]:
    out = []
    for setting in ("normal", "extreme"):
        for m in ("grpo", "steer"):
            for s in (0, 1, 2):
                out.append(write_metrics_run(root / f"{m}_{setting}_{s}", m, s, setting))
    for lm in (0.6, 0.9):
        for s in (0, 1):
            out.append(write_metrics_run(root / f"steer_lm{lm}_{s}", "steer", s, "normal", lambda_min=lm))
    return out


def texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


def test_figures_use_an_agg_canvas_without_pyplot():
    import subprocess
    import sys

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = plots.factor_matrix_figure(plots.factor_matrix_data())
    assert isinstance(fig.canvas, FigureCanvasAgg)
    assert plots.figure_png(fig, dpi=40)[:8] == b"\x89PNG\r\n\x1a\n"
    # building and rendering never imports pyplot nor switches the global backend
    code = (
        "import sys, matplotlib; raw = lambda: dict.__getitem__(matplotlib.rcParams, 'backend'); b = raw(); "
        "from entropy_lens import plots; "
        "plots.figure_png(plots.factor_matrix_figure(plots.factor_matrix_data()), 30); "
        "assert 'matplotlib.pyplot' not in sys.modules; assert raw() == b; print('ok')"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.stdout.strip() == "ok", res.stderr[-1000:]


def test_dh_scatter_axes_labels_and_stats():
    df, summary = make_tokens()
    data = plots.dh_scatter_data(df, LR, summary["n_tokens"])
    assert list(dict.fromkeys(data["estimator"])) == ["omega_paper", "omega_code", "dh_all_logit", "dh_cov", "dh_jvp"]
    # omega_code is scaled by −η/L into a ΔH prediction
    oc = data[data["estimator"] == "omega_code"]["predicted_dh"].to_numpy()
    np.testing.assert_allclose(oc, -(LR / summary["n_tokens"]) * df["omega_code"].to_numpy())
    # JVP = 1.1 × all-logit: same PCC, same SRCC
    pj = data[data["estimator"] == "dh_jvp"]["pcc"].iloc[0]
    pa = data[data["estimator"] == "dh_all_logit"]["pcc"].iloc[0]
    assert pj == pytest.approx(pa) and 0.5 < pa < 1.0
    fig = plots.dh_scatter_figure(data)
    axes = [a for a in fig.axes if a.get_visible()]
    assert len(axes) == 5
    for ax in axes:
        assert "measured ΔH" in ax.get_ylabel() and "nats" in ax.get_ylabel()
        assert "predicted ΔH" in ax.get_xlabel() and "nats" in ax.get_xlabel()
        assert any(t.startswith("PCC = ") and "SRCC = " in t for t in texts(ax))
        assert any(t.startswith("PCC") and "measured ≈ " in t for t in texts(ax))
    # the identity line is y = x in nats (each axis has its own power-of-ten unit)
    d0 = data[data["estimator"] == "omega_paper"]
    sx, sy = style.axis_scale(d0["predicted_dh"])[0], style.axis_scale(d0["measured_dh"])[0]
    line = [ln for ln in axes[0].get_lines() if ln.get_label().startswith("identity y = x")][0]
    np.testing.assert_allclose(np.asarray(line.get_xdata()) / sx, np.asarray(line.get_ydata()) / sy)
    # fitted scale: measured ≈ k·predicted through the origin
    x, y = d0["predicted_dh"].to_numpy(), d0["measured_dh"].to_numpy()
    assert d0["slope"].iloc[0] == pytest.approx((x * y).sum() / (x * x).sum())


def test_dh_scatter_without_summary_drops_omega_code_and_needs_measured():
    df, _ = make_tokens()
    data = plots.dh_scatter_data(df, None, None)
    assert "omega_code" not in set(data["estimator"])
    with pytest.raises(ValueError, match="dh_measured"):
        plots.dh_scatter_data(df.drop(columns="dh_measured"), LR, len(df))


def test_scale_picks_power_of_ten():
    assert style.axis_scale(np.array([3e-5, -2e-5]))[1] == "$10^{-5}$ nats"
    assert style.axis_scale(np.array([0.3, -2.0])) == (1.0, "nats")


def test_dh_vs_prob_boundary_and_quadrants():
    df, summary = make_tokens()
    data = plots.dh_vs_prob_data(df, LR, summary["n_tokens"])
    likely = data["p_over_boundary"] > 1
    q = data["quadrant"]
    assert (likely[q.isin([1, 4])]).all() and (~likely[q.isin([2, 3])]).all()
    fig = plots.dh_vs_prob_figure(data)
    a0, a1, a2 = fig.axes[:3]
    assert a0.get_xscale() == "log" and a1.get_xscale() == "log" and a2.get_xscale() == "log"
    assert "token probability p" in a0.get_xlabel()
    assert a2.get_ylabel() == "token entropy H (nats)"
    # boundary: vertical line at p·e^H = 1 and the curve H = −log p
    vline = [ln for ln in a1.get_lines() if "boundary" in ln.get_label()][0]
    assert list(vline.get_xdata()) == [1.0, 1.0]
    curve = [ln for ln in a2.get_lines() if "boundary" in ln.get_label()][0]
    np.testing.assert_allclose(curve.get_ydata(), -np.log(curve.get_xdata()))
    legend_texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any(t.startswith("Q1") for t in legend_texts) and any("boundary" in t for t in legend_texts)
    # without a measured ΔH, the paper-form prediction is plotted and named
    d2 = plots.dh_vs_prob_data(df.drop(columns="dh_measured"), LR, len(df))
    assert set(d2["dh_source"]) == {"omega_paper"}
    assert "predicted ΔH (omega_paper)" in plots.dh_vs_prob_figure(d2).axes[0].get_ylabel()


def test_quadrants_shares_and_sums():
    df, summary = make_tokens()
    data = plots.quadrants_data(df, LR, summary["n_tokens"])
    share = data[data["quantity"] == "token_share"].set_index("quadrant")["value"]
    assert share.sum() == pytest.approx(1.0)
    meas = data[data["quantity"] == "dh_measured"].set_index("quadrant")["value"]
    assert meas.sum() == pytest.approx(df["dh_measured"].sum())
    assert meas["Q1"] == pytest.approx(df.loc[df["quadrant"] == 1, "dh_measured"].sum())
    fig = plots.quadrants_figure(data)
    assert fig.axes[0].get_ylabel() == "share of response tokens (%)"
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["Q0", "Q1", "Q2", "Q3", "Q4"]
    assert "nats" in " ".join(t.get_text() for t in fig.axes[1].get_legend().get_texts())


def test_factor_matrix_from_registry():
    from entropy_lens.methods import get_method, list_methods

    data = plots.factor_matrix_data()
    assert list(data["method"]) == list(list_methods())
    steer = data.set_index("method").loc["steer"]
    assert steer.tolist() == [
        int(f in get_method("steer").factors) for f in ("clip", "advantage", "probability", "entropy")
    ]
    assert data.set_index("method").loc["grpo"].sum() == 0
    fig = plots.factor_matrix_figure(data)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == list(list_methods())
    assert sum(t.get_text() == "●" for t in ax.texts) == int(data.drop(columns="method").to_numpy().sum())


def test_compare_figures(tmp_path):
    d = write_token_run(tmp_path / "run")
    run = plots.load_run(d)
    wd = plots.weight_dist_data(run.compare)
    row = wd.set_index("method")
    assert row.loc["grpo", "min"] == row.loc["grpo", "max"] == 1.0
    assert row.loc["steer", "min"] == pytest.approx(0.7)  # largest |ω| gets exactly λ_min
    fig = plots.weight_dist_figure(wd, run.compare)
    assert "weight" in fig.axes[0].get_xlabel()
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["grpo", "clip_cov", "steer"]

    sp = run.compare_summary["methods"]["steer"]["params"]
    so = plots.steer_weight_omega_data(run.compare, run.tokens, sp)
    pts = so[so["kind"] == "token"]
    assert len(pts) == len(run.tokens)
    # exp mapping: weight = clamp(exp(−k|ω|), 0.7, 1) with k = ln(1/0.7)/max(max|ω|, 0.02)
    M = pts["omega_abs"].max()
    k = math.log(1 / 0.7) / max(M, 0.02)
    np.testing.assert_allclose(pts["weight"], np.clip(np.exp(-k * pts["omega_abs"]), 0.7, 1.0), rtol=1e-5)
    fig = plots.steer_weight_omega_figure(so)
    assert fig.axes[0].get_ylabel() == "STEER token weight λ" and "|ω|" in fig.axes[0].get_xlabel()

    cd = plots.compare_dh_data(run.compare_summary)
    assert set(cd["method"]) == {"grpo", "clip_cov", "steer"}
    assert "nats" in plots.compare_dh_figure(cd).axes[0].get_xlabel()


def test_fit_entropy_accuracy_recovers_parameters():
    H = np.linspace(0.2, 1.5, 20)
    fit = plots.fit_entropy_accuracy(H, -0.1 * np.exp(H) + 0.8)
    assert fit["a"] == pytest.approx(0.1) and fit["b"] == pytest.approx(0.8) and fit["r2"] == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    noisy = -0.1 * np.exp(H) + 0.8 + 0.02 * rng.standard_normal(20)
    f2 = plots.fit_entropy_accuracy(H, noisy)
    A = np.stack([-np.exp(H), np.ones_like(H)], 1)  # same least squares by a generic solver
    sol = np.linalg.lstsq(A, noisy, rcond=None)[0]
    assert f2["a"] == pytest.approx(sol[0]) and f2["b"] == pytest.approx(sol[1]) and 0 < f2["r2"] < 1
    assert math.isnan(plots.fit_entropy_accuracy(H[:2], noisy[:2])["a"])


def test_metrics_figures(tmp_path):
    runs = [plots.load_run(p) for p in metrics_runs(tmp_path)]
    assert {r.metrics["setting"].iloc[0] for r in runs} == {"normal", "extreme"}
    metrics = plots.add_labels(pd.concat([r.metrics for r in runs], ignore_index=True))
    # λ_min sweep: steer runs get λ in their label (0.8 is the registry default of the plain runs)
    assert {"steer, λ_min=0.6", "steer, λ_min=0.8", "steer, λ_min=0.9", "grpo"} <= set(metrics["label"])

    band = plots.seed_band_data(metrics, "entropy_mean")
    g0 = band[(band["setting"] == "normal") & (band["label"] == "grpo") & (band["step"] == 0)].iloc[0]
    vals = metrics[(metrics["setting"] == "normal") & (metrics["label"] == "grpo") & (metrics["step"] == 0)][
        "entropy_mean"
    ]
    assert g0["n_seeds"] == 3 and g0["mean"] == pytest.approx(vals.mean()) and g0["std"] == pytest.approx(vals.std())
    fig = plots.steps_figure(band, "mean token entropy (nats)")
    assert [a.get_title() for a in fig.axes] == ["normal setting", "extreme setting"]
    assert fig.axes[0].get_ylabel() == "mean token entropy (nats)" and fig.axes[0].get_xlabel() == "training step"

    ws = plots.weight_steps_data(metrics)
    assert set(ws["quantity"]) == set(plots.WEIGHT_STATS)
    wf = plots.weight_steps_figure(ws)
    assert [a.get_title() for a in wf.axes if a.get_visible()] == [
        "token weight: mean",
        "token weight: std",
        "token weight: min",
        "token weight: max",
    ]

    ls = plots.lambda_sensitivity_data(metrics)
    normal = ls[ls["setting"] == "normal"].sort_values("lambda_min")
    assert list(normal["lambda_min"]) == [0.6, 0.8, 0.9] and list(normal["n_seeds"]) == [2, 3, 2]
    lf = plots.lambda_sensitivity_figure(ls)
    assert lf.axes[0].get_xlabel() == "λ_min" and lf.axes[1].get_ylabel() == "final mean token entropy (nats)"

    av = plots.acc_vs_entropy_data(metrics)
    assert set(av["accuracy_source"]) == {"eval_accuracy"}
    grpo = av[av["label"] == "grpo, normal"].iloc[0]
    assert grpo["a"] == pytest.approx(0.1) and grpo["b"] == pytest.approx(0.8) and grpo["r2"] == pytest.approx(1.0)
    af = plots.acc_vs_entropy_figure(av)
    labels = [t.get_text() for t in af.legends[0].get_texts()]
    assert any(t.startswith("grpo, normal: a=0.1, b=0.8, R²=1.00") for t in labels)
    assert any(t.startswith("grpo, extreme: a=0.1, b=0.8") for t in labels)
    assert af.axes[0].get_xlabel() == "mean token entropy H (nats)"

    pk = plots.pass_at_k_data(pd.concat([r.pass_at_k for r in runs], ignore_index=True))
    assert set(pk["k"]) == {1, 2, 4, 8} and (pk["step"] == 11).all()
    pf = plots.pass_at_k_figure(pk)
    assert pf.axes[0].get_xscale() == "log" and pf.axes[0].get_ylabel() == "pass@k"
    assert [t.get_text() for t in pf.axes[0].get_xticklabels()] == ["1", "2", "4", "8"]


def test_method_colors_are_stable_and_distinct():
    c = plots.method_colors(["steer", "grpo"])
    assert c == plots.method_colors(["grpo", "steer"]) and c["steer"] != c["grpo"]
    lab = plots.method_colors(["grpo, normal", "steer, λ_min=0.6", "steer, λ_min=0.8"])
    assert lab["grpo, normal"] == c["grpo"]  # the only grpo curve keeps grpo's colour
    assert len({lab["grpo, normal"], lab["steer, λ_min=0.6"], lab["steer, λ_min=0.8"]}) == 3


def test_setting_label_and_lambda_min():
    assert plots.setting_label({"set": {"clip.eps_high": 5.0}}) == "extreme"
    assert plots.setting_label({"set": {"algo": {"eps_low": 0.99}}}) == "extreme"
    assert plots.setting_label({"set": {"clip.eps_high": 0.28}}) == "normal"
    assert plots.setting_label({"preset": "x", "set": {"setting": "low-lr"}}) == "low-lr"
    assert plots.lambda_min_of({"set": {"steer.lambda_min": 0.6}}, "steer") == 0.6
    assert plots.lambda_min_of({}, "steer") == 0.8 and plots.lambda_min_of({}, "grpo") is None
    # the trainer's config.yaml: resolved method_params win over the (string) --set values
    trainer = {
        "method": "steer",
        "preset": "arithmetic-tiny",
        "method_params": {"lambda_min": 0.7, "eps_high": 5.0},
        "set": {"method.lambda_min": "0.7", "method.eps_high": "5"},
    }
    assert plots.lambda_min_of(trainer, "steer") == 0.7 and plots.setting_label(trainer) == "extreme"
    assert plots.setting_label({"method_params": {"eps_high": 0.28}, "set": {}}) == "normal"


def test_read_metrics_tolerates_a_partial_last_line_only(tmp_path):
    d = write_metrics_run(tmp_path / "r", "grpo", 0, partial_tail=True)
    assert len(plots.read_metrics(d / "metrics.jsonl")) == 12
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 0}\n{not json}\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: line 2: malformed JSON"):
        plots.read_metrics(bad)
    bad.write_text('{"step": "x"}\n')
    with pytest.raises(ValueError, match="line 1: missing integer 'step'"):
        plots.read_metrics(bad)


def test_build_plots_notes_what_it_skips(tmp_path):
    run = plots.load_run(write_token_run(tmp_path / "run", with_compare=False))
    built, notes = plots.build_plots([run])
    names = [p.name for p in built]
    assert names == ["dh_scatter", "dh_vs_prob", "quadrants", "factor_matrix"]
    assert any(n.startswith("weight_dist: skipped (no compare/compare.parquet") for n in notes)
    assert any(n.startswith("entropy_steps: skipped (no metrics.jsonl") for n in notes)
    with pytest.raises(ValueError, match="unknown figure"):
        plots.build_plots([run], ["nope"])


# --------------------------------------------------------------------------------------------
# Loading (entropy_lens.plots.runs)
# --------------------------------------------------------------------------------------------


def test_load_run_reads_through_the_table_readers(tmp_path):
    from entropy_lens.io.tables import InputError
    from entropy_lens.plots.runs import load_run

    d = write_token_run(tmp_path / "run", with_compare=False)
    run = load_run(d)
    assert run.lr == LR and run.n_tokens == len(run.tokens) and run.metrics is None
    (d / "summary.json").write_text("[1, 2]")
    with pytest.raises(InputError, match=r"summary.json: expected a JSON object, got list"):
        load_run(d)
    m = write_metrics_run(tmp_path / "m", "grpo", 0)
    (m / "config.yaml").write_text("config: [1, 2]\n")
    with pytest.raises(ValueError, match=r"config.yaml: 'config' is not a mapping"):
        load_run(m)


def test_read_metrics_names_the_line_of_a_record_without_step(tmp_path):
    bad = tmp_path / "m.jsonl"
    bad.write_text('{"step": 0}\n\n{"step": 1}\n{"loss": 2}\n')  # a blank line before the bad record
    with pytest.raises(ValueError, match=r"m.jsonl: line 4: missing integer 'step'"):
        plots.read_metrics(bad)
    bad.write_text('{"step": 0}\n[1]\n')
    with pytest.raises(ValueError, match=r"m.jsonl: line 2: expected a JSON object, got list"):
        plots.read_metrics(bad)


# --------------------------------------------------------------------------------------------
# The figure registry
# --------------------------------------------------------------------------------------------


def test_registry_order_captions_and_claims():
    assert plots.FIGURES == tuple(plots.list_figures())
    assert plots.FIGURES[:3] == ("dh_scatter", "dh_vs_prob", "quadrants") and plots.FIGURES[-1] == "factor_matrix"
    for name in plots.FIGURES:
        spec = plots.get_figure(name)
        assert spec.name == name
        for text in (spec.caption, spec.claim):
            assert text.strip() and "\n" not in text, name
        assert all(n in plots.NEEDS for n in spec.needs), name
    assert plots.get_figure("dh_scatter").needs == ("tokens", "tokens:dh_measured")
    assert plots.get_figure("factor_matrix").needs == () and not plots.get_figure("factor_matrix").per_run
    with pytest.raises(ValueError, match="unknown figure 'nope'"):
        plots.get_figure("nope")


def test_registry_refuses_duplicates_and_bad_specs():
    def build(_):
        raise AssertionError("never built")

    with pytest.raises(ValueError, match="'dh_scatter' is already registered"):
        plots.figure("dh_scatter", needs="tokens", caption="c", claim="c")(build)
    assert plots.get_figure("dh_scatter").build is not build
    try:
        plots.figure("tmp_fig", caption="c", claim="c")(build)
        with pytest.raises(ValueError, match="already registered"):
            plots.figure("tmp_fig", caption="c", claim="c")
    finally:
        plots.unregister_figure("tmp_fig")
    assert "tmp_fig" not in plots.list_figures()
    with pytest.raises(ValueError, match="snake_case"):
        plots.figure("Bad-Name", caption="c", claim="c")
    with pytest.raises(ValueError, match="unknown need"):
        plots.figure("tmp_fig", needs="tokenz", caption="c", claim="c")
    with pytest.raises(ValueError, match="mix run parts"):
        plots.figure("tmp_fig", needs=("tokens", "metrics"), caption="c", claim="c")
    with pytest.raises(ValueError, match="claim must be one non-empty line"):
        plots.figure("tmp_fig", caption="c", claim="")
    assert "tmp_fig" not in plots.list_figures()


def test_skip_notes_come_from_the_needs_of_any_registered_figure(tmp_path):
    made = []

    def build(run):
        made.append(run.name)
        return pd.DataFrame({"x": [1]}), plots.factor_matrix_figure(plots.factor_matrix_data())

    plots.figure("tmp_needs_summary", needs="compare_summary", caption="cap", claim="claim")(build)
    try:
        full = plots.load_run(write_token_run(tmp_path / "full"))
        bare = write_token_run(tmp_path / "bare")
        (bare / "compare" / "summary.json").unlink()
        tok = plots.load_run(write_token_run(tmp_path / "tok", with_compare=False))
        built, notes = plots.build_plots([full, plots.load_run(bare), tok], ["tmp_needs_summary"])
    finally:
        plots.unregister_figure("tmp_needs_summary")
    assert [p.name for p in built] == ["tmp_needs_summary__full"] and made == ["full"]
    assert built[0].caption == "cap"
    assert notes == [
        f"tmp_needs_summary: made for 2 of 3 runs (no compare/compare.parquet in {tmp_path / 'tok'})",
        f"tmp_needs_summary__bare: skipped (no compare/summary.json in {tmp_path / 'bare'})",
    ]


# --------------------------------------------------------------------------------------------
# analyses/figure.py
# --------------------------------------------------------------------------------------------

ANALYSES = Path(__file__).resolve().parents[1] / "analyses"


def _figure_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("analyses_figure", ANALYSES / "figure.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_analyses_figure_lists_exactly_the_registered_figures():
    import subprocess
    import sys

    res = subprocess.run(
        [sys.executable, str(ANALYSES / "figure.py"), "--list"], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-1000:]
    lines = res.stdout.strip().split("\n")
    assert [line.split(": ", 1)[0] for line in lines] == list(plots.FIGURES)
    assert [line.split(": ", 1)[1] for line in lines] == [plots.get_figure(n).claim for n in plots.FIGURES]


def test_analyses_readme_table_is_the_registry():
    table = "\n".join(_figure_script().readme_table())
    assert table in (ANALYSES / "README.md").read_text(encoding="utf-8")
    assert "## Making the cached runs" in (ANALYSES / "README.md").read_text(encoding="utf-8")


def test_analyses_figure_rebuilds_one_figure(tmp_path, capsys):
    script = _figure_script()
    run = write_token_run(tmp_path / "run")
    out = tmp_path / "figs"
    assert script.main(["steer_weight_omega", str(run), "-o", str(out), "--dpi", "40"]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["steer_weight_omega.csv", "steer_weight_omega.png"]
    assert f"claim: {plots.get_figure('steer_weight_omega').claim}" in printed
    assert (out / "steer_weight_omega.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the runs lack what the figure needs: exit 2, one line on stderr, nothing written
    assert script.main(["entropy_steps", str(run), "-o", str(tmp_path / "none")]) == 2
    err = capsys.readouterr()
    assert "note: entropy_steps: skipped (no metrics.jsonl" in err.out and err.err.count("\n") == 1
    assert not (tmp_path / "none").exists()
    with pytest.raises(SystemExit) as exc:
        script.main(["nope", str(run), "-o", str(out)])
    assert exc.value.code == 2 and "unknown figure 'nope'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _app() -> typer.Typer:
    from entropy_lens_cli.plot_cmd import register

    app = typer.Typer()
    register(app)
    app.command("noop", hidden=True)(lambda: None)  # keep `plot` a named sub-command
    return app


def test_plot_cli_writes_png_and_csv(tmp_path):
    tok_run = write_token_run(tmp_path / "tok")
    m_runs = metrics_runs(tmp_path / "m")
    out = tmp_path / "figs"
    res = runner.invoke(_app(), ["plot", str(tok_run), *map(str, m_runs), "-o", str(out)])
    assert res.exit_code == 0, res.output
    stems = {p.stem for p in out.glob("*.png")}
    assert {p.stem for p in out.glob("*.csv")} == stems
    # per-run figures carry the run name when several runs are given
    for name in (
        "dh_scatter__tok",
        "dh_vs_prob__tok",
        "quadrants__tok",
        "compare_dh__tok",
        "weight_dist__tok",
        "steer_weight_omega__tok",
        "entropy_steps",
        "accuracy_steps",
        "weight_steps",
        "lambda_sensitivity",
        "acc_vs_entropy",
        "pass_at_k",
        "factor_matrix",
    ):
        assert name in stems, name
        png = (out / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
        assert len(pd.read_csv(out / f"{name}.csv")) > 0
    # the CSV holds the plotted numbers
    sc = pd.read_csv(out / "dh_scatter__tok.csv")
    assert set(sc.columns) >= {"estimator", "predicted_dh", "measured_dh", "pcc", "srcc"}
    assert not list(out.glob(".*"))  # no temp files left behind


def test_plot_cli_single_run_subset(tmp_path):
    tok_run = write_token_run(tmp_path / "tok", with_compare=False)
    out = tmp_path / "figs"
    res = runner.invoke(_app(), ["plot", str(tok_run), "-o", str(out), "-f", "dh_scatter", "-f", "entropy_steps"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["dh_scatter.csv", "dh_scatter.png"]
    assert "entropy_steps: skipped (no metrics.jsonl" in res.output


def test_plot_cli_bad_input(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    out = tmp_path / "figs"
    res = runner.invoke(_app(), ["plot", str(empty), "-o", str(out)])
    assert res.exit_code == 2
    line = res.output.strip()
    assert "\n" not in line and "no run files" in line and "tokens.parquet" in line and "metrics.jsonl" in line
    assert not out.exists()

    res = runner.invoke(_app(), ["plot", str(tmp_path / "missing"), "-o", str(out)])
    assert res.exit_code == 2 and "no such folder" in res.output

    # tokens without dh_measured and only figures that need it: nothing plottable
    df, s = make_tokens(measured=False)
    d = tmp_path / "analyze"
    d.mkdir()
    df.to_parquet(d / "tokens.parquet")
    (d / "summary.json").write_text(json.dumps(s))
    res = runner.invoke(_app(), ["plot", str(d), "-o", str(out), "-f", "dh_scatter", "-f", "entropy_steps"])
    assert res.exit_code == 2 and "nothing to plot" in res.output and "dh_measured" in res.output
    assert "no metrics.jsonl" in res.output and res.output.count("\n") == 1
    assert not out.exists()

    (d / "summary.json").write_text("{oops")
    res = runner.invoke(_app(), ["plot", str(d), "-o", str(out)])
    assert res.exit_code == 2 and "summary.json: line 1: malformed JSON" in res.output and res.output.count("\n") == 1

    (d / "tokens.parquet").write_bytes(b"not parquet")
    res = runner.invoke(_app(), ["plot", str(d), "-o", str(out)])
    assert res.exit_code == 2 and "tokens.parquet: cannot read parquet" in res.output
    assert not out.exists()


def test_plot_cli_factor_matrix_on_request(tmp_path):
    run = write_metrics_run(tmp_path / "r", "grpo", 0)
    out = tmp_path / "figs"
    res = runner.invoke(_app(), ["plot", str(run), "-o", str(out), "-f", "factor_matrix"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["factor_matrix.csv", "factor_matrix.png"]


def test_compare_folder_given_directly_finds_its_tokens(tmp_path):
    d = write_token_run(tmp_path / "run")
    run = plots.load_run(d / "compare")
    assert run.compare is not None and run.tokens is not None and run.lr == LR
    built, _ = plots.build_plots([run], ["steer_weight_omega", "weight_dist"])
    assert [p.name for p in built] == ["weight_dist", "steer_weight_omega"]


def test_save_run_figures_writes_what_the_run_supports(tmp_path):
    from entropy_lens.plots import save_run_figures

    run = write_token_run(tmp_path / "run")
    names = save_run_figures(run, tmp_path / "figs")
    assert "dh_scatter" in names and "compare_dh" in names and "factor_matrix" not in names
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == sorted(f"{n}.{e}" for n in names for e in ("png", "csv"))
    assert save_run_figures(run, tmp_path / "figs2", registry=True)[-1] == "factor_matrix"
