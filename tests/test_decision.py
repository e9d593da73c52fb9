"""The rule that turns trials into a recommendation: intervals, paired differences, statuses."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from sweeper.decision import (
    REFERENCE,
    UNDECIDED,
    WITHIN,
    WORSE,
    Measurement,
    decide,
    mean_interval,
)

LR = (("optim.lr_head", 0.05),)


def ms(arm, values, setting=LR, start=0, images=500):
    """Measurements of ``arm``: one per repeat key (r, r) from ``start``."""
    return [Measurement(arm, setting, (start + i, start + i), v, images, 100 * arm + i)
            for i, v in enumerate(values)]


def test_mean_interval_is_students_t_and_a_wilson_interval_for_one_trial():
    values = [0.90, 0.92, 0.91, 0.93]
    iv = mean_interval(values, 0.95, 500)
    sd = stats.tstd(values)
    half = stats.t.ppf(0.975, 3) * sd / 2
    assert iv.kind == "t" and iv.n == 4
    assert iv.low == pytest.approx(0.915 - half) and iv.high == pytest.approx(0.915 + half)
    one = mean_interval([0.9], 0.95, 500)  # 450 of 500 val images right
    wilson = stats.binomtest(450, 500).proportion_ci(0.95, method="wilson")
    assert one.kind == "wilson"
    assert (one.low, one.high) == pytest.approx((wilson.low, wilson.high))


def test_cheapest_depth_within_tolerance_is_recommended_and_the_answer_settled():
    split = [0.0, 0.02, -0.01, 0.012]  # each repeat's split makes every depth easier or harder
    data = [*ms(0, [0.80 + e for e in split]),                       # far below: worse
            *ms(1, [0.925 + e for e in split]),                      # 1.5 points below: worse
            *ms(2, [0.938 + e + n for e, n in zip(split, [0, .002, -.002, 0], strict=True)]),
            *ms(3, [0.940 + e for e in split])]                      # the best
    d = decide(data, tolerance=1.0)
    status = {a: s.status for a, s in d.arms.items()}
    assert status == {0: WORSE, 1: WORSE, 2: WITHIN, 3: REFERENCE}
    assert d.reference == 3 and d.recommended == 2 and d.settled and not d.undecided
    # the difference is paired by repeat key: the shared split effect cancels
    diff = d.arms[2].diff
    assert diff.kind == "paired" and diff.n == 4
    assert diff.mean == pytest.approx(-0.002)
    assert diff.high - diff.low < 0.01  # the arms' own intervals are over three times as wide
    assert d.arms[2].interval.high - d.arms[2].interval.low > 0.03


def test_unpaired_repeats_do_not_settle_what_pairing_would():
    # the same numbers on different keys: Welch's interval, much wider
    three = [0.938, 0.958, 0.928, 0.950]  # the split moves both depths alike
    two = [0.936, 0.957, 0.925, 0.948]
    paired = decide([*ms(2, two), *ms(3, three)])
    apart = decide([*ms(2, two, start=10), *ms(3, three)])
    assert paired.arms[2].status == WITHIN and paired.recommended == 2
    assert apart.arms[2].diff.kind == "welch"
    assert apart.arms[2].status == UNDECIDED and apart.recommended == 3
    assert not apart.settled and apart.undecided == [2]
    assert apart.arms[2].more is not None and apart.arms[2].more >= 1


def test_undecided_depth_says_how_many_repeats_would_settle_it():
    d = decide([*ms(2, [0.930, 0.925, 0.936]), *ms(3, [0.940, 0.937, 0.945])])
    s = d.arms[2]
    assert s.status == UNDECIDED and d.recommended == 3 and d.undecided == [2]
    # more = smallest n with t(n-1) * sd / sqrt(n) below |mean + tolerance|, less the pairs run
    sd = max(stats.tstd([0.930 - 0.940, 0.925 - 0.937, 0.936 - 0.945]), 1 / 500)  # one image
    gap = abs(s.diff.mean + 0.01)
    n = next(n for n in range(2, 500) if stats.t.ppf(0.95, n - 1) * sd / math.sqrt(n) < gap)
    assert s.more == n - 3


def test_setting_is_the_best_on_the_search_key_and_repeats_are_its_measurements():
    other = (("optim.lr_head", 0.2),)
    data = [Measurement(4, LR, (0, 0), 0.90, 500, 0),         # the search key: first trial's
            Measurement(4, other, (0, 0), 0.93, 500, 1),      # better: the chosen setting
            Measurement(4, other, (1, 1), 0.92, 500, 2),      # its repeat
            Measurement(4, LR, (1, 1), 0.99, 500, 3),         # the other setting: not counted
            Measurement(4, other, (2, 2), None, 500, 4)]      # failed: no measurement
    s = decide(data).arms[4]
    assert s.setting == other and s.values == {(0, 0): 0.93, (1, 1): 0.92}


def test_single_trials_compare_by_their_binomial_errors():
    d = decide([Measurement(0, LR, (0, 0), 0.80, 500, 0),
                Measurement(5, LR, (0, 0), 0.95, 500, 1),
                Measurement(4, LR, (0, 0), 0.945, 500, 2)])
    assert d.arms[0].status == WORSE and d.arms[0].diff.kind == "binomial"
    assert d.arms[4].status == UNDECIDED  # half a point apart: one trial each cannot tell
    assert d.recommended == 5 and d.undecided == [4]
