"""Verifiable reward of the recipe, as verl's custom reward function
(``reward.custom_reward_function.path``): verl calls ``compute_score(data_source, solution_str,
ground_truth, extra_info)`` for every response.

Training prompts (DAPO-Math-17k, ``data_source == "math_dapo"``) are graded with DAPO's rule
(the last 300 characters, the last ``Answer:`` line or ``\\boxed{}``, normalised string match;
+1 / -1), the evaluation sets (AIME, AMC, MATH-500, whose answers can be LaTeX expressions) with
Math-Verify, also +1 / -1. Both graders are entropy_lens.rewards.
"""

from __future__ import annotations

from entropy_lens.rewards import score_dapo, score_math

TRAIN_SOURCES = ("math_dapo",)


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float:
    """+1 for a correct answer, -1 otherwise (DAPO's rule on the training set, Math-Verify elsewhere)."""
    if data_source in TRAIN_SOURCES:
        return score_dapo(solution_str, str(ground_truth), convention="pm1")
    return score_math(solution_str, str(ground_truth), convention="pm1")
