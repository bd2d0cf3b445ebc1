"""Small statistics for the tables: mean ± standard error, Welch's t-test, moving average.

Welch's test is SciPy's ``ttest_ind(equal_var=False)`` (the field's standard); only the
degenerate cases (zero variance in both samples, n < 2), where SciPy returns NaN, are answered
here, so that they say what they mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence

__all__ = [
    "Summary",
    "summarize",
    "welch_t_test",
    "moving_average",
]


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation (ddof=1), standard error and count of seed values.

    With one value the standard deviation and standard error are reported as 0 (there is no
    spread to estimate); ``n`` says so, and the tables mark such cells.
    """

    mean: float
    std: float
    se: float
    n: int
    values: tuple

    @property
    def se_defined(self) -> bool:
        return self.n >= 2


def summarize(values: Iterable[float]) -> Optional[Summary]:
    """``Summary`` of finite values; ``None`` for an empty list. NaNs are dropped."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(vals)
    if n == 0:
        return None
    mean = math.fsum(vals) / n
    if n == 1:
        return Summary(mean, 0.0, 0.0, 1, tuple(vals))
    var = math.fsum((v - mean) ** 2 for v in vals) / (n - 1)
    std = math.sqrt(var)
    return Summary(mean, std, std / math.sqrt(n), n, tuple(vals))


@dataclass(frozen=True)
class WelchResult:
    t: float
    df: float
    p_value: float  # two-sided


def welch_t_test(a: Sequence[float], b: Sequence[float]) -> Optional[WelchResult]:
    """Two-sided Welch (unequal-variance) t-test of mean(a) == mean(b).

    Returns ``None`` when it cannot be computed (fewer than two values in either sample).
    When both samples have zero variance the test degenerates: equal means give p = 1,
    different means p = 0.
    """
    sa, sb = summarize(a), summarize(b)
    if sa is None or sb is None or sa.n < 2 or sb.n < 2:
        return None
    if sa.std == 0.0 and sb.std == 0.0:
        diff = sa.mean - sb.mean
        if diff == 0.0:
            return WelchResult(0.0, float("inf"), 1.0)
        return WelchResult(math.copysign(float("inf"), diff), float("inf"), 0.0)
    from scipy.stats import ttest_ind

    res = ttest_ind(sa.values, sb.values, equal_var=False)
    return WelchResult(float(res.statistic), float(res.df), float(res.pvalue))


def moving_average(values: Sequence[float], window: int = 3) -> List[float]:
    """Trailing moving average: entry i is the mean of values[max(0, i-window+1) : i+1].

    The paper's Figure 2 averages "over the three most recent epochs"; the first entries
    average over the epochs there are so far (1, then 2). NaNs are skipped within a window.
    """
    if window < 1:
        raise ValueError(f"moving_average: window must be >= 1, got {window}")
    out = []
    for i in range(len(values)):
        chunk = [float(v) for v in values[max(0, i - window + 1) : i + 1] if not math.isnan(float(v))]
        out.append(math.fsum(chunk) / len(chunk) if chunk else float("nan"))
    return out
