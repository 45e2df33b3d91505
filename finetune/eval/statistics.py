"""Small statistics for evaluation reports: Wilson intervals, McNemar's paired test, calibration, percentiles.

Pure Python (no numpy, no scipy), so a report can be recomputed anywhere. Test sets are small (TPRU-test has 461
items), so every accuracy is reported with an interval and every comparison of two runs with a paired test.

Example:
    >>> from tpru_agent.finetune.eval.statistics import wilson_interval, mcnemar
    >>> [round(x, 4) for x in wilson_interval(50, 100)]
    [0.4038, 0.5962]
    >>> round(mcnemar(10, 2).p_exact, 4)
    0.0386
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from tpru_agent.errors import ConfigError

#: The 97.5% quantile of the standard normal: a two-sided 95% interval.
Z95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% by default).

    Better than the normal approximation at small ``n`` or proportions near 0 or 1; never leaves [0, 1].
    ``n == 0`` gives the uninformative ``(0.0, 1.0)``.

    Raises:
        ConfigError: ``successes`` outside ``0..n``.
    """
    if n < 0 or not 0 <= successes <= n:
        raise ConfigError(f"wilson_interval needs 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion(successes: int, n: int) -> dict:
    """``{"value", "correct", "n", "ci95": [lo, hi]}`` for a report (value ``None`` when ``n == 0``)."""
    lo, hi = wilson_interval(successes, n)
    return {"value": successes / n if n else None, "correct": successes, "n": n, "ci95": [lo, hi]}


@dataclass(frozen=True)
class McNemarResult:
    """McNemar's test on the discordant pairs of two paired runs.

    Attributes:
        b: items run A got right and run B got wrong.
        c: items run A got wrong and run B got right.
        p_exact: two-sided exact binomial p-value (conservative).
        p_mid: two-sided mid-p value (Fagerland, Lydersen & Laake 2013: closer to nominal size, still valid at
            small counts); the one to read.
        statistic: the continuity-corrected chi-square statistic ``(|b - c| - 1)^2 / (b + c)`` (0 when b + c = 0).
    """

    b: int
    c: int
    p_exact: float
    p_mid: float
    statistic: float


def _binom_half_pmf(n: int) -> list[float]:
    """P(X = k) for X ~ Binomial(n, 1/2), k = 0..n, computed in log space (exact enough for n in the 10^5s)."""
    log_half_n = n * math.log(0.5)
    return [math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + log_half_n)
            for k in range(n + 1)]


def mcnemar(b: int, c: int) -> McNemarResult:
    """McNemar's paired test from the two discordant counts (exact and mid-p, two-sided).

    Example:
        >>> r = mcnemar(10, 2)           # A right / B wrong on 10 items, the reverse on 2
        >>> round(r.p_exact, 6), round(r.p_mid, 6)
        (0.038574, 0.022461)
    """
    if b < 0 or c < 0:
        raise ConfigError(f"McNemar counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return McNemarResult(b, c, 1.0, 1.0, 0.0)
    k = min(b, c)
    pmf = _binom_half_pmf(n)
    tail = sum(pmf[: k + 1])
    p_exact = min(1.0, 2.0 * tail)
    p_mid = min(1.0, 2.0 * (tail - 0.5 * pmf[k]))
    statistic = max(abs(b - c) - 1, 0) ** 2 / n  # continuity-corrected; 0 when b == c
    return McNemarResult(b, c, p_exact, p_mid, statistic)


@dataclass(frozen=True)
class CalibrationBin:
    """One equal-width confidence bin of a reliability diagram."""

    lo: float
    hi: float
    n: int
    confidence: float | None
    accuracy: float | None


def calibration(confidences: Sequence[float], correct: Sequence[bool], n_bins: int = 10
                ) -> tuple[float | None, list[CalibrationBin]]:
    """Expected calibration error over equal-width bins, and the bins (for a reliability diagram).

    ECE = sum over bins of (bin size / N) * |accuracy(bin) - mean confidence(bin)|. A confidence of exactly 1.0
    falls in the last bin. Returns ``(None, empty bins)`` when there is nothing to calibrate.

    Example:
        >>> ece, bins = calibration([0.9, 0.9, 0.6, 0.6], [True, False, True, True], n_bins=10)
        >>> round(ece, 3)
        0.4
    """
    if len(confidences) != len(correct):
        raise ConfigError(f"{len(confidences)} confidences but {len(correct)} outcomes; they must pair up")
    if n_bins < 1:
        raise ConfigError(f"n_bins must be >= 1, got {n_bins}")
    sums = [[0, 0.0, 0] for _ in range(n_bins)]  # count, confidence sum, correct count
    for conf, ok in zip(confidences, correct):
        if not 0.0 <= conf <= 1.0 or math.isnan(conf):
            raise ConfigError(f"confidence {conf!r} is not a probability in [0, 1]")
        i = min(int(conf * n_bins), n_bins - 1)
        sums[i][0] += 1
        sums[i][1] += conf
        sums[i][2] += bool(ok)
    total = len(confidences)
    bins, ece = [], 0.0
    for i, (count, conf_sum, hits) in enumerate(sums):
        conf = conf_sum / count if count else None
        acc = hits / count if count else None
        bins.append(CalibrationBin(i / n_bins, (i + 1) / n_bins, count, conf, acc))
        if count:
            ece += count / total * abs(acc - conf)
    return (ece if total else None), bins


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) with linear interpolation (numpy's default); ``None`` when empty."""
    if not 0 <= q <= 100:
        raise ConfigError(f"percentile q must be in 0..100, got {q}")
    data = sorted(values)
    if not data:
        return None
    pos = (len(data) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


__all__ = ["CalibrationBin", "McNemarResult", "Z95", "calibration", "mcnemar", "percentile", "proportion",
           "wilson_interval"]
