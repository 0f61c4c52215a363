"""pass@k and avg@k of sampled answers (pure math, float64).

``n`` answers are drawn per problem, ``c`` of them correct.

- avg@k: the mean correctness over all drawn answers of all problems, Σ c / Σ n (with the same n
  for every problem, the mean over problems of c / n).
- pass@k: the probability that at least one of k answers is correct, estimated without bias from
  the n ≥ k drawn ones (Chen et al. 2021, "Evaluating Large Language Models Trained on Code",
  arXiv:2107.03374, eq. 1):

      pass@k = 1 − C(n−c, k) / C(n, k),

  evaluated as the product 1 − Π_{i=n−c+1}^{n} (1 − k/i) (every factor in [0, 1], so there is no
  overflow of the binomials and no cancellation), and exactly 1 when n − c < k.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["avg_at_k", "pass_at_k", "pass_at_k_ks", "pass_at_k_table"]


def _check_counts(n: np.ndarray, c: np.ndarray) -> None:
    if n.shape != c.shape:
        raise ValueError(f"n and c differ in shape ({n.shape} vs {c.shape})")
    if n.size and (bool((n < 1).any()) or bool((c < 0).any()) or bool((c > n).any())):
        raise ValueError("every problem needs n >= 1 samples and 0 <= c <= n correct ones")


def pass_at_k(n: Sequence[int] | np.ndarray, c: Sequence[int] | np.ndarray, k: int) -> np.ndarray:
    """Unbiased pass@k per problem, ``[P]`` float64 in [0, 1] (Chen et al. 2021, arXiv:2107.03374):
    1 − C(n−c, k)/C(n, k) = 1 − Π_{i=n−c+1}^{n} (1 − k/i); 1 where n − c < k.

    ``n``: samples drawn per problem, ``c``: correct ones (``[P]`` integers). ``k`` must be an
    integer with 1 <= k <= every n (``ValueError`` otherwise: pass@k cannot be estimated from
    fewer than k samples)."""
    n = np.asarray(n, dtype=np.int64).reshape(-1)
    c = np.asarray(c, dtype=np.int64).reshape(-1)
    _check_counts(n, c)
    if not (isinstance(k, (int, np.integer)) and k >= 1):
        raise ValueError(f"pass@k needs an integer k >= 1, got {k!r}")
    if n.size and int(n.min()) < k:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {int(n.min())}")
    out = np.ones(n.shape, dtype=np.float64)
    for j, (nj, cj) in enumerate(zip(n.tolist(), c.tolist())):  # per problem: c factors
        if nj - cj >= k:
            i = np.arange(nj - cj + 1, nj + 1, dtype=np.float64)
            out[j] = 1.0 - float(np.prod(1.0 - k / i))
    return out


def pass_at_k_ks(n: int) -> list[int]:
    """The k reported for ``n`` samples per problem: 1, 2, 4, … (powers of two ≤ n) and n itself."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ks = [1 << e for e in range(n.bit_length()) if (1 << e) <= n]
    return ks if ks[-1] == n else [*ks, n]


def pass_at_k_table(n: Sequence[int] | np.ndarray, c: Sequence[int] | np.ndarray,
                    ks: Iterable[int] | None = None) -> dict[str, float]:
    """``{"1": mean pass@1, "2": …}``: pass@k averaged over problems, for every k in ``ks``
    (default :func:`pass_at_k_ks` of the smallest n)."""
    n = np.asarray(n, dtype=np.int64).reshape(-1)
    if n.size == 0:
        raise ValueError("pass@k of no problems")
    ks = pass_at_k_ks(int(n.min())) if ks is None else sorted(set(ks))
    return {str(k): float(pass_at_k(n, c, k).mean()) for k in ks}


def avg_at_k(n: Sequence[int] | np.ndarray, c: Sequence[int] | np.ndarray) -> float:
    """avg@k = Σ c / Σ n: the mean correctness over every drawn sample of every problem."""
    n = np.asarray(n, dtype=np.int64).reshape(-1)
    c = np.asarray(c, dtype=np.int64).reshape(-1)
    _check_counts(n, c)
    if n.size == 0:
        raise ValueError("avg@k of no problems")
    return float(c.sum() / n.sum())
