"""Small statistics for evaluation reports: Wilson intervals, McNemar's paired test, calibration, percentiles.

Thin wrappers over scipy and numpy (imported inside the functions, so importing this module stays cheap): the
wrappers fix the conventions a report relies on (the empty cases, the typed errors, plain ``float`` results).
Test sets are small (TPRU-test has 461 items), so every accuracy is reported with an interval and every comparison
of two runs with a paired test.

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
    """Wilson score interval of a binomial proportion (95% by default), without continuity correction.

    Better than the normal approximation at small ``n`` or proportions near 0 or 1; never leaves [0, 1].
    ``n == 0`` gives the uninformative ``(0.0, 1.0)``. Computed by scipy's ``binomtest(...).proportion_ci`` with
    ``method="wilson"`` (``"wilsoncc"`` would add the continuity correction); ``z`` is turned into the confidence
    level ``2 * Phi(z) - 1`` it stands for.

    Args:
        successes: number of successes, ``0..n``.
        n: number of trials, ``>= 0``.
        z: standard-normal quantile of the two-sided interval (``Z95`` for 95%, 1.96 in older reports).

    Returns:
        ``(low, high)`` as plain floats.

    Raises:
        ConfigError: ``successes`` outside ``0..n``, or ``z`` not positive.
    """
    if n < 0 or not 0 <= successes <= n:
        raise ConfigError(f"wilson_interval needs 0 <= successes <= n, got {successes} of {n}")
    if not z > 0:
        raise ConfigError(f"wilson_interval needs a positive z (1.96 for 95%), got {z!r}")
    if n == 0:
        return 0.0, 1.0
    from scipy.stats import binomtest

    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=math.erf(z / math.sqrt(2)),
                                                         method="wilson")
    return max(0.0, float(ci.low)), min(1.0, float(ci.high))


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


def mcnemar(b: int, c: int) -> McNemarResult:
    """McNemar's paired test from the two discordant counts (exact and mid-p, two-sided).

    Under the null each discordant pair goes either way with probability 1/2, so with ``k = min(b, c)`` and
    ``n = b + c``: ``p_exact`` is scipy's two-sided ``binomtest(k, n, 0.5).pvalue`` and ``p_mid`` is
    ``2 * (P(X <= k) - P(X = k) / 2)`` for ``X ~ Binomial(n, 1/2)`` (both capped at 1).

    Example:
        >>> r = mcnemar(10, 2)           # A right / B wrong on 10 items, the reverse on 2
        >>> round(r.p_exact, 6), round(r.p_mid, 6)
        (0.038574, 0.022461)

    Raises:
        ConfigError: a negative count.
    """
    if b < 0 or c < 0:
        raise ConfigError(f"McNemar counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return McNemarResult(b, c, 1.0, 1.0, 0.0)
    from scipy.stats import binom, binomtest

    k = min(b, c)
    p_exact = min(1.0, float(binomtest(k, n, 0.5).pvalue))
    p_mid = min(1.0, 2.0 * float(binom.cdf(k, n, 0.5) - 0.5 * binom.pmf(k, n, 0.5)))
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

    Raises:
        ConfigError: the two sequences differ in length, ``n_bins < 1``, or a confidence outside [0, 1].
    """
    if len(confidences) != len(correct):
        raise ConfigError(f"{len(confidences)} confidences but {len(correct)} outcomes; they must pair up")
    if n_bins < 1:
        raise ConfigError(f"n_bins must be >= 1, got {n_bins}")
    import numpy as np

    conf = np.asarray(confidences, dtype=float).reshape(-1)
    bad = conf[~((conf >= 0.0) & (conf <= 1.0))]  # also catches NaN
    if bad.size:
        raise ConfigError(f"confidence {float(bad[0])!r} is not a probability in [0, 1]")
    index = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    counts = np.bincount(index, minlength=n_bins)
    conf_sums = np.bincount(index, weights=conf, minlength=n_bins)
    hits = np.bincount(index, weights=np.asarray(correct, dtype=bool).astype(float), minlength=n_bins)
    bins, ece, total = [], 0.0, len(conf)
    for i in range(n_bins):
        count = int(counts[i])
        mean_conf = float(conf_sums[i]) / count if count else None
        acc = float(hits[i]) / count if count else None
        bins.append(CalibrationBin(i / n_bins, (i + 1) / n_bins, count, mean_conf, acc))
        if count:
            ece += count / total * abs(acc - mean_conf)
    return (ece if total else None), bins


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) by ``numpy.percentile``'s default ``"linear"`` method; ``None`` when empty.

    Raises:
        ConfigError: ``q`` outside 0..100.
    """
    if not 0 <= q <= 100:
        raise ConfigError(f"percentile q must be in 0..100, got {q}")
    if len(values) == 0:
        return None
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q, method="linear"))


__all__ = ["CalibrationBin", "McNemarResult", "Z95", "calibration", "mcnemar", "percentile", "proportion",
           "wilson_interval"]
