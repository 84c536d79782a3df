"""A task's end is recorded whatever way it ends and whoever watches it.

On 3.12+ the end of an ``asyncio.Task`` is seen when its last step leaves asyncio's
running-task dict (no done callback); subclasses and 3.11 get a done callback.  Both must
give the same state, finish time and name, including for tasks nobody awaits or adds a
callback to, and for eager tasks that finish inside ``create_task``.
"""

from __future__ import annotations

import asyncio
import gc
import sys

import pytest

from conftest import run_profiled

needs_eager = pytest.mark.skipif(sys.version_info < (3, 12), reason="eager tasks are 3.12+")


async def ok():
    await asyncio.sleep(0)
    return 1


async def at_once():
    return 2


async def boom():
    await asyncio.sleep(0)
    raise ValueError("boom")


async def forever():
    await asyncio.sleep(3600)


class MyTask(asyncio.Task):
    pass


def by_name(report):
    return {t.name: t for t in report.tasks}


def test_states_without_callbacks(loop_kind):
    async def main():
        # nobody adds a callback to these before they end: awaited only once done
        plain = asyncio.create_task(ok(), name="plain")
        failed = asyncio.create_task(boom(), name="failed")
        cancelled = asyncio.create_task(forever(), name="cancelled")
        asyncio.create_task(ok(), name="dropped")  # noqa: RUF006 - ends unreferenced
        await asyncio.sleep(0.01)
        cancelled.cancel()
        await asyncio.sleep(0.01)
        assert plain.done() and failed.done() and cancelled.done()
        await plain
        with pytest.raises(ValueError):
            await failed
        sub = MyTask(ok(), name="subclass")
        await sub
        # still pending when main returns: asyncio.Runner cancels it on the way out
        asyncio.create_task(forever(), name="left")  # noqa: RUF006
        await asyncio.sleep(0)

    _, report = run_profiled(main, loop_kind)
    t = by_name(report)
    assert t["plain"].state == "done"
    assert t["dropped"].state == "done"
    assert t["failed"].state == "failed"
    assert t["cancelled"].state == "cancelled"
    assert t["subclass"].state == "done"
    assert t["left"].state == "cancelled"
    for name in ("plain", "dropped", "failed", "cancelled", "subclass", "left"):
        task = t[name]
        assert task.finished_at is not None and task.finished_at >= task.created_at, name
    # ended in the first loop turns, not when the program did
    assert t["plain"].finished_at < t["subclass"].created_at


def test_gather_and_taskgroup_children_end(loop_kind):
    async def main():
        await asyncio.gather(ok(), boom(), return_exceptions=True)
        async with asyncio.TaskGroup() as tg:
            for i in range(3):
                tg.create_task(ok(), name=f"tg-{i}")

    _, report = run_profiled(main, loop_kind)
    states = sorted(t.state for t in report.find(coro="ok")) + [t.state for t in report.find(coro="boom")]
    assert states == ["done"] * 4 + ["failed"]
    assert {t.name for t in report.find(coro="ok")} >= {"tg-0", "tg-1", "tg-2"}


@needs_eager
def test_eager_tasks_keep_their_names(loop_kind):
    if loop_kind == "uvloop" and sys.version_info >= (3, 13):
        pytest.skip("uvloop passes eager_start= to task factories on 3.13, which "
                    "asyncio.eager_task_factory does not accept (fails without the profiler too)")
    async def main():
        loop = asyncio.get_running_loop()
        loop.set_task_factory(asyncio.eager_task_factory)
        kept = asyncio.create_task(at_once(), name="eager-kept")
        asyncio.create_task(at_once(), name="eager-dropped")  # noqa: RUF006 - freed at once
        gc.collect()
        later = asyncio.create_task(ok(), name="eager-later")
        await later
        loop.set_task_factory(None)
        return kept.result()

    result, report = run_profiled(main, loop_kind)
    assert result == 2
    t = by_name(report)
    for name in ("eager-kept", "eager-dropped", "eager-later"):
        assert name in t, sorted(t)
        assert t[name].state == "done" and t[name].finished_at is not None
