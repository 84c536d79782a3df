"""Scale: 1,000,000 short tasks over a run with 100,000 alive at once, memory bounded.

The issue's numbers, run for real (about 30 s): the tracker's own memory must not grow with
the number of tasks a service has run, only with what is alive and what it keeps.
"""

from __future__ import annotations

import asyncio

import memscope_async as ms

ALIVE = 100_000
SHORT = 1_000_000
BATCH = 10_000


async def short(i: int) -> int:
    x = [i] * 8
    await asyncio.sleep(0)
    return len(x)


def test_a_million_tasks_with_a_hundred_thousand_alive():
    readings = []

    async def main():
        gate = asyncio.Event()

        async def held():
            await gate.wait()

        alive = [asyncio.create_task(held()) for _ in range(ALIVE)]
        await asyncio.sleep(0)
        total = 0
        for n in range(SHORT // BATCH):
            total += sum(await asyncio.gather(*(short(i) for i in range(BATCH))))
            if n + 1 in (SHORT // BATCH // 2, SHORT // BATCH):
                readings.append(prof.stats())
        gate.set()
        await asyncio.gather(*alive)
        return total

    prof = ms.Profiler(mode="exact").start()
    try:
        with asyncio.Runner(loop_factory=prof.loop_factory()) as runner:
            assert runner.run(main()) == SHORT * 8
    finally:
        prof.stop()
    report = prof.snapshot()
    prof.close()

    half, full = readings
    assert half["live_tasks"] >= ALIVE and full["live_tasks"] >= ALIVE
    # Bounded: the second 500,000 tasks cost the tracker (almost) nothing more.
    assert full["tracker_bytes"] <= half["tracker_bytes"] * 1.10 + (1 << 20), (half, full)
    # ~100,000 alive tasks fit in about 1 KiB each (measured ~750 B with their allocations).
    assert full["tracker_bytes"] < ALIVE * 1024 + (48 << 20), full
    # Every task is counted; finished ones beyond the limit are folded into their group.
    assert report.totals.tasks >= ALIVE + SHORT
    assert report.totals.folded_tasks >= SHORT - 20_000
    assert report.totals.tasks == len(report.tasks) + report.totals.folded_tasks
    (g,) = [g for g in report.groups if g.coro == "short"]
    assert g.tasks == SHORT
