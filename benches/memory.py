"""Untimed workloads that hold memory still and ask the tracker what it costs.

Each one calls ``probe()`` (from the active config) once before building its live set and
once while holding it, and returns both readings.  The parent turns them into

* tracker bytes per live tracked allocation, from ``Profiler.stats()`` (budget: 24 bytes),
  both as the tracker reports it and as the growth of ``tracker_bytes`` over the growth of
  ``tracked_allocations`` while the live set was built;
* tracker bytes per live (pending) task;
* the same per-object / per-task cost seen from outside, as extra RSS over a plain run.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping

__all__ = ["MEMORY_WORKLOADS", "MemoryWorkload", "live_objects", "live_tasks"]

Probe = Callable[[], dict[str, Any]]


async def live_objects(count: int, probe: Probe) -> dict[str, Any]:
    """Build ``count`` small strings (one allocation each, ~60 bytes) inside a task and
    probe while all of them are alive."""
    before = probe()
    keep = [f"obj-{i}" for i in range(count)]
    held = probe()
    alive = len(keep)
    del keep
    return {"before": before, "held": held, "count": alive}


async def _pending(gate: asyncio.Event) -> None:
    await gate.wait()


async def live_tasks(count: int, probe: Probe) -> dict[str, Any]:
    """Start ``count`` tasks that all block on one event, probe while they are pending,
    then release them."""
    before = probe()
    gate = asyncio.Event()
    tasks = [asyncio.create_task(_pending(gate)) for _ in range(count)]
    await asyncio.sleep(0)  # every task runs its first step and parks on the event
    held = probe()
    gate.set()
    await asyncio.gather(*tasks)
    return {"before": before, "held": held, "count": len(tasks)}


@dataclass(frozen=True)
class MemoryWorkload:
    name: str
    main: Callable[..., Awaitable[dict[str, Any]]]
    full: Mapping[str, Any]
    quick: Mapping[str, Any]
    description: str
    per: str  # what one unit of ``count`` is, for the table

    def params(self, quick: bool) -> dict[str, Any]:
        return dict(self.quick if quick else self.full)

    def describe(self, quick: bool) -> str:
        return self.description.format(**self.params(quick))


MEMORY_WORKLOADS: dict[str, MemoryWorkload] = {
    w.name: w
    for w in [
        MemoryWorkload(
            "mem-objects", live_objects, {"count": 1_000_000}, {"count": 100_000},
            "{count:,} small live strings held by one task", per="live object",
        ),
        MemoryWorkload(
            "mem-tasks", live_tasks, {"count": 100_000}, {"count": 10_000},
            "{count:,} pending tasks blocked on one asyncio.Event", per="live task",
        ),
    ]
}
