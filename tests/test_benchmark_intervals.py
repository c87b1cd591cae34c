"""The benchmark's 95 % Wilson interval for CRR cells (few images per cell, so the tables show it)."""

from __future__ import annotations

import pytest

from benchmarks.diffusion_erasure import wilson_interval


def test_known_value_and_edges():
    assert wilson_interval(1, 10) == pytest.approx((0.0179, 0.4042), abs=1e-4)  # the textbook example
    lo, hi = wilson_interval(0, 72)
    assert lo == 0.0 and hi == pytest.approx(1.96**2 / (72 + 1.96**2))  # closed form at zero found
    assert wilson_interval(72, 72)[1] == 1.0 and wilson_interval(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize(("found", "n"), [(9, 72), (3, 12), (50, 576)])
def test_symmetric_and_contains_the_rate(found, n):
    lo, hi = wilson_interval(found, n)
    mirror_lo, mirror_hi = wilson_interval(n - found, n)
    assert lo < found / n < hi
    assert (lo, hi) == pytest.approx((1 - mirror_hi, 1 - mirror_lo))
    assert hi - lo > wilson_interval(4 * found, 4 * n)[1] - wilson_interval(4 * found, 4 * n)[0]  # more data, narrower
