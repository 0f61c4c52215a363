"""compare_methods (library) and the compare / methods CLI commands."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import typer
from typer.testing import CliRunner

from entropy_lens import estimators as est
from entropy_lens.advantages import broadcast_to_tokens
from entropy_lens.advantages import grpo as grpo_adv
from entropy_lens.methods import list_methods
from entropy_lens.objective import clip_active
from entropy_lens.pipelines.compare import (
    LONG_COLUMNS,
    REQUIRED_COLUMNS,
    compare_methods,
    validate_tokens_frame,
)
from entropy_lens.tokens import TokenBatch
from entropy_lens_cli.compare_cmd import register

LR = 1e-3


def make_frame(seed=0, B=8, T=10, V=9, off_policy=0.0, lr=LR) -> pd.DataFrame:
    """A tokens.parquet-shaped frame: exact statistics of random softmaxes + estimator columns."""
    g = torch.Generator().manual_seed(seed)
    logpi = torch.log_softmax(torch.randn(B, T, V, generator=g) * 2.0, -1)
    pi = logpi.exp()
    tok = torch.multinomial(pi.reshape(-1, V), 1, generator=g).reshape(B, T)
    logp = logpi.gather(-1, tok[..., None])[..., 0]
    lengths = torch.randint(3, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]
    reward = torch.randint(0, 2, (B,), generator=g).float()
    reward[0], reward[1] = 1.0, 0.0  # first group is never all-equal
    group = torch.arange(B) // 4
    adv = broadcast_to_tokens(grpo_adv(reward, group), mask)
    old = logp + off_policy * torch.randn(B, T, generator=g)
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
    ica = clip_active(r, adv, 0.2, 0.2, 3.0).float()
    L = b.n_tokens
    extra = {
        "ratio": r,
        "clip_active": ica.bool(),
        "omega_paper": est.omega_paper(logp, H, adv, r, ica, lr, L),
        "omega_code": est.omega_code(logp, old, H, adv),
        "dh_all_logit": est.dh_all_logit(logp, H, b.sum_p2, b.sum_p2_logp, adv, r, ica, lr, L),
        "dh_cov": est.dh_cov(logp, adv, mask, lr),
        "quadrant": est.quadrant(logp, H, adv).to(torch.int64),
    }
    return b.to_frame(extra=extra)


@pytest.fixture(scope="module")
def frame():
    return make_frame()


@pytest.fixture(scope="module")
def result(frame):
    return compare_methods(frame, list_methods(), {}, lr=LR, seed=0)


def test_long_frame_shape(frame, result):
    long_df, summary = result
    assert list(long_df.columns) == list(LONG_COLUMNS)
    # kl_ref needs reference log-probs, which a tokens table without ref_logp lacks: skipped, named
    assert set(summary["skipped"]) == {"kl_ref"} and "ref_logp" in summary["skipped"]["kl_ref"]
    ran = [m for m in list_methods() if m not in summary["skipped"]]
    assert len(long_df) == len(frame) * len(ran)
    assert set(long_df["method"]) == set(ran)
    assert long_df["touched"].dtype == bool
    assert summary["n_tokens"] == len(frame)
    json.dumps(summary, allow_nan=False)  # JSON-ready (no NaN / inf)


def test_grpo_reproduces_the_frame_estimators(frame, result):
    _, summary = result
    pred = summary["methods"]["grpo"]["predicted_dh"]
    for col in ("omega_paper", "dh_all_logit", "dh_cov"):
        assert math.isclose(pred[col], frame[col].sum(), rel_tol=1e-5, abs_tol=1e-12), col
    assert summary["methods"]["grpo"]["touched_share"] == 0.0
    assert summary["input_totals"]["omega_paper"] == pytest.approx(frame["omega_paper"].sum())


def test_quadrants_add_up_to_total(result):
    _, summary = result
    for name, res in summary["methods"].items():
        for e, total in res["predicted_dh"].items():
            parts = sum(q[e] for q in res["quadrants"].values())
            assert parts == pytest.approx(total, rel=1e-6, abs=1e-15), (name, e)
        assert sum(q["n_tokens"] for q in res["quadrants"].values()) == summary["n_tokens"]
        assert sum(q["n_touched"] for q in res["quadrants"].values()) == res["n_touched"]
        assert 0.0 <= res["touched_share"] <= 1.0


def test_grpo_quadrant_signs(result):
    # Q1 and Q3 lower entropy, Q2 and Q4 raise it (docs/science.md §2.8), under the all-logit form's
    # sampled-logit part; the paper form has exactly these signs token by token
    q = result[1]["methods"]["grpo"]["quadrants"]
    assert q["Q1"]["omega_paper"] <= 0 and q["Q3"]["omega_paper"] <= 0
    assert q["Q2"]["omega_paper"] >= 0 and q["Q4"]["omega_paper"] >= 0


def test_neutral_steer_equals_grpo_and_default_steer_shrinks(frame):
    _, s = compare_methods(frame, ["grpo", "steer"], {"steer": {"lambda_min": 1.0}}, lr=LR, seed=0)
    assert s["methods"]["steer"]["predicted_dh"] == pytest.approx(s["methods"]["grpo"]["predicted_dh"])
    long_df, s2 = compare_methods(frame, ["grpo", "steer"], {}, lr=LR, seed=0)
    st = long_df[long_df.method == "steer"]
    assert st["weight"].between(0.8 - 1e-6, 1.0).all() and st["weight"].min() == pytest.approx(0.8)
    # weights do not change I_clip, so each token's sampled-logit prediction is scaled by λ
    g = long_df[long_df.method == "grpo"].reset_index(drop=True)
    st = st.reset_index(drop=True)
    for e in ("omega_paper", "dh_all_logit"):
        assert st[e].to_numpy() == pytest.approx((st["weight"] * g[e]).to_numpy(), rel=1e-6, abs=1e-18)
    assert st["omega_paper"].abs().sum() < g["omega_paper"].abs().sum()


def test_w_reinforce_adv_eff(frame, result):
    long_df, _ = result
    w = long_df[long_df.method == "w_reinforce"].reset_index(drop=True)
    f = frame.sort_values(["sample", "pos"])
    expected = np.where(f["reward"].to_numpy() > 0.5, 0.1, -1.0)  # raw rewards: λ·PSR + NSR
    assert w["adv_eff"].to_numpy() == pytest.approx(expected, rel=1e-6)
    old, _ = compare_methods(frame, ["w_reinforce"], {"w_reinforce": {"advantage": "grpo"}}, lr=LR, seed=0)
    adv = f["adv"].to_numpy()
    assert old["adv_eff"].to_numpy() == pytest.approx([0.1 * a if a > 0 else a for a in adv], rel=1e-6)


def test_entropy_bonus_penalty_reported_null_with_reason(result):
    res = result[1]["methods"]["entropy_bonus"]
    pen = res["penalty_dh"]
    assert pen["predicted_dh"] is None and "sum_v pi_v^2 (log pi_v)^2" in pen["reason"]
    assert pen["lower_bound"] > 0 and res["penalty_included"] is False
    assert res["touched_share"] == 1.0


def test_kl_cov_penalty_folded_and_inert_on_policy(frame):
    _, s = compare_methods(frame, ["grpo", "kl_cov"], {}, lr=LR, seed=0)
    pen = s["methods"]["kl_cov"]["penalty_dh"]
    assert pen["folded_into"] == "adv_eff"
    assert all(v == 0.0 for v in pen["predicted_dh"].values())
    assert s["methods"]["kl_cov"]["eps_high"] is None  # unbounded; non-finite numbers are null in JSON
    off = make_frame(seed=3, off_policy=0.4)
    _, s_off = compare_methods(off, ["kl_cov"], {"kl_cov": {"k": 0.2}}, lr=LR, seed=0)
    assert any(v != 0.0 for v in s_off["methods"]["kl_cov"]["penalty_dh"]["predicted_dh"].values())


def test_clip_higher_uses_its_own_bounds():
    off = make_frame(seed=4, B=8, T=40, off_policy=0.4)
    long_df, s = compare_methods(off, ["grpo", "clip_higher"], {}, lr=LR, seed=0)
    g = long_df[long_df.method == "grpo"].reset_index(drop=True)
    c = long_df[long_df.method == "clip_higher"].reset_index(drop=True)
    newly = c["clip_active"] & ~g["clip_active"]
    assert newly.any() and (newly == c["touched"]).all()
    assert s["methods"]["clip_higher"]["eps_high"] == 0.28


def test_results_do_not_depend_on_method_order(frame):
    a, _ = compare_methods(frame, ["grpo", "clip_cov"], {"clip_cov": {"clip_ratio": 0.1, "lb": -1e9}}, LR, 5)
    b, _ = compare_methods(frame, ["clip_cov"], {"clip_cov": {"clip_ratio": 0.1, "lb": -1e9}}, LR, 5)
    pd.testing.assert_frame_equal(a[a.method == "clip_cov"].reset_index(drop=True), b)


def test_library_errors(frame):
    with pytest.raises(ValueError, match="available"):
        compare_methods(frame, ["nope"], {}, LR, 0)
    with pytest.raises(ValueError, match="valid keys"):
        compare_methods(frame, ["steer"], {"steer": {"lambda": 0.7}}, LR, 0)
    with pytest.raises(ValueError, match="not compared"):
        compare_methods(frame, ["grpo"], {"steer": {"lambda_min": 0.7}}, LR, 0)
    with pytest.raises(ValueError, match="missing columns: quadrant"):
        compare_methods(frame.drop(columns=["quadrant"]), ["grpo"], {}, LR, 0)


@pytest.mark.parametrize(
    "column,change,needle",
    [
        ("adv", lambda s: s.astype(str), "column adv holds str values, expected numbers"),
        ("group", lambda s: s.astype(str), "column group holds str values, expected integers"),
        ("logp", lambda s: s.astype(object), "column logp holds object values, expected numbers"),
        ("sample", lambda s: s + 0.5, "column sample holds non-integer values"),
        ("group", lambda s: s.astype(bool), "column group holds bool values, expected integers"),
        ("token_id", lambda s: s.where(s > 3), "column token_id has missing values"),
        ("clip_active", lambda s: s.astype(str), "column clip_active holds str values"),
        ("quadrant", lambda s: s + 7, "column quadrant holds values outside 0..4"),
        ("sample", lambda s: s * 10**9, "sample / pos span"),
        ("pos", lambda s: s - 100, "negative sample or pos"),
        ("entropy", lambda s: s.where(s > 1.0, float("nan")), "non-finite values in column entropy"),
        ("dh_cov", lambda s: s.astype(str), "column dh_cov holds str values"),
    ],
)
def test_tokens_frame_types_are_checked(frame, column, change, needle):
    bad = frame.copy()
    bad[column] = change(bad[column])
    with pytest.raises(ValueError) as info:
        validate_tokens_frame(bad)
    assert needle in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ValueError, match="column|sample|non-finite"):
        compare_methods(bad, ["grpo"], {}, LR, 0)  # never a TypeError from the arithmetic


def test_tokens_frame_with_integral_floats_is_accepted(frame):
    ok = frame.copy()
    ok["pos"] = ok["pos"].astype(float)  # e.g. written by a tool that stores every column as double
    validate_tokens_frame(ok)
    pd.testing.assert_frame_equal(compare_methods(ok, ["grpo"], {}, LR, 0)[0], compare_methods(frame, ["grpo"], {}, LR, 0)[0])


def test_cli_compare_string_columns_is_one_line(tmp_path, frame):
    src = tmp_path / "tokens.parquet"
    bad = frame.copy()
    bad["adv"] = bad["adv"].astype(str)
    bad.to_parquet(src)
    out = tmp_path / "cmp"
    res = CliRunner().invoke(make_app(), ["compare", str(src), "-m", "grpo", "-o", str(out)])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert str(src) in res.stderr and "column adv" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not out.exists()


# ------------------------------------------------------------------------------------------- CLI


def make_app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def test_cli_compare_writes_files(tmp_path, frame):
    src = tmp_path / "tokens.parquet"
    frame.to_parquet(src)
    out = tmp_path / "cmp"
    res = CliRunner().invoke(
        make_app(),
        ["compare", str(src), "-m", "grpo", "-m", "steer", "--set", "steer.lambda_min=0.7",
         "--set", "steer.use_iclip=true", "--lr", str(LR), "--seed", "3", "-o", str(out)],
    )
    assert res.exit_code == 0, res.output
    assert "steer" in res.stdout and "omega_paper" in res.stdout
    df = pd.read_parquet(out / "compare.parquet")
    assert set(df.method) == {"grpo", "steer"} and len(df) == 2 * len(frame)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"]["steer"]["params"]["lambda_min"] == 0.7
    assert summary["methods"]["steer"]["params"]["use_iclip"] is True
    assert summary["seed"] == 3 and summary["lr"] == LR
    assert df[df.method == "steer"]["weight"].min() == pytest.approx(0.7)
    assert sorted(p.name for p in out.iterdir()) == ["compare.parquet", "summary.json"]  # no temp files


@pytest.mark.parametrize(
    "args,needle",
    [
        (["-m", "nope"], "unknown method 'nope'"),
        (["-m", "steer", "--set", "steer.lambda_mn=0.7"], "valid keys"),
        (["-m", "steer", "--set", "steer.lambda_min=2"], "lambda_min must be in (0, 1]"),
        (["-m", "grpo", "--set", "steer.lambda_min=0.7"], "not being run"),
        (["-m", "grpo", "--set", "lambda_min=0.7"], "METHOD.PARAM=VALUE"),
    ],
)
def test_cli_usage_errors(tmp_path, frame, args, needle):
    src = tmp_path / "tokens.parquet"
    frame.to_parquet(src)
    out = tmp_path / "cmp"
    res = CliRunner().invoke(make_app(), ["compare", str(src), *args, "-o", str(out)])
    assert res.exit_code == 2
    assert needle in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_bad_input_files(tmp_path, frame):
    """Exit 2 and exactly one line on stderr naming the file (the README's promise)."""
    out = tmp_path / "cmp"

    def one_line(res, *needles: str) -> None:
        assert res.exit_code == 2, (res.exit_code, res.output)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and all(n in lines[0] for n in needles), res.stderr
        assert "Traceback" not in res.output

    missing = tmp_path / "absent.parquet"
    one_line(CliRunner().invoke(make_app(), ["compare", str(missing), "-o", str(out)]), str(missing), "no such file")

    bad = tmp_path / "bad.parquet"
    frame.drop(columns=["entropy", "dh_cov"]).to_parquet(bad)
    one_line(CliRunner().invoke(make_app(), ["compare", str(bad), "-o", str(out)]), str(bad), "entropy", "dh_cov")

    junk = tmp_path / "junk.parquet"
    junk.write_text("not a parquet file")
    one_line(CliRunner().invoke(make_app(), ["compare", str(junk), "-o", str(out)]), str(junk))
    assert not out.exists()


def test_cli_methods_lists_registry():
    res = CliRunner().invoke(make_app(), ["methods"], env={"COLUMNS": "250"})
    assert res.exit_code == 0
    for name in list_methods():
        assert name in res.stdout
    assert "lambda_min=0.8" in res.stdout and "clip_ratio=0.0002" in res.stdout
    assert "advantage" in res.stdout


def test_required_columns_documented():
    assert {"omega_paper", "dh_all_logit", "dh_cov", "quadrant"} <= set(REQUIRED_COLUMNS)


def test_a_requested_method_missing_its_input_is_an_error(frame):
    with pytest.raises(ValueError, match="method kl_ref needs ref_logp"):
        compare_methods(frame, ["grpo", "kl_ref"], {}, lr=LR, skip_missing=False)
    with pytest.raises(ValueError, match="no method can run on this table"):
        compare_methods(frame, ["kl_ref"], {}, lr=LR)


def test_micro_batch_scope_normalises_steer_per_micro_batch(frame):
    from entropy_lens.methods import steer_omega, steer_weights
    from entropy_lens.objective import clip_active

    long_df, summary = compare_methods(frame, ["steer"], {}, lr=LR, micro_batch=2)
    assert summary["micro_batch"] == 2
    b = TokenBatch.from_frame(frame)
    B = b.mask.shape[0]
    iclip = clip_active(b.ratio, b.adv, 0.2, 0.28, 10.0)
    om = steer_omega(b.logp, b.old_logp, b.entropy, b.adv, b.ratio, iclip, "code", False)
    expected = steer_weights(om.abs(), b.mask, torch.arange(B) // 2, "exp", 0.8, 1.0)
    got = long_df.sort_values(["sample", "pos"])["weight"].to_numpy()
    assert np.allclose(got, expected[b.mask].double().numpy(), rtol=1e-6)
    whole = compare_methods(frame, ["steer"], {}, lr=LR)[0].sort_values(["sample", "pos"])["weight"].to_numpy()
    assert not np.allclose(got, whole)  # the scope matters on this batch


def test_cli_micro_batch_and_skipped_methods(tmp_path, frame):
    from entropy_lens_cli.app import app

    runner = CliRunner()
    tokens = tmp_path / "tokens.parquet"
    frame.to_parquet(tokens)
    res = runner.invoke(app, ["compare", str(tokens), "--micro-batch", "2", "-o", str(tmp_path / "all")])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "all" / "summary.json").read_text())
    assert summary["micro_batch"] == 2 and set(summary["skipped"]) == {"kl_ref"}
    assert "kl_ref skipped" in res.output
    # asked for by name, a method the table cannot feed is an error: one line, exit 2, nothing written
    res = runner.invoke(app, ["compare", str(tokens), "-m", "kl_ref", "-m", "grpo", "-o", str(tmp_path / "one")])
    assert res.exit_code == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "kl_ref needs ref_logp" in lines[0]
    assert not (tmp_path / "one").exists()
    res = runner.invoke(app, ["compare", str(tokens), "--micro-batch", "0", "-o", str(tmp_path / "bad")])
    assert res.exit_code == 2 and "--micro-batch" in res.stderr
