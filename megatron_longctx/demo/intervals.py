"""Means and 95% confidence intervals over a few seeds (Student t), without scipy.

The mixture ablation repeats every arm for a handful of seeds (3 by default) and reports each
number as mean [low, high]: the two-sided 95% interval of the mean, `t(0.975, n-1) * s /
sqrt(n)` either side, with `s` the sample standard deviation (ddof 1). Differences between two
arms are paired by seed (the difference is taken inside each seed, whose arms share the
evaluation draws, then summarised the same way), which removes the seed-to-seed variation both
arms share.

The t quantiles for 1..30 degrees of freedom are the published table's (`T975`); beyond 30 the
Cornish-Fisher expansion of t around the normal quantile (four terms, Abramowitz & Stegun
26.7.5) is used: within 1e-4 of the exact value from df 30 on (2.0211 at 40, 1.9799 at 120),
where a plain 1.96 would be 3% narrow at df 31. With n = 1 there is no interval (None).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["T975", "fmt_interval", "fmt_pm", "mean_interval", "paired_difference",
           "separated", "t_quantile_975"]

#: Two-sided 95% Student t quantiles t(0.975, df) for df = 1..30 (the published table).
T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
        2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
        2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)
#: The standard normal's 0.975 quantile.
Z975 = 1.959963984540054


def t_quantile_975(df: int) -> float:
    """t(0.975, df): the table for df <= 30, the Cornish-Fisher expansion beyond.

    Raises:
        ValueError: df < 1.
    """
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(T975):
        return T975[df - 1]
    z = Z975
    g1 = (z ** 3 + z) / 4
    g2 = (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
    g3 = (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
    g4 = (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160
    return z + g1 / df + g2 / df ** 2 + g3 / df ** 3 + g4 / df ** 4


def mean_interval(values: Iterable[float | None]) -> dict[str, Any]:
    """Mean and 95% interval of the values that are not None.

    Returns:
        {"n", "mean", "half_width", "low", "high", "values"}; mean None without values,
        half_width/low/high None with fewer than two.
    """
    xs = [float(v) for v in values if v is not None]
    n = len(xs)
    out: dict[str, Any] = {"n": n, "mean": None, "half_width": None, "low": None,
                           "high": None, "values": xs}
    if not n:
        return out
    mean = sum(xs) / n
    out["mean"] = mean
    if n >= 2:
        sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
        half = t_quantile_975(n - 1) * sd / math.sqrt(n)
        out.update(half_width=half, low=mean - half, high=mean + half)
    return out


def paired_difference(a: Mapping[Any, float | None],
                      b: Mapping[Any, float | None]) -> dict[str, Any]:
    """`mean_interval` of a[k] - b[k] over the keys (seeds) both have a value for."""
    keys = [k for k in a if k in b and a[k] is not None and b[k] is not None]
    return {**mean_interval(a[k] - b[k] for k in keys), "seeds": keys}


def separated(stat: Mapping[str, Any]) -> bool | None:
    """Whether the interval excludes 0 (None without an interval)."""
    if stat.get("low") is None or stat.get("high") is None:
        return None
    return stat["low"] > 0 or stat["high"] < 0


def fmt_interval(stat: Mapping[str, Any], fmt: str) -> str:
    """``85.0 [72.6, 97.4]``; ``85.0 [n/a]`` with one value; ``n/a`` with none."""
    if stat.get("mean") is None:
        return "n/a"
    if stat.get("half_width") is None:
        return f"{format(stat['mean'], fmt)} [n/a]"
    plain = fmt.lstrip("+")
    return (f"{format(stat['mean'], fmt)} [{format(stat['low'], plain)}, "
            f"{format(stat['high'], plain)}]")


def fmt_pm(stat: Mapping[str, Any], fmt: str) -> str:
    """``-0.050 ± 0.012``; ``-0.050 ± n/a`` with one value; ``n/a`` with none."""
    if stat.get("mean") is None:
        return "n/a"
    half = "n/a" if stat.get("half_width") is None else format(stat["half_width"],
                                                                 fmt.lstrip("+"))
    return f"{format(stat['mean'], fmt)} ± {half}"
