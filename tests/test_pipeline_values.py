"""End-to-end VALUE tests: every number a user reads from ``analyze``, ``validate``, ``compare``
(predicted and ``--measure``) and ``sample``, recomputed independently.

The reference implementations below use plain float64 numpy (loops over groups and sequences)
for the closed forms of docs/science.md §1–§3 and full ``model(input_ids).logits`` forwards (one
unpadded sequence at a time) for the statistics and the measured entropy changes; they never call
``entropy_lens.estimators``. The checkers return a list of problems instead of asserting, so the
mutation tests at the end can show that each checker reports a planted bug (the suite proves its
own sensitivity). The rollouts carry an ``old_logp`` that differs from the model's log p, with
ratios chosen to fall in every zone of I_clip (docs/science.md §1.1) and away from its edges.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, fields

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import arithmetic_rows, make_model, make_tokenizer

from entropy_lens import estimators as est
from entropy_lens.io.rollouts import tokenize_rollouts, validate_rollouts
from entropy_lens.pipelines.analyze import AnalyzeSettings, run_analyze
from entropy_lens.pipelines.compare import compare_methods, measure_methods
from entropy_lens.pipelines.sample import sample_rollouts
from entropy_lens.pipelines.validate import ValidateSettings, run_validate
from entropy_lens.tokens import TokenBatch

TAU = 0.7  # every statistic at a temperature != 1, so a forgotten τ shows
EPS_LOW, EPS_HIGH, DUAL_CLIP = 0.2, 0.2, 3.0  # the clip of this case (the methods' defaults are 0.2/0.2, c = 10)
#: the methods run with this case's clip (steer's default ε_high is 0.28, every method's c is 10)
OLD_CLIP = {"grpo": {"dual_clip": DUAL_CLIP}, "steer": {"eps_high": EPS_HIGH, "dual_clip": DUAL_CLIP}}
GRPO_EPS = 1e-6
LR_ANALYZE = 1e-3  # analyze: η only scales the predictions
LR_STEP = 0.02  # validate / compare --measure: one real SGD step, small enough for first order
#: log r = log p − log p_old per token (cycled): ratios 1.05, 0.86, 1.49, 0.61, 3.67, 1, 0.92 —
#: inside the clip, above 1 + ε_high, below 1 − ε_low and above the dual clip c = 3, never near an edge.
LOG_RATIOS = (0.05, -0.15, 0.4, -0.5, 1.3, 0.0, -0.08)
#: 3 groups × 4 responses; group 2 has equal rewards (A = 0, quadrant 0). Exact binary fractions.
REWARDS = (1.0, -1.0, -1.0, 0.5, 2.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0)
#: Columns of tokens.parquet (analyze; validate adds dh_jvp, dh_measured) that the checks cover.
ANALYZE_COLUMNS = {"sample", "group", "pos", "token_id", "token", "logp", "old_logp", "entropy", "sum_p2",
                   "sum_p2_logp", "adv", "reward", "ratio", "clip_active", "omega_paper", "omega_code",
                   "dh_all_logit", "dh_cov", "quadrant"}


# ---------------------------------------------------------------------------------------------
# Independent references: full forwards and float64 closed forms
# ---------------------------------------------------------------------------------------------


def full_forward(model, prompt_ids: list[int], response_ids: list[int], tau: float = TAU):
    """float64 ``log_softmax(model(prompt + response).logits / τ)`` at the states that predict the
    response tokens (one unpadded sequence): ``(logq [n, V], logp [n])``, with autograd."""
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    logits = model(input_ids=ids).logits[0].double()
    P, n = len(prompt_ids), len(response_ids)
    logq = torch.log_softmax(logits[P - 1 : P - 1 + n] / tau, dim=-1)
    return logq, logq[torch.arange(n), torch.tensor(response_ids)]


@torch.no_grad()
def reference_stats(model, seqs) -> dict[str, np.ndarray]:
    """logp, entropy, Σp², Σp² log p (nats at τ) of every response token, concatenated in
    (sample, pos) order."""
    out = {k: [] for k in ("logp", "entropy", "sum_p2", "sum_p2_logp")}
    for p_ids, r_ids in seqs:
        logq, logp = full_forward(model, p_ids, r_ids)
        q = logq.exp()
        out["logp"].append(logp)
        out["entropy"].append(-(q * logq).sum(-1))
        out["sum_p2"].append((q * q).sum(-1))
        out["sum_p2_logp"].append((q * q * logq).sum(-1))
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def grpo_advantages(reward: np.ndarray, group: np.ndarray) -> np.ndarray:
    """GRPO per response: (r − mean_g) / (std_g unbiased + 1e-6), loop over groups."""
    adv = np.zeros(len(reward))
    for g in np.unique(group):
        idx = np.flatnonzero(group == g)
        r = reward[idx].astype(np.float64)
        mean = r.sum() / len(r)
        std = math.sqrt(((r - mean) ** 2).sum() / (len(r) - 1)) if len(r) > 1 else 0.0
        adv[idx] = (r - mean) / (std + GRPO_EPS)
    return adv


def i_clip(ratio: np.ndarray, adv: np.ndarray, eps_low: float, eps_high: float, dual_clip: float | None) -> np.ndarray:
    """I_clip of docs/science.md §1.1, token by token."""
    out = np.ones(len(ratio), dtype=bool)
    for i, (r, a) in enumerate(zip(ratio, adv)):
        if (a > 0 and r > 1 + eps_high) or (a < 0 and r < 1 - eps_low) or (dual_clip is not None and a < 0 and r > dual_clip):
            out[i] = False
    return out


def quadrants(logp: np.ndarray, entropy: np.ndarray, adv: np.ndarray) -> np.ndarray:
    """docs/science.md §2.8, token by token: 0 where A = 0; p = e^{−H} counts as rare."""
    out = np.zeros(len(adv), dtype=np.int64)
    for i, (lp, h, a) in enumerate(zip(logp, entropy, adv)):
        likely = lp + h > 0
        if a > 0:
            out[i] = 1 if likely else 2
        elif a < 0:
            out[i] = 4 if likely else 3
    return out


def steer_exp_weights(logp, old_logp, entropy, adv, lambda_min: float) -> np.ndarray:
    """STEER λ with the defaults of docs/science.md §3 (omega=code, exp mapping, no I_clip, one
    scope): ω = (A/p_old)·p(1−p)·(log p + H); k = ln(1/λ_min)/max(max|ω|, 0.02);
    λ = clamp(exp(−k|ω|), λ_min, 1)."""
    p = np.exp(logp)
    omega = np.abs(adv * np.exp(-old_logp) * p * (1 - p) * (logp + entropy))
    k = math.log(1 / lambda_min) / max(omega.max(), 0.02)
    return np.clip(np.exp(-k * omega), lambda_min, 1.0)


def independent_sgd_dh(model, case: Case, lr: float, weights: np.ndarray | None = None) -> np.ndarray:
    """ΔH of every response token after one plain SGD step on the GRPO token-mean clipped loss
    (docs/science.md §4.1; ``weights`` λ per token multiply ℓ), written here: a copy of the model,
    full float64-headed forwards, one ``torch.optim.SGD`` step, entropies after minus before."""
    m2 = copy.deepcopy(model).eval()
    opt = torch.optim.SGD([p for p in m2.parameters() if p.requires_grad], lr=lr)
    opt.zero_grad()
    total, start = 0.0, 0
    for (p_ids, r_ids), old, a in zip(case.seqs, case.old_logp, case.adv_seq):
        _, logp = full_forward(m2, p_ids, r_ids)
        r = torch.exp(logp - torch.tensor(old, dtype=torch.float64))
        loss = torch.maximum(-a * r, -a * torch.clamp(r, 1 - EPS_LOW, 1 + EPS_HIGH))
        if a < 0:
            loss = torch.minimum(loss, torch.full_like(loss, -DUAL_CLIP * a))
        if weights is not None:
            loss = loss * torch.tensor(weights[start : start + len(r_ids)])
        total = total + loss.sum()
        start += len(r_ids)
    (total / case.n_tokens).backward()
    opt.step()
    return reference_stats(m2, case.seqs)["entropy"] - case.ref["entropy"]


# ---------------------------------------------------------------------------------------------
# Checkers: lists of problems (empty = every value matches)
# ---------------------------------------------------------------------------------------------


def mismatch(name: str, got, want, rtol: float, floor: float = 0.0) -> list[str]:
    """[] when max|got − want| ≤ rtol · max(max|want|, floor), else one line naming ``name``."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return [f"{name}: shape {got.shape} != {want.shape}"]
    if not np.isfinite(got).all():
        return [f"{name}: non-finite values"]
    scale = max(float(np.abs(want).max()) if want.size else 0.0, floor)
    err = float(np.abs(got - want).max()) if want.size else 0.0
    return [] if err <= rtol * scale else [f"{name}: max error {err:.3g} > {rtol:g} x scale {scale:.3g}"]


def sorted_tokens(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(["sample", "pos"]).reset_index(drop=True)


def closed_form_problems(df: pd.DataFrame, lr: float, rtol: float) -> list[str]:
    """Recompute every column written by the closed forms from the frame's own inputs (logp,
    old_logp, entropy, Σp², Σp² log p, reward, group) in float64 and list the ones that differ."""
    df = sorted_tokens(df)
    logp, old = df["logp"].to_numpy(np.float64), df["old_logp"].to_numpy(np.float64)
    H, sp2, sp2l = (df[c].to_numpy(np.float64) for c in ("entropy", "sum_p2", "sum_p2_logp"))
    per_sample = df.groupby("sample")[["reward", "group"]].first()
    seq_adv = dict(zip(per_sample.index, grpo_advantages(per_sample["reward"].to_numpy(), per_sample["group"].to_numpy())))
    A = np.array([seq_adv[s] for s in df["sample"]])
    L = len(df)  # valid tokens, the token-mean normaliser
    ratio = np.exp(logp - old)
    I = i_clip(ratio, A, EPS_LOW, EPS_HIGH, DUAL_CLIP)
    p = np.exp(logp)
    c = (logp - logp.mean()) * (A - A.mean())
    want = {
        "adv": A,
        "ratio": ratio,
        "omega_paper": -(lr / L) * I * ratio * A * p * (1 - p) * (logp + H),
        "omega_code": A / np.exp(old) * p * (1 - p) * (logp + H),
        "dh_all_logit": -(lr / L) * I * A * ratio * (p * (logp + H) - (sp2l + H * sp2)),
        "dh_cov": -(lr / L) * c,
    }
    problems = [m for k, v in want.items() for m in mismatch(k, df[k], v, rtol)]
    if not np.array_equal(df["clip_active"].to_numpy(bool), I):
        problems.append(f"clip_active: {int((df['clip_active'].to_numpy(bool) != I).sum())} tokens differ")
    if not np.array_equal(df["quadrant"].to_numpy(np.int64), quadrants(logp, H, A)):
        problems.append("quadrant: differs")
    return problems


def input_problems(df: pd.DataFrame, case: Case, tokenizer, tol: float = 1e-5) -> list[str]:
    """The frame's per-token inputs against the rollouts and a full forward of the model: token
    ids and text, old_logp, reward, group, and logp / entropy / Σp² / Σp² log p at τ."""
    df = sorted_tokens(df)
    problems = []
    if list(zip(df["sample"], df["pos"])) != case.positions:
        return ["rows: (sample, pos) are not the response tokens of the rollouts"]
    ids = np.concatenate([r for _, r in case.seqs])
    if not np.array_equal(df["token_id"].to_numpy(), ids):
        problems.append("token_id: differs from the rollouts' response_ids")
    if df["token"].tolist() != [tokenizer.decode([int(t)]) for t in ids]:
        problems.append("token: differs from the decoded token ids")
    problems += mismatch("old_logp", df["old_logp"], np.concatenate(case.old_logp), 0.0)
    problems += mismatch("reward", df["reward"], case.reward[df["sample"].to_numpy()], 0.0)
    if not np.array_equal(df["group"].to_numpy(), case.group[df["sample"].to_numpy()]):
        problems.append("group: differs from the rollouts' groups")
    for k in ("logp", "entropy", "sum_p2", "sum_p2_logp"):
        problems += mismatch(k, df[k], case.ref[k], tol, floor=1.0)
    return problems


def jvp_problems(df: pd.DataFrame) -> list[str]:
    """Scale-aware dh_jvp vs dh_measured: batch totals within 10 %, least-squares slope of dh_jvp
    on dh_measured (through 0) in [0.9, 1.1], and a correlation above 0.99."""
    jvp, meas = df["dh_jvp"].to_numpy(np.float64), df["dh_measured"].to_numpy(np.float64)
    problems = []
    if abs(jvp.sum() - meas.sum()) > 0.1 * abs(meas.sum()):
        problems.append(f"totals: dh_jvp {jvp.sum():.4g} vs dh_measured {meas.sum():.4g}")
    slope = float((jvp * meas).sum() / (meas * meas).sum())
    if not 0.9 <= slope <= 1.1:
        problems.append(f"slope of dh_jvp on dh_measured {slope:.3f} outside [0.9, 1.1]")
    if np.corrcoef(jvp, meas)[0, 1] < 0.99:
        problems.append("dh_jvp: correlation with dh_measured < 0.99")
    return problems


# ---------------------------------------------------------------------------------------------
# The case: tiny model, exact-id rollouts with an off-policy old_logp
# ---------------------------------------------------------------------------------------------


@dataclass
class Case:
    model: object
    tokenizer: object
    rollouts: pd.DataFrame  # validated (load_rollouts' output)
    seqs: list[tuple[list[int], list[int]]]
    old_logp: list[np.ndarray]  # float32-exact values, as written in the rollouts
    reward: np.ndarray
    group: np.ndarray
    adv_seq: np.ndarray
    ref: dict[str, np.ndarray]  # reference_stats at θ
    positions: list[tuple[int, int]]

    @property
    def n_tokens(self) -> int:
        return len(self.positions)


def build_case() -> Case:
    model, tokenizer = make_model(), make_tokenizer()
    rows = arithmetic_rows()
    for r, reward in zip(rows, REWARDS):
        r["reward"] = reward
    tok = tokenize_rollouts(validate_rollouts(pd.DataFrame(rows), "<test>"), tokenizer)
    seqs = []
    with torch.no_grad():  # every third token: the model's most likely one (p > e^-H: Q1 / Q4)
        for p_ids, r_ids in zip(tok.prompt_ids, tok.response_ids):
            r_ids = list(r_ids)
            for t in range(1, len(r_ids), 3):
                logits = model(input_ids=torch.tensor([p_ids + r_ids[:t]])).logits[0, -1, : len(tokenizer)]
                r_ids[t] = int(logits.argmax())
            seqs.append((list(p_ids), r_ids))
    ref = reference_stats(model, seqs)
    old, k = [], 0
    for i, (_, r_ids) in enumerate(seqs):
        lp = ref["logp"][k : k + len(r_ids)]
        d = np.array([LOG_RATIOS[(i + t) % len(LOG_RATIOS)] for t in range(len(r_ids))])
        d = np.where(lp - d > -1e-3, np.abs(d), d)  # keep old_logp < 0 (a log-probability)
        old.append((lp - d).astype(np.float32).astype(np.float64))
        k += len(r_ids)
    for r, (p_ids, r_ids), o in zip(rows, seqs, old):
        r.update(prompt_ids=p_ids, response_ids=r_ids, response=tokenizer.decode(r_ids), old_logp=o.tolist())
    rollouts = validate_rollouts(pd.DataFrame(rows), "<test>")
    reward, group = rollouts["reward"].to_numpy(), rollouts["group_id"].to_numpy()
    return Case(model, tokenizer, rollouts, seqs, old, reward, group, grpo_advantages(reward, group), ref,
                [(b, t) for b, (_, r) in enumerate(seqs) for t in range(len(r))])


@pytest.fixture(scope="module")
def case() -> Case:
    return build_case()


def analyze(case: Case, tmp_path, next_model=None) -> tuple[pd.DataFrame, dict]:
    settings = AnalyzeSettings(lr=LR_ANALYZE, temperature=TAU, eps_low=EPS_LOW, eps_high=EPS_HIGH,
                               dual_clip=DUAL_CLIP, shard_size=5, micro_batch=3)
    return run_analyze(case.model, case.tokenizer, case.rollouts, settings, tmp_path / "shards", next_model=next_model)


def validate(case: Case) -> tuple[pd.DataFrame, dict]:
    settings = ValidateSettings(lr=LR_STEP, temperature=TAU, eps_low=EPS_LOW, eps_high=EPS_HIGH,
                                dual_clip=DUAL_CLIP, micro_batch=5, optimizer="sgd", jvp=True)
    return run_validate(case.model, case.tokenizer, case.rollouts, settings)


@pytest.fixture(scope="module")
def next_model(case):
    """A second checkpoint: the model with every parameter moved by 0.01·N(0, 1)."""
    m = copy.deepcopy(case.model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    return m


@pytest.fixture(scope="module")
def analyzed(case, next_model, tmp_path_factory):
    return analyze(case, tmp_path_factory.mktemp("analyze"), next_model=next_model)


@pytest.fixture(scope="module")
def validated(case):
    theta = {n: p.detach().clone() for n, p in case.model.named_parameters()}
    frame, summary = validate(case)
    for n, p in case.model.named_parameters():  # validate restores the checkpoint
        assert torch.equal(p.detach(), theta[n]), n
    return frame, summary


# ---------------------------------------------------------------------------------------------
# analyze
# ---------------------------------------------------------------------------------------------


def test_case_exercises_every_clip_zone_and_quadrant(case):
    """The fixture itself: off-policy ratios in every I_clip zone, both advantage signs, A = 0."""
    ratio = np.exp(case.ref["logp"] - np.concatenate(case.old_logp))
    adv = np.concatenate([np.full(len(r), a) for (_, r), a in zip(case.seqs, case.adv_seq)])
    assert ((adv > 0) & (ratio > 1 + EPS_HIGH)).any() and ((adv < 0) & (ratio < 1 - EPS_LOW)).any()
    assert ((adv < 0) & (ratio > DUAL_CLIP)).any() and (i_clip(ratio, adv, EPS_LOW, EPS_HIGH, DUAL_CLIP)).mean() > 0.5
    assert set(quadrants(case.ref["logp"], case.ref["entropy"], adv)) == {0, 1, 2, 3, 4}
    assert len({len(r) for _, r in case.seqs}) > 1  # padding exists: L != B·T


def test_analyze_writes_the_values_a_full_forward_and_the_formulas_give(case, analyzed):
    frame, summary = analyzed
    assert set(frame.columns) == ANALYZE_COLUMNS | {"dh_measured"}, "a new column needs a value check here"
    assert input_problems(frame, case, case.tokenizer) == []
    assert closed_form_problems(frame, LR_ANALYZE, rtol=1e-9) == []
    assert summary["n_tokens"] == case.n_tokens
    assert summary["mean_entropy"] == pytest.approx(case.ref["entropy"].mean(), rel=1e-5)


def test_analyze_next_model_measures_the_difference_of_two_forwards(case, analyzed, next_model):
    frame, summary = sorted_tokens(analyzed[0]), analyzed[1]
    want = reference_stats(next_model, case.seqs)["entropy"] - case.ref["entropy"]
    assert np.abs(want).max() > 1e-3  # the checkpoints really differ
    assert mismatch("dh_measured", frame["dh_measured"], want, 1e-5, floor=1.0) == []  # 1e-5 nats
    total = summary["estimators"]["omega_paper"]["total_measured"]
    assert total == pytest.approx(want.sum(), abs=1e-5 * case.n_tokens)


# ---------------------------------------------------------------------------------------------
# validate
# ---------------------------------------------------------------------------------------------


def test_validate_columns_match_the_formulas_and_a_full_forward(case, validated):
    frame, summary = validated
    assert set(frame.columns) == ANALYZE_COLUMNS | {"dh_measured", "dh_jvp"}, "a new column needs a value check here"
    assert input_problems(frame, case, case.tokenizer) == []
    # validate computes the closed forms from the float32 statistics: float32 precision
    assert closed_form_problems(frame, LR_STEP, rtol=1e-5) == []
    assert summary["n_tokens"] == case.n_tokens
    # the scores a user reads: omega_code turned into nats by −(η/L)·ω (docs/science.md §2.7)
    for name in ("omega_paper", "omega_code", "dh_all_logit", "dh_cov", "dh_jvp"):
        pred = frame[name].to_numpy() * (-(LR_STEP / case.n_tokens) if name == "omega_code" else 1.0)
        s = summary["estimators"][name]
        assert s["total_pred"] == pytest.approx(pred.sum(), rel=1e-9, abs=1e-15), name
        assert s["pcc"] == pytest.approx(np.corrcoef(pred, frame["dh_measured"])[0, 1], abs=1e-9), name


def test_validate_dh_measured_is_one_independent_sgd_step(case, validated):
    frame = sorted_tokens(validated[0])
    want = independent_sgd_dh(case.model, case, LR_STEP)
    assert np.abs(want).max() > 1e-3  # the step moved the entropies well above float32 noise
    assert mismatch("dh_measured", frame["dh_measured"], want, 1e-3, floor=1e-3) == []  # observed 5e-5


def test_validate_dh_jvp_has_the_scale_of_dh_measured(validated):
    frame, summary = validated
    assert jvp_problems(frame) == []
    s = summary["estimators"]["dh_jvp"]
    assert s["total_pred"] == pytest.approx(frame["dh_jvp"].sum(), rel=1e-9)
    assert s["total_measured"] == pytest.approx(frame["dh_measured"].sum(), rel=1e-9)


# ---------------------------------------------------------------------------------------------
# compare (predicted) and compare --measure
# ---------------------------------------------------------------------------------------------


def compare_problems(long_df: pd.DataFrame, summary: dict, frame: pd.DataFrame, method: str, lr: float,
                     lambda_min: float = 0.8) -> list[str]:
    """One method's rows of compare's long frame recomputed from the tokens frame's inputs: weight
    (1 for grpo, STEER's exp λ for steer), adv_eff = w·A, I_clip, and the estimators with the
    coefficient q = I_clip·w·A; plus the summary's batch sums."""
    df = sorted_tokens(frame)
    got = sorted_tokens(long_df[long_df["method"] == method])
    logp, old, A = (df[c].to_numpy(np.float64) for c in ("logp", "old_logp", "adv"))
    H, sp2, sp2l = (df[c].to_numpy(np.float64) for c in ("entropy", "sum_p2", "sum_p2_logp"))
    L, p, ratio = len(df), np.exp(logp), np.exp(logp - old)
    w = np.ones(L) if method == "grpo" else steer_exp_weights(logp, old, H, A, lambda_min)
    I = i_clip(ratio, A, EPS_LOW, EPS_HIGH, DUAL_CLIP)
    q = I * w * A
    want = {
        "weight": w,
        "adv_eff": w * A,
        "omega_paper": -(lr / L) * q * ratio * p * (1 - p) * (logp + H),
        "dh_all_logit": -(lr / L) * q * ratio * (p * (logp + H) - (sp2l + H * sp2)),
        "dh_cov": -(lr / L) * (logp - logp.mean()) * (q - q.mean()),
    }
    if list(zip(got["sample"], got["pos"])) != list(zip(df["sample"], df["pos"])):
        return [f"{method}: rows differ from the tokens frame"]
    rtol = 1e-9 if method == "grpo" else 1e-6  # compare keeps a method's weights in float32
    problems = [f"{method}: {m}" for k, v in want.items() for m in mismatch(k, got[k], v, rtol)]
    if not np.array_equal(got["clip_active"].to_numpy(bool), I):
        problems.append(f"{method}: clip_active differs")
    dual_moved = (A < 0) & (ratio > DUAL_CLIP) & (ratio <= 10.0)  # touched: I_clip differs from c = 10's
    if not np.array_equal(got["touched"].to_numpy(bool), (w.astype(np.float32) != 1.0) | dual_moved):
        problems.append(f"{method}: touched differs from weight != 1 or the dual clip moved to c = 3")
    for e in ("omega_paper", "dh_all_logit", "dh_cov"):
        total = summary["methods"][method]["predicted_dh"][e]
        problems += [f"{method}: summary {m}" for m in mismatch(e, total, want[e].sum(), 1e-6, np.abs(want[e]).sum())]
    return problems


def test_compare_methods_values_for_grpo_and_steer(validated):
    frame = validated[0]
    long_df, summary = compare_methods(frame, ["grpo", "steer"], OLD_CLIP, lr=LR_STEP)
    assert compare_problems(long_df, summary, frame, "grpo", LR_STEP) == []
    assert compare_problems(long_df, summary, frame, "steer", LR_STEP) == []
    steer = long_df[long_df["method"] == "steer"]
    assert steer["weight"].min() == pytest.approx(0.8, abs=1e-6) and (steer["weight"] < 1).mean() > 0.5
    # grpo's predictions are the frame's own columns (same clip bounds, same coefficient I·A)
    grpo = sorted_tokens(long_df[long_df["method"] == "grpo"])
    for e in ("omega_paper", "dh_all_logit"):
        assert mismatch(e, grpo[e], sorted_tokens(frame)[e], 1e-5) == []


def test_compare_measure_equals_independent_steps(case):
    settings = ValidateSettings(lr=LR_STEP, temperature=TAU, eps_low=EPS_LOW, eps_high=EPS_HIGH,
                                dual_clip=DUAL_CLIP, micro_batch=5, optimizer="sgd", jvp=False)
    long_df, totals = measure_methods(case.model, case.tokenizer, case.rollouts, ["grpo", "steer"],
                                      {"grpo": OLD_CLIP["grpo"], "steer": {**OLD_CLIP["steer"], "lambda_min": 0.3}}, settings)
    old = np.concatenate(case.old_logp)
    adv = np.concatenate([np.full(len(r), a) for (_, r), a in zip(case.seqs, case.adv_seq)])
    lam = steer_exp_weights(case.ref["logp"], old, case.ref["entropy"], adv, 0.3)
    want = {"grpo": independent_sgd_dh(case.model, case, LR_STEP),
            "steer": independent_sgd_dh(case.model, case, LR_STEP, weights=lam)}
    for name, dh in want.items():
        got = sorted_tokens(long_df[long_df["method"] == name])
        assert list(zip(got["sample"], got["pos"])) == case.positions
        assert mismatch(f"{name} dh_measured_step", got["dh_measured_step"], dh, 1e-3, floor=1e-3) == []
        assert totals[name]["dh_measured"] == pytest.approx(got["dh_measured_step"].sum(), rel=1e-9)
    # the two methods' steps really differ, by far more than the tolerance above
    assert np.abs(want["steer"] - want["grpo"]).max() > 0.05 * np.abs(want["grpo"]).max()


# ---------------------------------------------------------------------------------------------
# sample
# ---------------------------------------------------------------------------------------------


def test_sample_records_the_behaviour_logp_a_full_forward_gives():
    model, tokenizer = make_model(), make_tokenizer()
    prompts = pd.DataFrame({
        "prompt": [[{"role": "user", "content": "what is 1 + 2 ?"}],
                   [{"role": "user", "content": "what is 12 + 3 and 4 - 5 ?"}]],
        "ground_truth": ["3", "14"],
    })
    df = sample_rollouts(model, tokenizer, prompts, n=3, temperature=TAU, max_new_tokens=8, seed=0, batch_size=4)
    assert len(df) == 6 and sum(len(r) for r in df["response_ids"]) >= 12
    for p_ids, r_ids, old in zip(df["prompt_ids"], df["response_ids"], df["old_logp"]):
        assert len(old) == len(r_ids)
        with torch.no_grad():
            _, logp = full_forward(model, list(p_ids), list(r_ids), TAU)
        assert np.abs(logp.numpy() - np.asarray(old)).max() < 1e-4  # ratio 1 within 1e-4


# ---------------------------------------------------------------------------------------------
# The checkers catch planted bugs (each mutation is monkeypatched for one test only)
# ---------------------------------------------------------------------------------------------


class _PaddedCount(TokenBatch):
    """Mutation: L counts the padding slots too (B·T instead of mask.sum())."""

    @property
    def n_tokens(self) -> int:
        return int(self.mask.numel())


def _problem_columns(problems: list[str]) -> set[str]:
    return {p.split(":")[0] for p in problems}


def test_checker_catches_L_counting_padding(case, tmp_path, monkeypatch):
    real = est.closed_form_columns

    def mutated(batch, *args, **kw):
        return real(_PaddedCount(**{f.name: getattr(batch, f.name) for f in fields(batch)}), *args, **kw)

    monkeypatch.setattr(est, "closed_form_columns", mutated)
    frame, _ = analyze(case, tmp_path)
    assert _problem_columns(closed_form_problems(frame, LR_ANALYZE, rtol=1e-9)) == {"omega_paper", "dh_all_logit"}


def test_checker_catches_omega_code_with_p_instead_of_p_old(case, tmp_path, monkeypatch):
    real = est.omega_code
    monkeypatch.setattr(est, "omega_code", lambda logp, old_logp, old_entropy, adv: real(logp, logp, old_entropy, adv))
    frame, _ = analyze(case, tmp_path)
    assert _problem_columns(closed_form_problems(frame, LR_ANALYZE, rtol=1e-9)) == {"omega_code"}


def test_checker_catches_dh_jvp_scaled_by_two(case, monkeypatch):
    real = est.dh_jvp
    monkeypatch.setattr(est, "dh_jvp", lambda fn, params, delta: 2.0 * real(fn, params, delta))
    frame, _ = validate(case)
    problems = jvp_problems(frame)
    assert any("slope" in p for p in problems) and any("totals" in p for p in problems)
    assert np.corrcoef(frame["dh_jvp"], frame["dh_measured"])[0, 1] > 0.99  # a correlation alone is blind to it
