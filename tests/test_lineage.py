"""Lineage: the parent is the task whose context the child's was copied from."""

from __future__ import annotations

import asyncio
import contextvars
import sys

import pytest

from conftest import KiB, close_to, run_profiled


async def leaf():
    await asyncio.sleep(0)


async def node(depth, fan):
    if depth == 0:
        return await leaf()
    await asyncio.gather(*(node(depth - 1, fan) for _ in range(fan)))


def test_gather_tree_lineage(loop_kind):
    async def main():
        await node(3, 3)

    _, report = run_profiled(main, loop_kind)
    # gather wraps each coroutine in a task: 3 + 9 + 27 node tasks, 27 leaf awaits inline
    nodes = report.find(coro="node")
    assert len(nodes) == 3 + 9 + 27
    by_id = {t.id: t for t in report.tasks}
    main_task = [t for t in report.tasks if t.coro.endswith("main")][0]
    for t in nodes:
        assert t.lineage[-1] == t.id
        assert t.lineage[0] == main_task.id
        assert t.parent_id == t.lineage[-2]
        assert by_id[t.parent_id].id == t.parent_id
    depths = sorted({len(t.lineage) for t in nodes})
    assert depths == [2, 3, 4]
    assert main_task.subtree.tasks == 1 + len(nodes)


def test_taskgroup_wait_for_shield(loop_kind):
    async def child():
        await asyncio.sleep(0)
        return asyncio.current_task()

    async def main():
        async with asyncio.TaskGroup() as tg:
            a = tg.create_task(child())
        b = await asyncio.wait_for(asyncio.ensure_future(child()), 1)
        c = await asyncio.shield(asyncio.ensure_future(child()))
        return asyncio.current_task(), a, b, c

    (main_task, a, b, c), report = run_profiled(main, loop_kind)
    m = report.task(main_task)
    for t in (a, b, c):
        assert report.task(t).parent_id == m.id


def test_direct_task_construction_is_adopted(loop_kind):
    async def main():
        t = asyncio.Task(leaf())
        await t
        return asyncio.current_task(), t

    (main_task, t), report = run_profiled(main, loop_kind)
    rt = report.task(t)
    assert rt.via_factory is False
    assert rt.parent_id == report.task(main_task).id
    assert rt.coro == "leaf"


HOLD: list = []


async def eager_direct() -> None:
    await asyncio.sleep(0)
    HOLD.append(bytearray(7 << 20))
    await asyncio.sleep(0)


@pytest.mark.skipif(sys.version_info < (3, 12), reason="eager_start is new in 3.12")
def test_a_task_built_with_eager_start_is_adopted_from_its_own_step(loop_kind):
    """asyncio.Task(coro, eager_start=True) runs its first step inside the constructor:
    it is seen first there, from inside its own running context, which cannot be entered
    again.  It was never recorded: its 7 MiB were charged to main."""

    async def main():
        t = asyncio.Task(eager_direct(), loop=asyncio.get_running_loop(), name="direct", eager_start=True)
        await t
        return asyncio.current_task(), t

    HOLD.clear()
    try:
        (main_task, t), report = run_profiled(main, loop_kind)
    finally:
        HOLD.clear()
    rt, m = report.task(t), report.task(main_task)
    assert (rt.name, rt.coro, rt.via_factory, rt.parent_id) == ("direct", "eager_direct", False, m.id)
    assert close_to(rt.live_bytes, 7 << 20), rt.live_bytes
    assert m.live_bytes < 64 * KiB, m.live_bytes
    assert close_to(m.subtree.live_bytes, 7 << 20), m.subtree


def test_deep_nesting():
    async def chain(n):
        if n:
            await asyncio.create_task(chain(n - 1))

    async def main():
        await asyncio.create_task(chain(50))

    _, report = run_profiled(main)
    deepest = max(report.tasks, key=lambda t: len(t.lineage))
    assert len(deepest.lineage) == 52
    root = report.task(deepest.lineage[0])
    assert root.subtree.tasks == 52


@pytest.mark.skipif(sys.version_info < (3, 12), reason="eager tasks are 3.12+")
def test_eager_tree_does_not_touch_finished_tasks():
    """Eagerly finished tasks inside a gather tree (CPython 3.12.1 crashes if asked for
    get_coro() of one; the profiler must never ask)."""

    async def node(d):
        if d == 0:
            return 1
        return 1 + sum(await asyncio.gather(*(node(d - 1) for _ in range(3))))

    async def main():
        asyncio.get_running_loop().set_task_factory(asyncio.eager_task_factory)
        return await node(3)

    result, report = run_profiled(main)
    assert result == 1 + 3 + 9 + 27
    nodes = report.find(coro="node")
    assert len(nodes) == 3 + 9 + 27 and all(t.state == "done" for t in nodes)


def test_tasks_in_contexts_tagged_directly_keep_their_own_bytes_and_parents(loop_kind):
    # The factory tags the context it copies for a new task by updating the copy's
    # variable mapping directly (_tasks.h, fresh_context_set).  Each task must see its own
    # tag, its children must see it as their parent, and its bytes must be its own, not
    # its parent's; a context given with context= goes the documented way and gets its
    # parent from the tag it holds.
    import contextvars

    from memscope_async.attribution import _core

    held = []

    async def grow(n, depth):
        held.append(bytearray(n * 64 * 1024))
        if depth:
            await asyncio.gather(*(asyncio.create_task(grow(n + 1, depth - 1)) for _ in range(2)))
        return asyncio.current_task()

    async def main():
        given = contextvars.copy_context()
        outer = await asyncio.create_task(grow(1, 2))
        explicit = await asyncio.get_running_loop().create_task(grow(9, 0), context=given)
        return asyncio.current_task(), outer, explicit, _core.stats()["direct_context_tagging"]

    (main_task, outer, explicit, direct), report = run_profiled(main, loop_kind)
    if sys.implementation.name == "cpython" and sys.version_info < (3, 14):
        assert direct == 1
    m = report.task(main_task)
    grows = report.find(coro="grow")
    assert len(grows) == 1 + 2 + 4 + 1
    for t in grows:
        depth = len(t.lineage) - len(m.lineage)
        n = 9 if t.id == report.task(explicit).id else depth
        # each task holds its one bytearray: n * 64 KiB (+ a few hundred bytes of its own)
        assert n * 64 * 1024 <= t.live_bytes < n * 64 * 1024 + 32 * 1024, (t.coro, depth, t.live_bytes)
        assert t.lineage[: len(m.lineage)] == m.lineage
    assert report.task(outer).parent_id == m.id
    assert report.task(explicit).parent_id == m.id
    assert m.subtree.tasks == 1 + len(grows)


def test_labels_reach_the_tasks_created_under_them(loop_kind):
    # labels() is the one way to set labels (task creation reads them only once it has
    # been used); nested blocks add to them, and tasks keep what they were created with.
    import memscope_async as ms

    async def child():
        await asyncio.sleep(0)
        return asyncio.current_task()

    async def labelled():
        with ms.labels(tenant="acme"):
            return await asyncio.create_task(child())

    async def main():
        plain = await asyncio.create_task(child())
        with ms.labels(route="/items"):
            w = await asyncio.create_task(child())
            nested = await asyncio.create_task(labelled())
        after = await asyncio.create_task(child())
        return plain, w, nested, after

    (plain, w, nested, after), report = run_profiled(main, loop_kind)
    assert dict(report.task(plain).labels) == {}
    assert dict(report.task(w).labels) == {"route": "/items"}
    assert dict(report.task(nested).labels) == {"route": "/items", "tenant": "acme"}
    assert dict(report.task(after).labels) == {}


async def grandchild_in(ctx_out: list) -> None:
    await asyncio.sleep(0)


async def child_sharing_a_copy(out: list) -> None:
    await asyncio.sleep(0)
    ctx = contextvars.copy_context()  # may take the address of a context freed just now
    g = asyncio.get_running_loop().create_task(grandchild_in(out), context=ctx)
    out.append(g)
    await g


def test_a_legacy_factorys_task_keeps_the_context_it_has(loop_kind):
    """A (loop, coro) factory runs inside the tagged context we made, and the Task it
    builds copies it: the record must keep the copy, not ours (freed when the factory
    returns).  Kept ours, a copy made later at its address looked like the same task's
    context handed on, and the grandchild got main as its parent."""

    async def main():
        # (**kw: the grandchild is made with a context=, which the loop hands to the factory)
        asyncio.get_running_loop().set_task_factory(lambda loop, coro, **kw: asyncio.Task(coro, loop=loop, **kw))
        out: list = []
        c = asyncio.create_task(child_sharing_a_copy(out))
        await c
        return asyncio.current_task(), c, out[0]

    (m, c, g), report = run_profiled(main, loop_kind)
    rm, rc, rg = report.task(m), report.task(c), report.task(g)
    assert (rc.parent_id, rg.parent_id, rg.lineage) == (rm.id, rc.id, (rm.id, rc.id, rg.id))


async def direct_grandchild() -> None:
    await asyncio.sleep(0)
    HOLD.append(bytearray(3 << 20))
    await asyncio.sleep(0)


async def child_building_a_task(out: list) -> None:
    g = asyncio.Task(direct_grandchild())  # in the child's eager first step
    out.append(g)
    await g


@pytest.mark.skipif(sys.version_info < (3, 12), reason="eager_task_factory is new in 3.12")
def test_a_task_built_directly_in_an_eager_first_step_is_its_own(loop_kind):
    """Under eager_task_factory, the child's first step runs inside our factory, and a
    Task it builds directly runs in a copy of the child's context: it is another task, not
    the child seen in a copy of its context (it was: never recorded, its 3 MiB the
    child's)."""
    if loop_kind == "uvloop" and sys.version_info >= (3, 13):
        pytest.skip("uvloop on 3.13 passes eager_start= that asyncio.eager_task_factory rejects")

    async def main():
        asyncio.get_running_loop().set_task_factory(asyncio.eager_task_factory)
        out: list = []
        c = asyncio.create_task(child_building_a_task(out))
        await c
        return c, out[0]

    HOLD.clear()
    try:
        (c, g), report = run_profiled(main, loop_kind)
    finally:
        HOLD.clear()
    rc, rg = report.task(c), report.task(g)
    assert (rg.coro, rg.parent_id, rg.via_factory) == ("direct_grandchild", rc.id, False)
    assert close_to(rg.live_bytes, 3 << 20), rg.live_bytes
    assert rc.live_bytes < 64 * KiB, rc.live_bytes


async def eager_direct_child(out: list) -> None:
    HOLD.append(bytearray(4 << 20))
    out.append(asyncio.create_task(direct_grandchild(), name="grandchild"))  # made in the first step


@pytest.mark.skipif(sys.version_info < (3, 12), reason="Task(eager_start=) is new in 3.12")
def test_a_task_built_directly_with_eager_start_is_its_own(loop_kind):
    """asyncio.Task(coro, eager_start=True) runs its first step inside the constructor,
    with no call_soon before it: that step was charged to its creator, a task finishing
    in it was missing from the report, and a task made there got its creator as parent."""

    async def main():
        out: list = []
        done_at_once = asyncio.Task(eager_direct_child(out), loop=asyncio.get_running_loop(), eager_start=True)
        assert done_at_once.done()
        await out[0]
        return asyncio.current_task(), done_at_once, out[0]

    HOLD.clear()
    try:
        (m, c, g), report = run_profiled(main, loop_kind)
    finally:
        HOLD.clear()
    rm, rc, rg = report.task(m), report.task(c), report.task(g)
    assert (rc.coro, rc.parent_id, rc.state, rc.via_factory) == ("eager_direct_child", rm.id, "done", False)
    assert close_to(rc.live_bytes, 4 << 20), rc.live_bytes
    assert rm.live_bytes < 64 * KiB, rm.live_bytes
    assert (rg.parent_id, rg.lineage) == (rc.id, (rm.id, rc.id, rg.id))
    assert close_to(rg.live_bytes, 3 << 20), rg.live_bytes


async def eager_outer(out: list, finish: bool) -> None:
    HOLD.append(bytearray(1 << 20))
    inner = asyncio.Task(eager_inner(finish), loop=asyncio.get_running_loop(), eager_start=True)
    out.append(inner)
    await inner


async def eager_inner(finish: bool) -> None:
    HOLD.append(bytearray(4 << 20))
    if not finish:
        await asyncio.sleep(0)
        HOLD.append(bytearray(2 << 20))


def _custom_eager(loop, coro, **kwargs):
    kwargs["eager_start"] = True
    return asyncio.Task(coro, loop=loop, **kwargs)


@pytest.mark.skipif(sys.version_info < (3, 12), reason="eager tasks are new in 3.12")
@pytest.mark.parametrize("factory", ["asyncio", "custom"])
@pytest.mark.parametrize("finish", [True, False], ids=["finishes-at-once", "steps-again"])
def test_an_eager_task_built_directly_in_an_eager_first_step(factory, finish):
    """Under an eager factory, a Task built directly with eager_start inside the first
    step of the task being made is a task of its own, whether or not that step is its
    last (it was merged into the outer one, or charged to it and left out)."""

    async def main():
        loop = asyncio.get_running_loop()
        loop.set_task_factory(asyncio.eager_task_factory if factory == "asyncio" else _custom_eager)
        out: list = []
        outer = asyncio.create_task(eager_outer(out, finish))
        await outer
        return asyncio.current_task(), outer, out[0]

    HOLD.clear()
    try:
        (m, a, b), report = run_profiled(main)
    finally:
        HOLD.clear()
    rm, ra, rb = report.task(m), report.task(a), report.task(b)
    assert (ra.parent_id, rb.parent_id, rb.state, rb.via_factory) == (rm.id, ra.id, "done", False)
    assert close_to(ra.live_bytes, 1 << 20), ra.live_bytes
    assert close_to(rb.live_bytes, (4 if finish else 6) << 20), rb.live_bytes


def test_a_factory_that_makes_its_task_in_a_context_of_its_own():
    """A factory that builds the Task inside copy_context().run(...): the task's context is
    a copy of a copy of ours; still one record per task, its bytes, its parent, done."""
    import contextvars

    async def main():
        loop = asyncio.get_running_loop()
        loop.set_task_factory(lambda loop, coro, context=None: contextvars.copy_context().run(
            lambda: asyncio.Task(coro, loop=loop, context=context)))
        out: list = []
        c = asyncio.create_task(child_sharing_a_copy(out))
        await c
        return asyncio.current_task(), c, out[0]

    (m, c, g), report = run_profiled(main)
    rm, rc, rg = report.task(m), report.task(c), report.task(g)
    assert (rc.parent_id, rg.parent_id, rc.state, rg.state) == (rm.id, rc.id, "done", "done")
    assert len(report.find(coro="child_sharing_a_copy")) == 1


async def eager_level(depth: int) -> int:
    HOLD.append(bytearray(100_000))
    if depth == 0:
        return 1
    kids = [asyncio.create_task(eager_level(depth - 1)) for _ in range(2)]
    return 1 + sum([await k for k in kids])


@pytest.mark.skipif(sys.version_info < (3, 12), reason="eager_task_factory is new in 3.12")
def test_nested_eager_tasks_have_one_record_each(loop_kind):
    """Eager tasks made inside the eager first steps of tasks still being made: one record
    per task, each made through our factory, each with its parent and its own bytes (a
    task whose step an inner one's first step handed back to was taken for a task built
    directly, and recorded twice)."""
    if loop_kind == "uvloop" and sys.version_info >= (3, 13):
        pytest.skip("uvloop on 3.13 passes eager_start= that asyncio.eager_task_factory rejects")

    async def main():
        asyncio.get_running_loop().set_task_factory(asyncio.eager_task_factory)
        return await asyncio.create_task(eager_level(3))

    HOLD.clear()
    try:
        total, report = run_profiled(main, loop_kind)
    finally:
        HOLD.clear()
    assert total == 15
    levels = report.find(coro="eager_level")
    assert len(levels) == 15 and all(t.via_factory for t in levels), [(t.id, t.parent_id, t.via_factory) for t in levels]
    ids = {t.id for t in levels}
    assert sum(t.parent_id not in ids for t in levels) == 1  # the root's parent is main
    assert all(close_to(t.allocated_bytes, 100_000, abs_=16 * KiB) for t in levels), [t.allocated_bytes for t in levels]


async def built_directly_in_first_step(out: list, eager: bool) -> None:
    HOLD.append(bytearray(1 << 20))
    out.append(asyncio.Task(eager_inner(False), loop=asyncio.get_running_loop(), eager_start=eager))
    await out[-1]


def _legacy_eager(loop, coro):
    return asyncio.Task(coro, loop=loop, eager_start=True)


@pytest.mark.skipif(sys.version_info < (3, 12), reason="eager tasks are new in 3.12")
@pytest.mark.parametrize("factory", ["asyncio", "legacy"])
@pytest.mark.parametrize("eager", [True, False], ids=["eager-inner", "inner"])
def test_an_eager_task_made_from_a_plain_callback(factory, eager):
    """create_task from a callback (no task running): the eager first step of the task
    being made goes in with no task to replace.  A Task built directly in that step is
    still another task (it was merged into it, or its first step charged to it)."""

    async def main():
        loop = asyncio.get_running_loop()
        loop.set_task_factory(asyncio.eager_task_factory if factory == "asyncio" else _legacy_eager)
        out: list = []
        made = loop.create_future()
        loop.call_soon(lambda: made.set_result(loop.create_task(built_directly_in_first_step(out, eager))))
        outer = await made
        await outer
        return outer, out[0]

    HOLD.clear()
    try:
        (a, b), report = run_profiled(main)
    finally:
        HOLD.clear()
    ra, rb = report.task(a), report.task(b)
    assert (rb.parent_id, rb.state, ra.state) == (ra.id, "done", "done")
    assert close_to(ra.live_bytes, 1 << 20), ra.live_bytes
    assert close_to(rb.live_bytes, 6 << 20), rb.live_bytes


async def eager_twice_removed(out: list) -> None:
    loop = asyncio.get_running_loop()
    out.append(asyncio.Task(eager_outer(out, True), loop=loop, eager_start=True))
    await out[0]


@pytest.mark.skipif(sys.version_info < (3, 12), reason="eager tasks are new in 3.12")
def test_eager_tasks_built_directly_two_deep_in_an_eager_first_step():
    """Under eager_task_factory, a Task built directly with eager_start inside one built
    the same way, finishing in its first step: it ends done (it stayed pending)."""

    async def main():
        asyncio.get_running_loop().set_task_factory(asyncio.eager_task_factory)
        out: list = []
        await asyncio.create_task(eager_twice_removed(out))
        return out

    HOLD.clear()
    try:
        out, report = run_profiled(main)
    finally:
        HOLD.clear()
    inner, outer = report.task(out[0]), report.task(out[1])  # (the inner one is appended first)
    assert (inner.parent_id, inner.state, outer.state) == (outer.id, "done", "done")
    assert close_to(inner.live_bytes, 4 << 20) and close_to(outer.live_bytes, 1 << 20), (inner, outer)
