"""model/cpu_load.py: the other work on this process's cores, which SPIN_THREADS=auto asks about."""

import subprocess
import sys
import time

import pytest

from model.cpu_load import TICK_S, OtherLoad, busy_seconds, own_seconds

STAT = """cpu  500 0 100 9000 10 0 5 20 0 0
cpu0 100 0 50 4000 5 0 1 10 0 0
cpu1 400 0 50 5000 5 0 4 10 0 0
intr 123 0 0
ctxt 456
"""


def test_busy_seconds_counts_busy_time_and_steal_of_the_cpus_asked_for(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text(STAT)
    # user, system, softirq and steal ticks (USER_HZ); not idle or iowait
    assert busy_seconds({0}, str(stat)) == pytest.approx(TICK_S * (100 + 50 + 1 + 10))
    assert busy_seconds({1}, str(stat)) == pytest.approx(TICK_S * (400 + 50 + 4 + 10))
    assert busy_seconds({0, 1}, str(stat)) == pytest.approx(TICK_S * 625)
    assert busy_seconds({5}, str(stat)) == 0


def test_other_load_is_the_busy_time_less_our_own_over_each_window():
    clock, busy, own = [0.0], [10.0], [3.0]
    load = OtherLoad(0.5, busy=lambda: busy[0], own=lambda: own[0], clock=lambda: clock[0])
    assert load.cores() is None  # the first sample: no window yet
    clock[0], busy[0], own[0] = 0.3, 11.0, 3.5
    assert load.cores() is None  # within the window: not sampled again
    clock[0] = 0.5
    assert load.cores() == pytest.approx(((11.0 - 10.0) - (3.5 - 3.0)) / 0.5)  # one core's worth went elsewhere
    clock[0], busy[0], own[0] = 1.0, 11.8, 4.3
    assert load.cores() == pytest.approx(0.0)  # all of it ours
    clock[0], busy[0], own[0] = 11.0, 30.8, 4.3
    assert load.cores() == pytest.approx(0.0)  # after a pause: a new window, the value from before it
    clock[0], busy[0], own[0] = 11.5, 31.3, 4.8
    assert load.cores() == pytest.approx(0.0)
    clock[0], busy[0], own[0] = 12.0, 32.3, 5.3
    assert load.cores() == pytest.approx(1.0)


def test_other_load_is_none_where_the_counters_cannot_be_read():
    calls = []

    def missing():
        calls.append(1)
        raise FileNotFoundError("/proc/stat")

    load = OtherLoad(0.0, busy=missing)
    assert load.cores() is None and load.cores() is None and len(calls) == 1  # tried once, not on every step


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's /proc/stat")
def test_other_load_sees_another_process_and_not_this_one():
    """A busy loop in a child process counts (about a core); the same loop in this process does not."""
    load = OtherLoad(0.4)  # every gap below: one window or a little more, never a pause
    assert busy_seconds() > 0 and own_seconds() > 0
    load.cores()
    time.sleep(0.5)
    before = load.cores()
    if before > 0.3:
        pytest.skip(f"other work already uses {before:.2f} cores here: a busy loop's share cannot be told apart")
    end = time.monotonic() + 0.7
    while time.monotonic() < end:  # this process busy
        pass
    ours = load.cores()
    spin = "import time\nend = time.time() + 1.5\nwhile time.time() < end: pass"
    child = subprocess.Popen([sys.executable, "-c", spin])
    try:
        time.sleep(0.4)  # its start-up
        load.cores()
        time.sleep(0.7)
        theirs = load.cores()
    finally:
        child.wait(timeout=30)
    assert ours < 0.5 and theirs > 0.5, (ours, theirs)
