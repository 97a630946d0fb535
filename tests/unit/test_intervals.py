"""95% Student-t intervals of the ablation's means over seeds (demo/intervals.py), pinned to the
published t table and to hand-computed examples."""

from __future__ import annotations

import math

import pytest

from megatron_longctx.demo.intervals import (
    fmt_interval,
    fmt_pm,
    mean_interval,
    paired_difference,
    separated,
    t_quantile_975,
)

#: t(0.975, df) from the published Student t table (e.g. NIST/SEMATECH e-Handbook, 1.3.6.7.2).
PUBLISHED = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
             9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021,
             50: 2.009, 60: 2.000, 100: 1.984, 120: 1.980}


@pytest.mark.parametrize(("df", "value"), sorted(PUBLISHED.items()))
def test_t_quantile_matches_the_published_table(df, value):
    assert t_quantile_975(df) == pytest.approx(value, abs=6e-4)


def test_t_quantile_tends_to_the_normal_and_refuses_df_0():
    assert t_quantile_975(10 ** 6) == pytest.approx(1.95996, abs=1e-4)
    assert t_quantile_975(31) < t_quantile_975(30) < t_quantile_975(29)
    with pytest.raises(ValueError):
        t_quantile_975(0)


def test_mean_interval_by_hand():
    stat = mean_interval([80.0, 90.0, 85.0])  # sd 5, df 2
    assert stat["mean"] == pytest.approx(85.0)
    assert stat["half_width"] == pytest.approx(4.3027 * 5 / math.sqrt(3))  # 12.42
    assert (stat["low"], stat["high"]) == pytest.approx((72.579, 97.421), abs=1e-3)
    assert fmt_interval(stat, ".1f") == "85.0 [72.6, 97.4]"
    assert fmt_pm(stat, ".1f") == "85.0 ± 12.4"
    one = mean_interval([70.0, None])
    assert one["n"] == 1 and one["mean"] == 70.0 and one["half_width"] is None
    assert fmt_interval(one, ".1f") == "70.0 [n/a]" and fmt_pm(one, "+.1f") == "+70.0 ± n/a"
    assert separated(one) is None
    assert fmt_interval(mean_interval([]), ".1f") == "n/a"


def test_paired_difference_and_separation():
    a = {"1": 80.0, "2": 90.0, "3": 85.0}
    diff = paired_difference(a, {"1": 70.0, "2": 75.0, "3": 80.0})  # 10, 15, 5
    assert diff["mean"] == pytest.approx(10.0) and diff["seeds"] == ["1", "2", "3"]
    assert diff["half_width"] == pytest.approx(12.4208, abs=1e-3)
    assert separated(diff) is False
    far = paired_difference(a, {"1": 40.0, "2": 45.0, "3": 50.0})  # 40, 45, 35
    assert far["mean"] == pytest.approx(40.0) and separated(far) is True
    below = paired_difference({"1": 1.0, "2": 1.1}, {"1": 2.0, "2": 2.0})  # -1.0, -0.9
    assert below["high"] < 0 and separated(below) is True
    # Only the seeds both arms have are paired.
    assert paired_difference(a, {"2": 80.0, "9": 1.0})["values"] == [10.0]
    assert fmt_interval(diff, "+.1f") == "+10.0 [-2.4, 22.4]"
