"""loadtests/steal.py: the share of the machine's CPU time the hypervisor took, from /proc/stat."""

from __future__ import annotations

import pytest

from loadtests.steal import cpu_ticks, steal_share

#                user nice system idle iowait irq softirq steal guest guest_nice
BEFORE = "cpu  1000 10 200 5000 40 0 50 100 300 0\ncpu0 ...\n"
AFTER = "cpu  1600 10 300 5400 40 0 50 400 500 0\ncpu0 ...\n"


def test_ticks_are_steal_and_all_eight_counted_fields(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text(BEFORE)
    # guest time is inside user and nice already: counted once
    assert cpu_ticks(stat) == (100, 1000 + 10 + 200 + 5000 + 40 + 0 + 50 + 100)


def test_share_is_stolen_ticks_over_all_ticks_between_two_readings(tmp_path):
    before, after = tmp_path / "before", tmp_path / "after"
    before.write_text(BEFORE)
    after.write_text(AFTER)
    # 600 user + 100 system + 400 idle + 300 steal = 1,400 ticks, 300 of them stolen
    assert steal_share(cpu_ticks(before), cpu_ticks(after)) == pytest.approx(300 / 1400)


def test_unknown_without_a_reading_or_without_time_passing(tmp_path):
    assert cpu_ticks(tmp_path / "missing") is None
    old_kernel = tmp_path / "old"
    old_kernel.write_text("cpu  1000 10 200 5000\n")
    assert cpu_ticks(old_kernel) is None
    assert steal_share(None, (1, 10)) is None
    assert steal_share((1, 10), (1, 10)) is None


def test_this_machine_reads_a_share_between_zero_and_one():
    first = cpu_ticks()
    sum(i * i for i in range(200_000))  # let some ticks pass
    second = cpu_ticks()
    assert first is not None and second is not None and second[1] >= first[1]
    share = steal_share(first, second)
    assert share is None or 0.0 <= share <= 1.0
