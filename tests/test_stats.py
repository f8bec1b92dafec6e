"""twinlm.stats: the named tests evaluate and ablate report (scipy's t-tests, with their intervals)."""

from __future__ import annotations

import pytest

from twinlm.stats import compare, compare_summaries, summarize


def test_paired_t_test_matches_scipy_and_its_interval():
    result = compare([1.0, 2.0, 3.5], [0.5, 1.2, 3.0], paired=True)
    assert result.test == "paired t-test" and result.difference == pytest.approx(0.6)
    assert result.p_value == pytest.approx(0.0266715, rel=1e-5)  # t = 6 with 2 degrees of freedom
    assert (result.low, result.high) == pytest.approx((0.1697347, 1.0302653), rel=1e-6)
    assert result.significant and result.verdict() == "significant at 0.05"
    assert "paired t-test over 3 seeds, p = 0.0267" in result.describe()


def test_welch_t_test_for_unpaired_runs():
    result = compare([1.0, 2.0, 3.5], [0.5, 1.2, 3.0])
    assert result.test == "Welch's t-test" and result.p_value == pytest.approx(0.595024, rel=1e-5)
    assert not result.significant and result.verdict() == "no measurable difference at 0.05"
    assert result.low < 0 < result.high


def test_welch_from_means_and_stds_is_the_test_on_the_values():
    a, b = [0.84, 0.835, 0.85], [0.80, 0.81, 0.795]
    on_values = compare(a, b)
    sa, sb = summarize(a), summarize(b)
    on_summaries = compare_summaries((sa.mean, sa.std, sa.n), (sb.mean, sb.std, sb.n))
    assert on_summaries.test == on_values.test == "Welch's t-test"
    for field in ("difference", "low", "high", "p_value"):
        assert getattr(on_summaries, field) == pytest.approx(getattr(on_values, field), rel=1e-9), field
    assert compare_summaries((0.8, 0.0, 3), (0.7, 0.0, 3)).test == "untested: no spread on either side"
    assert compare_summaries((0.8, 0.01, 1), (0.7, 0.01, 3)).p_value is None


def test_untested_with_one_seed_or_no_spread():
    one = compare([0.8], [0.7])
    assert one.test == "untested: one seed" and not one.significant and one.p_value is None
    assert one.describe("points", scale=100).startswith("+10 points (untested: one seed")
    flat = compare([0.8, 0.9], [0.7, 0.8], paired=True)  # the same difference on both seeds, by chance
    assert flat.test.startswith("untested") and flat.verdict() == "untested"
    # a quantity the seed does not change (parameters, FLOPs, the memory of a fixed input): exact, decided by sign
    exact = compare([67.9, 67.9, 67.9], [194.8, 194.8, 194.8], paired=True)
    assert exact.exact and exact.tested and exact.significant and exact.verdict() == "exact difference"
    assert exact.difference == pytest.approx(-126.9) and exact.p_value is None
    assert exact.describe("MB") == "-126.9 MB (exact: the same in each of the 3 seeds, nothing to test)"
    same = compare([5.0, 5.0], [5.0 + 1e-12, 5.0 + 1e-12])
    assert (
        same.exact and not same.significant and same.difference == 0.0 and same.verdict() == "no difference"
    )
    with pytest.raises(ValueError, match="as many values"):
        compare([1.0, 2.0], [1.0], paired=True)


def test_summary():
    summary = summarize([1.0, 2.0, 3.0])
    assert (summary.mean, summary.std, summary.n, summary.values) == (2.0, 1.0, 3, (1.0, 2.0, 3.0))
    assert summarize([4.0]).std == 0.0
