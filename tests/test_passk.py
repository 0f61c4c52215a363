"""pass@k (Chen et al. 2021, arXiv:2107.03374) and avg@k against exact binomials."""

from fractions import Fraction
from math import comb

import numpy as np
import pytest

from entropy_lens.passk import avg_at_k, pass_at_k, pass_at_k_ks, pass_at_k_table


def exact(n: int, c: int, k: int) -> float:
    """1 − C(n−c, k)/C(n, k) in exact rational arithmetic."""
    return float(1 - Fraction(comb(n - c, k), comb(n, k)))


@pytest.mark.parametrize("n", [1, 2, 5, 32, 100])
def test_matches_the_exact_binomial_formula(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k([n], [c], k)[0] == pytest.approx(exact(n, c, k), abs=1e-12), (n, c, k)


def test_known_values():
    # n=4, c=1: pass@1 = 1/4, pass@2 = 1 − C(3,2)/C(4,2) = 1/2, pass@4 = 1
    assert pass_at_k([4], [1], 1)[0] == pytest.approx(0.25)
    assert pass_at_k([4], [1], 2)[0] == pytest.approx(0.5)
    assert pass_at_k([4], [1], 4)[0] == 1.0
    assert pass_at_k([4, 4], [0, 4], 3).tolist() == [0.0, 1.0]
    # pass@1 is the fraction correct
    assert pass_at_k([10], [3], 1)[0] == pytest.approx(0.3)


def test_large_n_is_stable():
    # C(1000, 500) overflows float64; the product form does not
    v = pass_at_k([1000], [1], 500)[0]
    assert v == pytest.approx(0.5, abs=1e-12)
    assert np.isfinite(pass_at_k([5000], [2500], 2000)).all()


def test_table_and_ks():
    assert pass_at_k_ks(1) == [1]
    assert pass_at_k_ks(4) == [1, 2, 4]
    assert pass_at_k_ks(32) == [1, 2, 4, 8, 16, 32]
    assert pass_at_k_ks(6) == [1, 2, 4, 6]
    table = pass_at_k_table([4, 4], [1, 0])
    assert list(table) == ["1", "2", "4"]
    assert table["1"] == pytest.approx(0.125) and table["2"] == pytest.approx(0.25) and table["4"] == 0.5
    assert avg_at_k([4, 4], [1, 0]) == pytest.approx(0.125)
    assert avg_at_k([2, 6], [2, 0]) == pytest.approx(0.25)  # over samples, not problems


def test_bad_input():
    with pytest.raises(ValueError, match="at least 5 samples"):
        pass_at_k([4], [1], 5)
    with pytest.raises(ValueError, match="k >= 1"):
        pass_at_k([4], [1], 0)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k([4], [5], 1)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        avg_at_k([4], [-1])
    with pytest.raises(ValueError, match="at least 8"):
        pass_at_k_table([4], [1], ks=[1, 8])
    with pytest.raises(ValueError, match="no problems"):
        pass_at_k_table([], [])
