"""A task's end is recorded whatever way it ends and whoever watches it.

On 3.12+ the end of an ``asyncio.Task`` is seen when its last step leaves asyncio's
running-task dict (no done callback); subclasses and 3.11 get a done callback.  Both must
give the same state, finish time and name, including for tasks nobody awaits or adds a
callback to, and for eager tasks that finish inside ``create_task``.
"""

from __future__ import annotations

import asyncio
import gc
import re
import sys
from collections import Counter

import pytest

import memscope_async as ms
from conftest import base_loop, run_profiled
from memscope_async.attribution import _core

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


@pytest.mark.parametrize("learnt", [False, True], ids=["few-tasks", "after-many-tasks"])
def test_states_without_callbacks(loop_kind, learnt):
    async def main():
        if learnt:
            # Enough tasks, pending and finished, for the core to learn where a C Task
            # keeps its state (3.12+, where the running-task watcher reads it), and to
            # read it from there for the tasks below.
            await asyncio.gather(*(ok() for _ in range(64)))
            await asyncio.gather(*(at_once() for _ in range(64)))
            if sys.version_info >= (3, 12):
                assert _core.task_layout()["state_offset"] > 0
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
        loop.create_task(at_once(), name="eager-loop-named")  # the name reaches the factory
        gc.collect()
        later = asyncio.create_task(ok(), name="eager-later")
        await later
        loop.set_task_factory(None)
        return kept.result()

    result, report = run_profiled(main, loop_kind)
    assert result == 2
    t = by_name(report)
    for name in ("eager-kept", "eager-dropped", "eager-loop-named", "eager-later"):
        assert name in t, sorted(t)
        assert t[name].state == "done" and t[name].finished_at is not None


@needs_eager
def test_eager_tasks_finished_at_once_get_the_names_their_makers_give(loop_kind):
    # Tasks that end inside create_task: 3.12's asyncio.create_task and
    # TaskGroup.create_task name them only after the loop made them (with a str, a value
    # that becomes its str, or no name at all), and code of a user's own may do the same.
    if loop_kind == "uvloop" and sys.version_info >= (3, 13):
        pytest.skip("uvloop passes eager_start= to task factories on 3.13, which "
                    "asyncio.eager_task_factory does not accept (fails without the profiler too)")

    def make_then_name(loop, name):
        t = loop.create_task(at_once())
        t.set_name(name)
        return t

    def ensure_then_name(name):
        t = asyncio.ensure_future(at_once())
        t.set_name(name)
        return t

    async def main():
        loop = asyncio.get_running_loop()
        loop.set_task_factory(asyncio.eager_task_factory)
        made = []
        async with asyncio.TaskGroup() as tg:
            made += [tg.create_task(at_once(), name=f"tg-{i}") for i in range(3)]
            made.append(tg.create_task(at_once(), name=7))
            made.append(tg.create_task(at_once()))
        made += [asyncio.create_task(at_once(), name="ct"), asyncio.create_task(at_once())]
        made.append(make_then_name(loop, "by-hand"))
        made.append(ensure_then_name("ensured"))
        gathered = asyncio.gather(at_once(), at_once())
        made += gathered._children
        await gathered
        loop.set_task_factory(None)
        return [t.get_name() for t in made]

    names, report = run_profiled(main, loop_kind)
    assert names[:4] == ["tg-0", "tg-1", "tg-2", "7"] and names[5] == "ct" and names[7:9] == ["by-hand", "ensured"]
    # (3.13.0-3.13.2 name an unnamed task "None" when a task factory is installed)
    assert all(names[i].startswith("Task-") or names[i] == "None" for i in (4, 6, 9, 10)), names
    got = report.find(coro="at_once")
    assert all(t.state == "done" and t.finished_at is not None for t in got)
    reported = sorted(t.name for t in got)
    if sys.version_info >= (3, 13):
        # asyncio names its tasks through the loop there, and a name that the program's
        # own code gives a task after it has ended is not seen
        assert len(reported) == len(names)
        names = [n for n in names if n not in ("by-hand", "ensured")]
        assert not Counter(names) - Counter(reported), (reported, names)
    else:
        assert reported == sorted(names), names


@needs_eager
def test_eager_tasks_named_when_the_factory_has_returned_keep_those_names(loop_kind):
    # uvloop's create_task names a task only once the task factory has returned it, and
    # the end of a Task subclass is seen through a done callback: a task that ended inside
    # the factory must still be reported (and found) under the name its maker gives it.
    class MyTask(asyncio.Task):
        pass

    def factory(loop, coro, **kwargs):
        kwargs["eager_start"] = True
        return MyTask(coro, loop=loop, **kwargs)

    async def main():
        loop = asyncio.get_running_loop()
        made = []
        loop.set_task_factory(factory)
        made.append(loop.create_task(at_once(), name="sub-loop"))
        made.append(asyncio.create_task(at_once(), name="sub-asyncio"))
        async with asyncio.TaskGroup() as tg:
            made.append(tg.create_task(at_once(), name="sub-group"))
        loop.set_task_factory(None)
        if loop_kind == "uvloop" and sys.version_info >= (3, 13):
            made.append(loop.create_task(at_once(), name="uv-eager", eager_start=True))
        assert all(t.done() for t in made)
        snapshot = ms.current_profiler().snapshot()  # found by the task object, as named now
        return [(t.get_name(), snapshot.task(t).name) for t in made]

    pairs, report = run_profiled(main, loop_kind)
    assert all(given == reported for given, reported in pairs), pairs
    assert len(pairs) == (4 if loop_kind == "uvloop" and sys.version_info >= (3, 13) else 3)
    for given, _ in pairs:
        assert [t.state for t in report.find(name=given)] == ["done"], given


async def hang():
    await asyncio.get_running_loop().create_future()  # never completes


def test_records_of_destroyed_tasks_do_not_take_other_tasks_ends():
    # Tasks destroyed while pending leave their addresses behind; other tasks reusing
    # them (on a loop we do not instrument, or built directly on ours) must not end
    # those records with their own name and state.
    import logging

    import memscope_async as ms

    async def main():
        for i in range(50):
            asyncio.create_task(hang(), name=f"hung-{i}")  # noqa: RUF006 - dropped on purpose
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    async def others(loop):
        tasks = [loop.create_task(at_once(), name=f"other-{i}") for i in range(200)]
        if sys.version_info >= (3, 12):
            tasks += [asyncio.Task(at_once(), loop=loop, name=f"direct-{i}", eager_start=True) for i in range(200)]
            # ended inside create_task: never looked up by address, yet the hung tasks'
            # records at the addresses they take must stay as they are
            loop.set_task_factory(asyncio.eager_task_factory)
            tasks += [asyncio.create_task(at_once(), name=f"other-eager-{i}") for i in range(200)]
            loop.set_task_factory(None)
        await asyncio.gather(*tasks)

    prof = ms.Profiler().start()
    logging.disable(logging.CRITICAL)  # "Task was destroyed but it is pending!"
    try:
        loop = prof.loop_factory()()
        loop.run_until_complete(main())
        loop.close()
        del loop
        gc.collect()
        plain = asyncio.new_event_loop()
        plain.run_until_complete(others(plain))
        plain.close()
        mine = prof.loop_factory()()
        mine.run_until_complete(others(mine))
        mine.close()
    finally:
        logging.disable(logging.NOTSET)
        prof.stop()
    report = prof.snapshot()
    prof.close()
    hung = report.find(coro="hang")
    assert len(hung) == 50
    assert all(t.state == "pending" and not (t.name or "").startswith(("other", "direct")) for t in hung), [
        (t.name, t.state) for t in hung if t.state != "pending"
    ][:5]


def test_a_task_destroyed_while_pending_keeps_its_name(loop_kind):
    """A task dropped while pending and collected is ended by its finalizer's report to the
    loop's exception handler, while it can still be read: it keeps its name (it had none:
    its end was found only later, with the object gone).  The program's own handler still
    gets the report."""
    seen = []

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: seen.append(ctx["message"]))
        asyncio.create_task(hang(), name="stuck")  # noqa: RUF006 - dropped on purpose
        asyncio.create_task(hang())  # noqa: RUF006 - and one with a default name
        await asyncio.sleep(0)
        gc.collect()
        await asyncio.sleep(0)

    _, report = run_profiled(main, loop_kind)
    assert seen == ["Task was destroyed but it is pending!"] * 2
    hung = sorted(report.find(coro="hang"), key=lambda t: t.id)
    assert [t.state for t in hung] == ["pending", "pending"]
    assert hung[0].name == "stuck"
    assert re.fullmatch(r"Task-\d+", hung[1].name or ""), hung[1].name
    assert report.find(name="stuck") == [hung[0]]


def test_ending_destroyed_pending_tasks_leaks_no_reference(loop_kind):
    """Each report of a task destroyed while pending went through our handler with one
    reference to None too many (3.11, where None is not immortal): a long-lived program
    that drops pending tasks would have run None's count up to an overflow."""
    import sys

    deltas = []

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: None)
        before = sys.getrefcount(None)
        for _ in range(500):
            asyncio.create_task(hang())  # noqa: RUF006 - dropped on purpose
            await asyncio.sleep(0)
        gc.collect()
        await asyncio.sleep(0)
        deltas.append(sys.getrefcount(None) - before)

    _, report = run_profiled(main, loop_kind)
    assert len(report.find(coro="hang")) == 500
    assert deltas[0] < 100, deltas  # before the fix: 500 more


def test_tasks_sharing_one_context_all_end(loop_kind):
    import contextvars

    async def main():
        ctx = contextvars.copy_context()
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(ok(), name=f"shared-{i}", context=ctx) for i in range(3)]
        await asyncio.sleep(0.01)  # they end before anyone awaits them
        await asyncio.gather(*tasks)

    _, report = run_profiled(main, loop_kind)
    shared = [t for t in report.tasks if (t.name or "").startswith("shared-")]
    assert len(shared) == 3
    assert all(t.state == "done" and t.finished_at is not None for t in shared), shared


def test_state_offset_is_known_before_any_task_finishes():
    # A program that makes its tasks breadth first (a gather tree) finishes none before
    # the last is made: the offset is learnt from Futures of the loop when it is
    # instrumented, and the first pending tasks confirm it (3.11: the first ends).  Then
    # every end still gets its state.  Run apart: what the core has learnt is the process's.
    import subprocess
    import textwrap

    prog = textwrap.dedent("""
        import asyncio
        import sys
        import memscope_async as ms
        from memscope_async.attribution import _core

        async def wait(ev, fail):
            await ev.wait()
            if fail:
                raise ValueError(fail)

        async def main():
            ev = asyncio.Event()
            tasks = [asyncio.create_task(wait(ev, i % 3 == 0), name=f"w{i}") for i in range(20)]
            await asyncio.sleep(0)
            known = _core.task_layout()["state_offset"]
            tasks[1].cancel()
            ev.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            # 3.11 reads a state only when a task ends (no watcher sees its steps): the
            # Futures settle where it is and the first ends confirm it
            return known if sys.version_info >= (3, 12) else _core.task_layout()["state_offset"]

        profiler = ms.install_policy()
        known = asyncio.run(main())
        report = profiler.snapshot()
        ms.uninstall_policy()
        states = {t.name: t.state for t in report.tasks if t.name and t.name.startswith("w")}
        print(known > 0, states["w0"], states["w1"], states["w2"], len(states))
    """)
    proc = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["True", "failed", "cancelled", "done", "20"]


def test_configure_skips_entries_that_name_no_maker():
    # _core.configure's table of asyncio's task makers: an entry it cannot use (no code
    # object, an unknown kind, no `name` argument) is left out, not kept half-made.  Run
    # apart: the table is the process's.
    import subprocess
    import textwrap

    prog = textwrap.dedent("""
        import asyncio
        from memscope_async.loop_hooks import tagging
        from memscope_async.attribution import _core

        def no_name(coro):
            return coro

        _core.configure(tagging._LABELS, asyncio.Task, (
            (object(), "name"), (asyncio.tasks.create_task, "sometimes"), (no_name, "name"), "junk",
        ))
        _core.configure(tagging._LABELS, asyncio.Task, (
            (asyncio.tasks.create_task, "name"), (asyncio.TaskGroup.create_task, "name"),
            (asyncio.tasks.ensure_future, "through"), (asyncio.tasks.gather, "never"),
        ))
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stderr[-2000:])


@needs_eager
def test_a_task_made_with_the_context_of_one_being_made_takes_its_own_bytes():
    # A task factory that makes a second task with the context it was handed, then the
    # task itself, eagerly: the context's tag is the second task's by then, and memory the
    # first one's eager step allocates must not go to a task made in that step (which
    # allocated nothing) through a tag that was recycled meanwhile.
    keep = []

    async def second():
        await asyncio.sleep(0)

    async def child():
        return 1

    async def first():
        await asyncio.create_task(child(), name="child")
        keep.append(bytearray(4 * 1024 * 1024))
        await asyncio.sleep(0)

    def factory(loop, coro, context=None, **kw):
        if getattr(coro, "__name__", "") == "first":
            loop.create_task(second(), context=context)
        return asyncio.Task(coro, loop=loop, context=context, eager_start=True, **kw)

    async def main():
        asyncio.get_running_loop().set_task_factory(factory)
        t = asyncio.get_running_loop().create_task(first())
        await t
        await asyncio.sleep(0.01)

    _, report = run_profiled(main)
    (c,) = report.find(name="child")
    assert c.live_bytes < 64 * 1024, c
    keep.clear()


def test_tasks_running_when_the_profiler_stops_keep_their_names(loop_kind):
    """A report made after stop() names the tasks that were still running then (the CLI
    and @profile report after stopping): their names were looked up only on loops still
    instrumented, so they came out null."""
    import memscope_async as ms

    seen = {}

    async def body(prof):
        sleeper = asyncio.create_task(asyncio.sleep(10), name="sleeper")
        await asyncio.sleep(0)
        prof.stop()
        report = prof.snapshot()
        sleeper.cancel()
        seen["names"] = {t.coro: (t.name, t.state) for t in report.tasks}
        seen["me"] = report.task(asyncio.current_task())

    prof = ms.Profiler().start()
    try:
        with asyncio.Runner(loop_factory=prof.loop_factory(base_loop(loop_kind))) as runner:
            runner.run(body(prof))
    finally:
        prof.close()
    assert seen["names"]["sleep"] == ("sleeper", "pending")
    assert seen["me"].state == "pending" and re.fullmatch(r"Task-\d+", seen["me"].name or ""), seen["me"]


def test_tasks_that_end_after_the_profiler_stopped_stay_pending_in_its_report(loop_kind):
    """Its report is of the run it profiled: a task still running at stop() stays pending
    there, with no finish time, whenever the report is made (on 3.11 and for subclasses,
    our done callback outlives the profiler and ran its end into the report)."""
    import memscope_async as ms

    class Sub(asyncio.Task):
        pass

    async def main():
        loop = asyncio.get_running_loop()
        plain = asyncio.create_task(asyncio.sleep(0.01), name="plain")
        sub = Sub(asyncio.sleep(0.01), loop=loop, name="sub")
        await asyncio.sleep(0)
        prof.stop()
        await asyncio.gather(plain, sub)

    prof = ms.Profiler().start()
    try:
        with asyncio.Runner(loop_factory=prof.loop_factory(base_loop(loop_kind))) as runner:
            runner.run(main())
        report = prof.snapshot()
    finally:
        prof.close()
    for name in ("plain", "sub"):
        (task,) = report.find(name=name)
        assert (task.state, task.finished_at) == ("pending", None), task
