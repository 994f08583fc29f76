"""bench/srcost.py's statistics: the median's interval, the pairing, the server's share.

The measurement itself runs in test_bench_smoke.py (section sr with real
servers); here synthetic runs pin the arithmetic the verdicts rest on.
"""

from __future__ import annotations

import math
import os
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import srcost  # noqa: E402 - bench/ is no package


def _binomial_below(n: int, k: int) -> float:
    return sum(math.comb(n, i) for i in range(k)) / 2**n


@pytest.mark.parametrize("n", [1, 2, 5, 6, 9, 16, 17, 40])
def test_median_interval_is_the_binomial_order_statistics(n: int) -> None:
    values = [float(i) for i in range(n)]  # each value its own rank, 0-based
    median, lo, hi = srcost.median_ci(list(reversed(values)))
    assert median == (n - 1) / 2
    k = 0  # the widest trim with P(Binomial(n, 1/2) < k) <= 2.5 %: [v(k), v(n-k+1)], 1-based
    while k < n // 2 and _binomial_below(n, k + 1) <= 0.025:
        k += 1
    assert (lo, hi) == ((k - 1, n - k) if k else (0, n - 1))
    assert k == 0 or 1 - 2 * _binomial_below(n, k) >= 0.95


def test_median_interval_of_sixteen_pairs() -> None:
    # P(Bin(16, 1/2) <= 3) = 697/65536 = 1.1 %, P(<= 4) = 3.8 %: ranks 4 and 13
    assert srcost.median_ci([float(i) for i in range(16)])[1:] == (3.0, 12.0)


def test_median_interval_of_few_values_is_the_whole_range() -> None:
    assert srcost.median_ci([3.0, 1.0, 2.0, 5.0, 4.0]) == (3.0, 1.0, 5.0)  # n=5: 2 x 1/32 > 5 %


def test_median_interval_covers_the_true_median_about_95_percent() -> None:
    rng = random.Random(7)
    hits = 0
    trials = 2000
    for _ in range(trials):
        _, lo, hi = srcost.median_ci([rng.gauss(1.0, 0.1) for _ in range(16)])
        hits += lo <= 1.0 <= hi
    assert 0.93 <= hits / trials <= 0.995


def test_each_pair_is_adjacent_and_alternates_which_side_goes_first() -> None:
    for n in range(4):
        order = srcost.round_order(n)
        assert sorted(order) == sorted(srcost.SERVERS) and len(order) == 4
        for a, b in srcost.PAIRS:
            assert abs(order.index(a) - order.index(b)) == 1
    firsts = {srcost.round_order(n).index("vhdblkd") < srcost.round_order(n).index("vhdblkd-simple")
              for n in range(2)}
    assert firsts == {True, False}


def _runs(iops: dict[str, list[float]], server_cpu: float = 0.5) -> dict[str, list[dict[str, float]]]:
    return {s: [{"iops": v, "ios": v * 2, "server_cpu": server_cpu * (1.2 if s == "vhdblkd" else 1.0),
                 "client_cpu": 0.25} for v in vs] for s, vs in iops.items()}


def test_summary_divides_ours_by_the_control_round_by_round() -> None:
    # The machine slows by half in round 2: every server alike, so the ratios do not move.
    iops = {"vhdblkd": [90.0, 45.0, 90.0], "vhdblkd-simple": [100.0, 50.0, 100.0],
            "nbdkit": [80.0, 40.0, 80.0], "nbdkit-simple": [100.0, 50.0, 100.0]}
    data = {"rounds": 3, "runtime_s": 2, "jobs": {"j": {"label": "rand read 4k QD1", "runs": _runs(iops)}}}
    (row,) = srcost.summary(data)
    assert row.ratio["vhdblkd"] == pytest.approx((0.9, 0.9, 0.9))
    assert row.ratio["nbdkit"] == pytest.approx((0.8, 0.8, 0.8))
    assert row.server_share == pytest.approx((0.9 / 0.8,) * 3)
    # CPU per request: total seconds over total requests, in microseconds
    cpu = row.cpu_us
    assert cpu["vhdblkd"]["server"] == pytest.approx(1e6 * 3 * 0.6 / (2 * 225))
    assert cpu["vhdblkd-simple"]["server"] == pytest.approx(1e6 * 3 * 0.5 / (2 * 250))
    (target,) = srcost.target_lines(data)
    label, value, met, spread, noisy = target
    assert "rand read 4k QD1" in label and met and value == pytest.approx(1.125) and not noisy
    table = srcost.table(data)
    assert table is not None
    _, head, ((label_cell, *cells),) = table
    assert len(cells) == len(head) - 1 and label_cell == "rand read 4k QD1"
    assert cells[2] == "1.125x (1.125-1.125)"  # the server's share, with its interval


def test_a_server_share_below_the_target_is_not_met() -> None:
    iops = {"vhdblkd": [80.0] * 6, "vhdblkd-simple": [100.0] * 6, "nbdkit": [100.0] * 6,
            "nbdkit-simple": [100.0] * 6}
    data = {"rounds": 6, "runtime_s": 2, "jobs": {"j": {"label": "x", "runs": _runs(iops)}}}
    ((_, value, met, _, noisy),) = srcost.target_lines(data)
    assert value == pytest.approx(0.8) and met is False and noisy is False


def test_client_cpu_is_fio_percentages_of_the_job_runtime() -> None:
    assert srcost.client_cpu_seconds({"usr_cpu": 10.0, "sys_cpu": 30.0, "job_runtime": 2000}) == pytest.approx(0.8)


def test_nothing_measured_renders_nothing() -> None:
    assert srcost.table(None) is None and srcost.target_lines({"jobs": {}}) == []


def test_cpu_seconds_of_this_process_grow_with_work() -> None:
    before = srcost.cpu_seconds(os.getpid())
    x = 0
    while srcost.cpu_seconds(os.getpid()) - before < 0.05:
        x += sum(range(1000))
    assert x > 0
