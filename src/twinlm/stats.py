"""The one statistics helper of `twinlm evaluate` and `twinlm ablate`: a named test, stated in every report.

Two models (or variants) run with the same seeds are compared seed by seed with a **paired t-test**
(scipy.stats.ttest_rel: the seed fixes the data order and the initialisation, so the per-seed differences
are what varies); runs with other seeds with **Welch's t-test** (ttest_ind, unequal variances). Every
comparison reports the mean difference, its 95% confidence interval, the p-value, the test and the number of
seeds; "no measurable difference" when p >= alpha (0.05 unless said otherwise), and "untested" when there
are too few seeds (fewer than 2 per side) or the per-seed differences of varying values happen to be equal. A quantity that does not vary with the seed (a parameter count,
FLOPs, the activation memory of a fixed input) has no test to run: its difference is **exact**, the same in
every seed, and decides by its sign.

    from twinlm.stats import compare, summarize
    gain = compare(checkpoint_scores, control_scores, paired=True)
    print(gain.describe("points", scale=100))
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import warnings
from collections.abc import Sequence

ALPHA = 0.05


@dataclasses.dataclass(frozen=True)
class Summary:
    """Mean and sample standard deviation of one quantity over seeds."""

    mean: float
    std: float
    n: int
    values: tuple[float, ...]


def summarize(values: Sequence[float]) -> Summary:
    values = tuple(float(v) for v in values)
    if not values:
        raise ValueError("summarize: no values")
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return Summary(statistics.fmean(values), std, len(values), values)


@dataclasses.dataclass(frozen=True)
class Comparison:
    """`a` - `b`: the mean difference, its 95% interval and the p-value of the named test."""

    test: str  # "paired t-test", "Welch's t-test", or "untested: <why>"
    difference: float
    low: float | None
    high: float | None
    p_value: float | None
    n_a: int
    n_b: int
    alpha: float = ALPHA
    exact: bool = False  # the same difference in every seed: no spread to test

    @property
    def tested(self) -> bool:
        return self.p_value is not None or self.exact

    @property
    def significant(self) -> bool:
        """p < alpha, or an exact difference other than 0 (never for an untested comparison)."""
        if self.exact:
            return self.difference != 0.0
        return self.p_value is not None and self.p_value < self.alpha

    @property
    def seeds(self) -> str:
        return f"{self.n_a} seeds" if self.n_a == self.n_b else f"{self.n_a} vs {self.n_b} seeds"

    def describe(self, unit: str = "", scale: float = 1.0, digits: int = 4) -> str:
        """'+3.37 points (95% CI [+1.6, +5.1]; paired t-test over 3 seeds, p = 0.017)'."""
        value = f"{self.difference * scale:+.{digits}g}{' ' + unit if unit else ''}"
        if self.exact:
            return f"{value} (exact: the same in each of the {self.seeds}, nothing to test)"
        if not self.tested:
            return f"{value} ({self.test}, {self.seeds})"
        level = f"{(1 - self.alpha) * 100:g}%"
        interval = f"{level} CI [{self.low * scale:+.{digits}g}, {self.high * scale:+.{digits}g}]"
        return f"{value} ({interval}; {self.test} over {self.seeds}, p = {self.p_value:.3g})"

    def verdict(self) -> str:
        """'significant at 0.05', 'no measurable difference at 0.05' or 'untested'."""
        if not self.tested:
            return "untested"
        if self.exact:
            return "exact difference" if self.significant else "no difference"
        return f"{'significant' if self.significant else 'no measurable difference'} at {self.alpha:g}"


def _flat(values: list[float]) -> bool:
    """No spread beyond floating-point rounding (a t-test of such values only measures the rounding)."""
    return statistics.pstdev(values) <= 1e-9 * max(1.0, max(abs(v) for v in values))


def compare(a: Sequence[float], b: Sequence[float], paired: bool = False, alpha: float = ALPHA) -> Comparison:
    """Is mean(a) - mean(b) different from 0? Paired t-test over matched seeds (`paired`, equal lengths),
    else Welch's t-test; untested with fewer than 2 values per side or no spread at all."""
    from scipy import stats as scipy_stats

    a, b = [float(v) for v in a], [float(v) for v in b]
    if paired and len(a) != len(b):
        raise ValueError(f"a paired comparison needs as many values on each side ({len(a)} vs {len(b)})")
    difference = statistics.fmean(a) - statistics.fmean(b)
    if min(len(a), len(b)) < 2:
        return Comparison("untested: one seed", difference, None, None, None, len(a), len(b), alpha)
    if _flat(a) and _flat(b):  # a quantity the seed does not change: its difference is exact
        size = max(1.0, abs(statistics.fmean(a)), abs(statistics.fmean(b)))
        difference = 0.0 if abs(difference) <= 1e-9 * size else difference  # rounding is no difference
        return Comparison(
            "exact", difference, difference, difference, None, len(a), len(b), alpha, exact=True
        )
    if paired and _flat([x - y for x, y in zip(a, b, strict=True)]):  # (chance, with few discrete scores)
        return Comparison(
            "untested: the per-seed differences do not vary",
            difference,
            None,
            None,
            None,
            len(a),
            len(b),
            alpha,
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # near-identical data: scipy warns, the test stands
        result = scipy_stats.ttest_rel(a, b) if paired else scipy_stats.ttest_ind(a, b, equal_var=False)
        interval = result.confidence_interval(1 - alpha)
    p_value = float(result.pvalue)
    if not math.isfinite(p_value):
        return Comparison(
            "untested: the test is undefined here", difference, None, None, None, len(a), len(b)
        )
    return Comparison(
        "paired t-test" if paired else "Welch's t-test",
        difference,
        float(interval.low),
        float(interval.high),
        p_value,
        len(a),
        len(b),
        alpha,
    )


def compare_summaries(
    a: tuple[float, float, int], b: tuple[float, float, int], alpha: float = ALPHA
) -> Comparison:
    """Welch's t-test of mean(a) - mean(b) from each side's (mean, sample std, count), for results whose
    values were not kept (the same test `compare` runs on the values, with Welch-Satterthwaite's degrees of
    freedom); untested with fewer than 2 values a side or no spread on either."""
    from scipy import stats as scipy_stats

    (mean_a, std_a, n_a), (mean_b, std_b, n_b) = a, b
    difference = float(mean_a) - float(mean_b)
    if min(n_a, n_b) < 2:
        return Comparison("untested: one seed", difference, None, None, None, n_a, n_b, alpha)
    var_a, var_b = float(std_a) ** 2 / n_a, float(std_b) ** 2 / n_b
    if var_a + var_b <= 0.0:
        return Comparison("untested: no spread on either side", difference, None, None, None, n_a, n_b, alpha)
    df = (var_a + var_b) ** 2 / (var_a**2 / (n_a - 1) + var_b**2 / (n_b - 1))
    error = math.sqrt(var_a + var_b)
    p_value = float(2 * scipy_stats.t.sf(abs(difference) / error, df))
    half = float(scipy_stats.t.ppf(1 - alpha / 2, df)) * error
    return Comparison(
        "Welch's t-test", difference, difference - half, difference + half, p_value, n_a, n_b, alpha
    )


__all__ = ["ALPHA", "Comparison", "Summary", "compare", "compare_summaries", "summarize"]
