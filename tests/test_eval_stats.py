"""Wilson score interval against hand-computed values."""

from __future__ import annotations

import math

import pytest

from wings.evaluation.stats import Z95, accuracy, wilson_interval


def test_z_is_the_975_quantile():
    assert Z95 == pytest.approx(1.959964, abs=1e-6)


@pytest.mark.parametrize(
    ("k", "n", "lo", "hi"),
    [
        # by hand: p=0.7, z^2=3.841459, denom=1.3841459, centre=0.8920729/1.3841459=0.644493,
        # half=1.959964/1.3841459*sqrt(0.021+0.0096036)=1.416009*0.174939=0.247715
        (7, 10, 0.396778, 0.892209),
        (0, 10, 0.0, 0.277533),  # centre = half = 0.138767 (p = 0)
        (10, 10, 0.722467, 1.0),  # mirror image of 0/10
        (50, 100, 0.403831, 0.596169),
        (1, 1, 0.206549, 1.0),
    ],
)
def test_wilson_matches_hand_values(k, n, lo, hi):
    got_lo, got_hi = wilson_interval(k, n)
    assert got_lo == pytest.approx(lo, abs=2e-6)
    assert got_hi == pytest.approx(hi, abs=2e-6)


def test_wilson_formula_and_edge_cases():
    k, n, z = 3, 17, Z95
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert wilson_interval(k, n) == pytest.approx((centre - half, centre + half))
    assert wilson_interval(0, 0) == (0.0, 1.0)
    for bad in ((-1, 5), (6, 5), (1, -1)):
        with pytest.raises(ValueError):
            wilson_interval(*bad)


def test_accuracy_dict():
    acc = accuracy([True, False, True, True])
    d = acc.as_dict()
    assert (d["correct"], d["n"], d["accuracy"]) == (3, 4, 0.75)
    assert d["ci95"][0] < 0.75 < d["ci95"][1]
    assert accuracy([]).as_dict()["accuracy"] is None
