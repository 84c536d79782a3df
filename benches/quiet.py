"""Is anything else using the CPU while we measure?

On a 2-core machine one test run started by someone else halves what a benchmark gets.
We cannot stop it, but we can see it: the CPU time the whole machine used during a
measurement (``/proc/stat``), minus what our own processes used (``getrusage``), is what
other processes took.  The runner waits for a quiet machine before each measurement and
repeats a measurement during which others used more than a threshold.

Units: CPU seconds, and "cores" = CPU seconds per wall second.  Linux only; elsewhere every
reading is 0 (never noisy).
"""

from __future__ import annotations

import os
import resource
import time
from typing import Callable

__all__ = ["OtherLoad", "others_cores_now", "wait_for_quiet"]

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _machine_busy_s() -> float:
    """CPU seconds all CPUs spent running anything since boot: user, nice, system and steal.
    Interrupt and softirq time are left out: loopback traffic is processed there, and that
    is the server workload's own work, not someone else's."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, _irq, _softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + steal) / _TICK


def _ours_s() -> float:
    """CPU seconds used by this process and its waited-for children."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class OtherLoad:
    """Measures what other processes used between ``start()`` and ``stop()``.

    Our children count as ours only once they have been waited for, so call ``stop()``
    after the child has exited and been reaped (``subprocess.run`` does both)."""

    def start(self) -> None:
        self._t, self._busy, self._ours = time.perf_counter(), _machine_busy_s(), _ours_s()

    def stop(self) -> float:
        """Average number of cores other processes kept busy (0.0 = none)."""
        wall = time.perf_counter() - self._t
        others = (_machine_busy_s() - self._busy) - (_ours_s() - self._ours)
        return max(0.0, others / wall) if wall > 0 else 0.0


def others_cores_now(sample_s: float = 0.5) -> float:
    """Cores other processes are using, averaged over ``sample_s`` seconds."""
    load = OtherLoad()
    load.start()
    time.sleep(sample_s)
    return load.stop()


def wait_for_quiet(threshold: float, max_wait_s: float, say: Callable[[str], None]) -> float:
    """Return at once if other processes use less than ``threshold`` cores (one 0.3 s
    sample); otherwise block until they do for two 2-second samples in a row, or until
    ``max_wait_s`` seconds have passed.  Returns the seconds waited."""
    t0 = time.perf_counter()
    used = others_cores_now(0.3)
    if used < threshold:
        return time.perf_counter() - t0
    say(f"other processes use {used:.2f} cores: waiting for a quiet machine (up to {max_wait_s:.0f} s)")
    calm = 0
    while calm < 2:
        if time.perf_counter() - t0 >= max_wait_s:
            say(f"machine still busy after {max_wait_s:.0f} s (others use {used:.2f} cores): measuring anyway")
            return time.perf_counter() - t0
        used = others_cores_now(2.0)
        calm = calm + 1 if used < threshold else 0
    waited = time.perf_counter() - t0
    say(f"quiet again after {waited:.0f} s")
    return waited
