"""The registered figures, in build order: what each needs, its caption and the claim it checks.

Each builder turns its source (a run, the frame of all runs, or nothing; see
:mod:`entropy_lens.plots.registry`) into ``(plotted table, Figure)`` with the theme modules'
``*_data`` and ``*_figure`` functions. Importing this module registers the figures.
"""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from entropy_lens.plots.compare import (
    compare_dh_data,
    compare_dh_figure,
    factor_matrix_data,
    factor_matrix_figure,
    steer_weight_omega_data,
    steer_weight_omega_figure,
    weight_dist_data,
    weight_dist_figure,
)
from entropy_lens.plots.registry import figure
from entropy_lens.plots.runs import Run
from entropy_lens.plots.style import accuracy_name
from entropy_lens.plots.tokens import (
    dh_scatter_data,
    dh_scatter_figure,
    dh_vs_prob_data,
    dh_vs_prob_figure,
    quadrants_data,
    quadrants_figure,
)
from entropy_lens.plots.training import (
    acc_vs_entropy_data,
    acc_vs_entropy_figure,
    accuracy_column,
    lambda_sensitivity_data,
    lambda_sensitivity_figure,
    pass_at_k_data,
    pass_at_k_figure,
    seed_band_data,
    steps_figure,
    weight_steps_data,
    weight_steps_figure,
)

Built = tuple[pd.DataFrame, Figure]


def _run_label(r: Run) -> str:
    """Title text of a token figure: run name, number of tokens and η when known."""
    return f"{r.name}: {r.n_tokens} tokens" + (f", lr={r.lr:g}" if r.lr else "")


# ---------------------------------------------------------------------------------------------
# Token figures (one per run)
# ---------------------------------------------------------------------------------------------


@figure(
    "dh_scatter",
    needs="tokens:dh_measured",
    caption="Per-token predicted vs measured entropy change for each estimator; dashed: identity.",
    claim="Per token, the first-order closed forms (Ω paper/code, all-logit, covariance) predict the measured "
    "one-step entropy change only weakly on a real model, while the parameter-space JVP along the actual "
    "update reproduces it.",
)
def _dh_scatter(r: Run) -> Built:
    """Per-token predicted vs measured ΔH of one run."""
    d = dh_scatter_data(r.tokens, r.lr, r.n_tokens)
    return d, dh_scatter_figure(d, f"predicted vs measured ΔH per token ({_run_label(r)})")


@figure(
    "dh_vs_prob",
    needs="tokens",
    caption="ΔH against token probability, coloured by quadrant; the sign flips at p = exp(−H).",
    claim="The sign of a token's entropy change follows its quadrant: with A>0 a likely token (p > e^{-H}) "
    "lowers entropy and a rare one raises it; with A<0 the reverse.",
)
def _dh_vs_prob(r: Run) -> Built:
    """ΔH against token probability of one run."""
    d = dh_vs_prob_data(r.tokens, r.lr, r.n_tokens)
    return d, dh_vs_prob_figure(d, f"entropy change vs token probability ({_run_label(r)})")


@figure(
    "quadrants",
    needs="tokens",
    caption="Token share of each quadrant and its signed share of the batch entropy change.",
    claim="Entropy falls through Q1 (rewarded likely tokens) and Q3 and rises through Q2 and Q4; the token "
    "shares show which dominate the batch.",
)
def _quadrants(r: Run) -> Built:
    """Quadrant shares and ΔH sums of one run."""
    d = quadrants_data(r.tokens, r.lr, r.n_tokens)
    return d, quadrants_figure(d, f"quadrants ({_run_label(r)})")


# ---------------------------------------------------------------------------------------------
# Method figures from compare/ (one per run)
# ---------------------------------------------------------------------------------------------


@figure(
    "compare_dh",
    needs="compare_summary",
    caption="Predicted batch entropy change of one update under each method (closed-form estimators).",
    claim="Interventions change the predicted batch entropy change of one update in the direction of the "
    "factor they act on (e.g. entropy-shaped advantage and W-REINFORCE differ most from GRPO).",
)
def _compare_dh(r: Run) -> Built:
    """Predicted batch ΔH per method from one run's compare summary."""
    d = compare_dh_data(r.compare_summary)
    return d, compare_dh_figure(d)


@figure(
    "weight_dist",
    needs="compare",
    caption="Distribution of per-token loss weights each method assigns on the recorded batch.",
    claim="Methods differ in how many tokens they reweight and how far: Fork-tokens and Clip-Cov zero a "
    "subset, W-REINFORCE scales all positive samples, STEER down-weights smoothly within [λ_min, 1].",
)
def _weight_dist(r: Run) -> Built:
    """Token-weight distribution per method of one run's compare table."""
    d = weight_dist_data(r.compare)
    return d, weight_dist_figure(d, r.compare)


@figure(
    "steer_weight_omega",
    needs=("compare", "tokens"),
    caption="STEER's per-token weight against |ω|; dashed: the mapping.",
    claim="STEER's weight is a monotone decreasing function of |ω| (exp mapping): the token with the "
    "largest |ω| in the scope gets exactly λ_min.",
)
def _steer_weight_omega(r: Run) -> Built:
    """STEER's weights against |ω| with the parameters the run compared."""
    params = (((r.compare_summary or {}).get("methods") or {}).get("steer") or {}).get("params")
    d = steer_weight_omega_data(r.compare, r.tokens, params)
    return d, steer_weight_omega_figure(d)


# ---------------------------------------------------------------------------------------------
# Training curves (the metrics of all runs)
# ---------------------------------------------------------------------------------------------


@figure(
    "entropy_steps",
    needs="metrics",
    caption="Mean token entropy against training step per method, normal and extreme settings.",
    claim="Under GRPO the token entropy collapses over training; entropy interventions slow the collapse, "
    "in the normal and the extreme (clipping off) setting.",
)
def _entropy_steps(metrics: pd.DataFrame) -> Built:
    """Seed bands of the mean token entropy."""
    d = seed_band_data(metrics, "entropy_mean")
    return d, steps_figure(d, "mean token entropy (nats)", "entropy over training (mean ± std over seeds)")


@figure(
    "accuracy_steps",
    needs="metrics",
    caption="Accuracy against training step per method, normal and extreme settings.",
    claim="Slowing entropy collapse does not cost accuracy over training (normal and extreme setting).",
)
def _accuracy_steps(metrics: pd.DataFrame) -> Built:
    """Seed bands of the test accuracy (else the rollout accuracy)."""
    col = accuracy_column(metrics)
    d = seed_band_data(metrics, col)
    label = accuracy_name(col, rollouts=True)
    return d, steps_figure(d, label, f"{label} over training (mean ± std over seeds)")


@figure(
    "weight_steps",
    needs="metrics",
    caption="Token-weight statistics (mean, std, min, max) against training step.",
    claim="STEER's token weights stay within [λ_min, 1] and their mean and spread evolve smoothly over training.",
)
def _weight_steps(metrics: pd.DataFrame) -> Built:
    """Seed bands of the token-weight statistics."""
    d = weight_steps_data(metrics)
    return d, weight_steps_figure(d)


@figure(
    "lambda_sensitivity",
    needs="metrics",
    caption="STEER's final accuracy and entropy against λ_min.",
    claim="STEER is not sensitive to λ_min in a broad range: final accuracy and entropy change little "
    "between λ_min values.",
)
def _lambda_sensitivity(metrics: pd.DataFrame) -> Built:
    """STEER's final accuracy and entropy per λ_min."""
    d = lambda_sensitivity_data(metrics)
    return d, lambda_sensitivity_figure(d)


@figure(
    "acc_vs_entropy",
    needs="metrics",
    caption="Accuracy against entropy over training with the fit R = −a·exp(H) + b.",
    claim="Over training, accuracy follows R = −a·exp(H) + b (Cui et al.): lower entropy buys accuracy at a "
    "diminishing rate.",
)
def _acc_vs_entropy(metrics: pd.DataFrame) -> Built:
    """Accuracy against entropy with the per-label fit."""
    d = acc_vs_entropy_data(metrics)
    return d, acc_vs_entropy_figure(d)


@figure(
    "pass_at_k",
    needs="pass_at_k",
    caption="pass@k against k at the last evaluated step.",
    claim="Keeping entropy higher preserves exploration: pass@k at large k stays higher than with GRPO.",
)
def _pass_at_k(pass_at_k: pd.DataFrame) -> Built:
    """pass@k at each run's last evaluated step."""
    d = pass_at_k_data(pass_at_k)
    return d, pass_at_k_figure(d)


# The attribution figures (`entropy-lens attribute` runs) register here, before the registry's.
from entropy_lens.plots import attribution as _attribution  # noqa: F401

# ---------------------------------------------------------------------------------------------
# The method registry
# ---------------------------------------------------------------------------------------------


@figure(
    "factor_matrix",
    caption="Methods × the four factors of the first-order entropy change.",
    claim="Each entropy intervention acts on a subset of the four factors of the first-order entropy change "
    "(clip, advantage, probability, entropy); only STEER acts on all four.",
)
def _factor_matrix(_: None) -> Built:
    """The method registry's factor matrix (needs no run)."""
    d = factor_matrix_data()
    return d, factor_matrix_figure(d)
