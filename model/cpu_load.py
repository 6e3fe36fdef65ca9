"""How much of this process's cores other work is using: what SPIN_THREADS=auto asks (model/runner.py).

Spinning ONNX Runtime threads make a lone row's step faster when the process has its cores to itself and slower
beside a busy process (bench/results/thread-policy-cpu.md), and which of the two holds changes while a service
runs. Linux counts every CPU's busy time in /proc/stat (steal included: time the hypervisor gave to someone else)
and this process's own in os.times(); their difference over a window, on the CPUs this process may run on, is the
other work, in cores. Reading both takes ~20 us, so a runner asks at most once a window.
"""

from __future__ import annotations

import os
import time
from typing import Callable

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01


def busy_seconds(cpus: set[int] | None = None, path: str = "/proc/stat") -> float:
    """CPU seconds the CPUs in `cpus` (default: this process's affinity) have spent busy since boot: user, nice,
    system, irq, softirq and steal (user includes guests); not idle or iowait."""
    if cpus is None:
        if not hasattr(os, "sched_getaffinity"):
            raise OSError("no CPU affinity to read on this system")
        cpus = os.sched_getaffinity(0)
    ticks = 0
    with open(path) as f:
        next(f)  # the all-CPU line
        for line in f:
            if not line.startswith("cpu"):
                break
            name, *fields = line.split()
            if int(name[3:]) in cpus:
                user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
                ticks += user + nice + system + irq + softirq + steal
    return ticks * TICK_S


def own_seconds() -> float:
    """CPU seconds this process has used (all its threads)."""
    t = os.times()
    return t.user + t.system


class OtherLoad:
    """`cores()`: the CPU time other work used on this process's CPUs over the latest window, in cores (0.0: the
    cores were ours or idle; 1.0: one core's worth went elsewhere), or None until a window has passed or where the
    counters cannot be read (not Linux). Sampled on a call at least `window_s` after the last sample. A call after a
    pause of more than two windows (a service between requests) starts a new window and keeps the value from
    before the pause: the average over the pause would count whatever ran while this process slept (on a machine
    that takes turns, the other process's whole turn) against the first half second of the new work."""

    def __init__(self, window_s: float = 0.5, busy: Callable[[], float] = busy_seconds,
                 own: Callable[[], float] = own_seconds, clock: Callable[[], float] = time.monotonic):
        self.window_s, self._busy, self._own, self._clock = window_s, busy, own, clock
        self._last: tuple[float, float, float] | None = None  # (time, busy, own) of the latest sample
        self._cores: float | None = None
        self._readable = True

    def cores(self) -> float | None:
        if not self._readable:
            return None
        now = self._clock()
        if self._last is not None and now - self._last[0] < self.window_s:
            return self._cores
        try:
            sample = (now, self._busy(), self._own())
        except (OSError, ValueError, StopIteration):  # no /proc/stat, or one in a shape not known here
            self._readable = False
            return None
        if self._last is not None and now - self._last[0] <= 2 * self.window_s:
            then, busy, own = self._last
            self._cores = max(0.0, (sample[1] - busy) - (sample[2] - own)) / (now - then)
        self._last = sample
        return self._cores
