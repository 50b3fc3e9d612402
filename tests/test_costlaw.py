"""Cost laws: recovering a known power law, and the linear extrapolation law."""

from __future__ import annotations

import pytest

from bench.core import costlaw


def test_fit_recovers_a_power_law():
    law = costlaw.fit([(x, 3e-9 * x**1.5) for x in (1e4, 1e5, 1e6, 1e7)])
    assert law.exponent == pytest.approx(1.5) and law.coefficient == pytest.approx(3e-9, rel=1e-6)
    assert law.r2 == pytest.approx(1.0) and law.predict(1e8) == pytest.approx(3e-9 * 1e12, rel=1e-6)


def test_single_size_gives_a_linear_law_through_it():
    law = costlaw.fit([(100.0, 2.0), (100.0, 4.0)])
    assert law.exponent == 1.0 and law.predict(1000.0) == pytest.approx(10 * 2 ** 1.5, rel=1e-6)  # geometric mean 2√2


def test_size_variables():
    assert costlaw.size_variable("pissa", 8, 4) == 8 * 4 * 4
    assert costlaw.size_variable("lora_da", 8, 4) == 4 * 4 * 12
    assert costlaw.size_variable("loram_dst", 8, 4) == 32


def test_fit_rows_uses_the_largest_sizes_and_ignores_failures():
    rows = [{"status": "ok", "initializer": "loram_dst", "d_out": d, "d_in": d, "median_s": t}
            for d, t in [(8, 1.0), (16, 1.0), (64, 0.016), (128, 0.064), (256, 0.256)]]  # overhead-flat at small d
    rows.append({"status": "timeout", "initializer": "loram_dst", "d_out": 512, "d_in": 512, "median_s": None})
    law = costlaw.fit_rows(rows, "loram_dst")
    assert law.points == 3 and law.exponent == pytest.approx(1.0)
    linear = costlaw.fit_rows(rows, "loram_dst", largest=1)
    assert linear.predict(512 * 512) == pytest.approx(4 * 0.256)
    assert costlaw.fit_rows(rows, "pissa") is None
