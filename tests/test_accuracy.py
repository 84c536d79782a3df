"""Ground truth: tasks that allocate known amounts are reported with those amounts."""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import sys

import pytest

import memscope_async as ms
from conftest import MiB, close_to, run_profiled
from memscope_async.loop_hooks.tagging import TAG

KEEP: list = []


async def holder(mib: int, pieces: int = 4) -> int:
    """Retain ``mib`` MiB in a few buffers, interleaved with awaits."""
    size = mib * MiB // pieces
    for _ in range(pieces):
        KEEP.append(bytearray(size))
        await asyncio.sleep(0)
    return mib


async def churner(total: int, piece: int = 1024) -> int:
    """Allocate and free ``total`` bytes in small pieces; returns the true byte count.
    The loop itself allocates nothing else (no new ints), so the truth is exact."""
    per_round = 1000
    rounds = total // (piece * per_round)
    for _ in itertools.repeat(None, rounds):
        for _ in itertools.repeat(None, per_round):
            b = bytes(piece)
            del b
        await asyncio.sleep(0)
    return rounds * per_round * sys.getsizeof(bytes(piece))


def test_retained_buffers_interleaved(loop_kind):
    KEEP.clear()

    async def main():
        return await asyncio.gather(holder(3), holder(5), holder(7))

    result, report = run_profiled(main, loop_kind)
    assert result == [3, 5, 7]
    for mib in (3, 5, 7):
        (t,) = [t for t in report.find(coro="holder") if close_to(t.live_bytes, mib * MiB)]
        assert close_to(t.allocated_bytes, mib * MiB), t
        assert t.state == "done"
        assert t.retained_after_done_bytes == t.live_bytes
        assert t.peak_live_bytes >= t.live_bytes
        assert t.confidence == 1.0
    KEEP.clear()


def test_churn_shows_allocated_not_live(loop_kind):
    truth = {}

    async def main():
        truth["bytes"] = await asyncio.create_task(churner(100 * MiB))

    _, report = run_profiled(main, loop_kind)
    (t,) = report.find(coro="churner")
    assert close_to(t.allocated_bytes, truth["bytes"]), (t.allocated_bytes, truth["bytes"])
    assert abs(t.live_bytes) < 64 * 1024
    assert close_to(t.freed_bytes, truth["bytes"])


def test_child_bytes_only_in_parent_subtree(loop_kind):
    KEEP.clear()

    async def parent():
        KEEP.append(bytearray(2 * MiB))
        await asyncio.create_task(holder(5))
        await asyncio.sleep(0)

    async def main():
        await asyncio.create_task(parent())

    _, report = run_profiled(main, loop_kind)
    (p,) = report.find(coro="test_child_bytes_only_in_parent_subtree.<locals>.parent")
    (c,) = report.find(coro="holder")
    assert c.parent_id == p.id
    assert close_to(p.live_bytes, 2 * MiB)
    assert close_to(c.live_bytes, 5 * MiB)
    assert close_to(p.subtree.live_bytes, 7 * MiB)
    assert close_to(p.subtree.allocated_bytes, 7 * MiB)
    main_task = report.task(p.parent_id)
    assert main_task.subtree.live_bytes >= p.subtree.live_bytes
    assert main_task.live_bytes < 64 * 1024
    KEEP.clear()


def test_same_numbers_on_every_entry_point(tmp_path):
    """install_policy, run() and loop_factory() report the same truth."""
    KEEP.clear()

    async def main():
        await asyncio.create_task(holder(6))

    prof = ms.install_policy()
    try:
        asyncio.run(main())
    finally:
        ms.uninstall_policy()
    (a,) = prof.snapshot().find(coro="holder")
    prof.close()

    path = tmp_path / "r.json"
    ms.run(main(), report=path)
    (b,) = ms.Report.load(path).find(coro="holder")
    ms.current_profiler().close()

    factory = ms.loop_factory()
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())
    (c,) = factory.profiler.snapshot().find(coro="holder")
    factory.profiler.close()
    for t in (a, b, c):
        assert close_to(t.live_bytes, 6 * MiB), t
    KEEP.clear()


def test_realloc_grows_charge_final_size():
    """A list grown by realloc is charged its final size, not the sum of every step."""

    async def grow():
        lst = []
        for _ in itertools.repeat(None, 200_000):
            lst.append(None)
        KEEP.append(lst)
        return sys.getsizeof(lst)

    async def main():
        return await asyncio.create_task(grow())

    size, report = run_profiled(main)
    (t,) = report.find(coro="test_realloc_grows_charge_final_size.<locals>.grow")
    assert close_to(t.live_bytes, size, abs_=16 * 1024)
    assert t.allocated_bytes < 2 * size
    KEEP.clear()


def test_small_reallocs_are_exact(loop_kind):
    """Many small blocks grown by realloc (a list's item array: 0 -> 32 -> 64 -> 128 bytes),
    and small buffers another task grows: each owner's live bytes match the sizes held."""
    KEEP.clear()

    async def small_lists():
        out = []
        for _ in itertools.repeat(None, 20_000):
            lst = []
            for _ in itertools.repeat(None, 9):
                lst.append(None)
            out.append(lst)
        KEEP.append(out)
        return sys.getsizeof(out) + sum(map(sys.getsizeof, out))

    async def make_buffers():
        bufs = [bytearray(100) for _ in itertools.repeat(None, 10_000)]
        KEEP.append(bufs)
        return bufs

    async def grow_buffers(bufs):
        tail = b"x" * 200
        for b in bufs:
            b.extend(tail)  # realloc of a block make_buffers allocated: it becomes ours

    async def main():
        held = await asyncio.create_task(small_lists(), name="lists")
        bufs = await asyncio.create_task(make_buffers(), name="maker")
        await asyncio.create_task(grow_buffers(bufs), name="grower")
        buffers = sum(b.__alloc__() for b in bufs)
        objects = sys.getsizeof(bufs) + sum(sys.getsizeof(b) - b.__alloc__() for b in bufs)
        return held, buffers, objects

    (held, buffers, objects), report = run_profiled(main, loop_kind)
    (lists,) = report.find(name="lists")
    (maker,) = report.find(name="maker")
    (grower,) = report.find(name="grower")
    assert close_to(lists.live_bytes, held), (lists.live_bytes, held)
    assert close_to(grower.live_bytes, buffers), (grower.live_bytes, buffers)
    assert close_to(maker.live_bytes, objects), (maker.live_bytes, objects)
    # the grower took each buffer over by realloc: a hand-over, counted as such
    # (plus the odd block of its own frame or result another task drops)
    assert 10_000 <= maker.cross_task_frees < 10_100 and maker.allocated_bytes >= objects + 10_000 * 101
    KEEP.clear()


@pytest.mark.skipif(sys.version_info < (3, 12), reason="eager tasks are 3.12+")
def test_eager_tasks_attributed(loop_kind):
    if loop_kind == "uvloop" and sys.version_info >= (3, 13):
        pytest.skip("uvloop on 3.13 passes eager_start= that asyncio.eager_task_factory rejects")
    KEEP.clear()

    async def main():
        asyncio.get_running_loop().set_task_factory(asyncio.eager_task_factory)
        await asyncio.gather(holder(3, pieces=1), holder(4))

    _, report = run_profiled(main, loop_kind)
    sizes = sorted(round(t.live_bytes / MiB) for t in report.find(coro="holder"))
    assert sizes == [3, 4]
    KEEP.clear()


def test_tasks_made_as_others_end_keep_their_own_bytes_and_parents(loop_kind):
    """Once a task and every copy of its context are gone, a task made next may be given
    that task's tag mapping, its Tag renumbered (_tasks.h, kept_mapping_take).  Each task of
    a run made one after another, each as the last ends, still has exactly its own bytes
    and its own parent; a task whose context a pending callback still holds keeps its tag,
    and what the callback allocates after later tasks came and went is still that task's."""
    from memscope_async.attribution import _core

    KEEP.clear()
    seen = {}

    async def alloc(mib):
        KEEP.append(bytearray(mib * MiB))

    async def keeper():
        asyncio.get_running_loop().call_later(0.05, lambda: KEEP.append(bytearray(6 * MiB)))

    async def chain(n):
        for i in range(n):
            await asyncio.create_task(alloc(1 + i % 3), name=f"t{i}")
            if i == n // 2:
                await asyncio.create_task(keeper(), name="keeper")

    async def main():
        before = _core.stats()["tag_mappings_reused"]
        # in a context of its own, holding only the tag: whether the program's other
        # variables (pytest's decimal context) share the tag's place at the mapping's first
        # level depends on the run's string hashes, and there nothing is reused
        await asyncio.create_task(chain(12), name="chain", context=contextvars.Context())
        seen["reused"] = _core.stats()["tag_mappings_reused"] - before
        await asyncio.sleep(0.1)

    _, report = run_profiled(main, loop_kind)
    assert seen["reused"] >= 8, seen  # the path under test was taken
    (parent,) = report.find(name="chain")
    for i in range(12):
        (t,) = report.find(name=f"t{i}")
        assert t.parent_id == parent.id and t.state == "done", t
        assert close_to(t.allocated_bytes, (1 + i % 3) * MiB) and close_to(t.live_bytes, (1 + i % 3) * MiB), t
    (k,) = report.find(name="keeper")
    assert k.parent_id == parent.id
    assert close_to(k.allocated_bytes, 6 * MiB) and close_to(k.live_bytes, 6 * MiB), k
    KEEP.clear()


def _hamt_place(var, level: int = 0) -> int:
    """var's place at a level of a context's mapping (CPython's HAMT: the hash folded to 32
    bits, -1 made -2; 5 bits a level, the lowest first)."""
    h = hash(var) & (2**64 - 1)
    x = (h & 0xFFFFFFFF) ^ (h >> 32)
    return ((0xFFFFFFFE if x == 0xFFFFFFFF else x) >> (5 * level)) & 31


def test_kept_tag_mappings_hold_nothing_whose_lifetime_shows(loop_kind):
    """A tag mapping is kept for later tasks only when what else it holds has a lifetime no
    program can see: with an int set in the parent's context its children's mappings are
    reused; with an object that can be weakly referenced (a code object, which the
    collector does not track, so the mapping passes as acyclic) none is kept, and the
    object goes when the tasks do."""
    import gc
    import weakref

    from memscope_async.attribution import _core

    seen = {}

    async def child():
        await asyncio.sleep(0)

    async def parent(var, value):
        var.set(value)
        del value
        before = _core.stats()["tag_mappings_reused"]
        for _ in range(10):
            await asyncio.create_task(child())
        return _core.stats()["tag_mappings_reused"] - before

    async def main():
        # a variable at another place than the tag's, so the children's mappings hold the
        # tag at their first level (else nothing is kept, whatever the value)
        var = next(v for v in (contextvars.ContextVar(f"kept_{i}") for i in itertools.count())
                   if _hamt_place(v) != _hamt_place(TAG))
        seen["int"] = await asyncio.create_task(parent(var, 12345), context=contextvars.Context())
        code = compile("x = 1", "<kept>", "exec")
        ref = weakref.ref(code)
        seen["object"] = await asyncio.create_task(parent(var, code), context=contextvars.Context())
        del code
        await asyncio.sleep(0)
        gc.collect()
        seen["gone"] = ref() is None

    run_profiled(main, loop_kind)
    assert seen["int"] >= 6, seen
    assert seen["object"] == 0 and seen["gone"], seen


def test_tag_mappings_are_reused_where_a_variable_shares_the_tags_place(loop_kind):
    """A variable at the tag's place in the mapping's first level puts both one level down;
    tasks made one after another there still reuse tag mappings, and each keeps its own
    bytes and sees what its creator set."""
    from memscope_async.attribution import _core

    KEEP.clear()
    seen = {}

    async def child(mib):
        KEEP.append(bytearray(mib * MiB))
        return seen["var"].get()

    async def parent():
        var = seen["var"]
        before = _core.stats()["tag_mappings_reused"]
        values = []
        for i in range(16):
            # the same value for the first 8 (their mappings are reused), then another
            # each time (a kept one holds an older value at that level: not reused)
            var.set(7 if i < 8 else i)
            values.append(await asyncio.create_task(child(1 + i % 3), name=f"c{i}"))
            if i == 7:
                seen["reused"] = _core.stats()["tag_mappings_reused"] - before
        return values

    async def main():
        seen["var"] = next(
            v for v in (contextvars.ContextVar(f"shared_{i}") for i in itertools.count())
            if _hamt_place(v) == _hamt_place(TAG) and _hamt_place(v, 1) != _hamt_place(TAG, 1)
        )
        return await asyncio.create_task(parent(), name="parent", context=contextvars.Context())

    values, report = run_profiled(main, loop_kind)
    assert values == [7] * 8 + list(range(8, 16))
    assert seen["reused"] >= 5, seen
    (p,) = report.find(name="parent")
    for i in range(16):
        (t,) = report.find(name=f"c{i}")
        assert t.parent_id == p.id and close_to(t.allocated_bytes, (1 + i % 3) * MiB), t
    KEEP.clear()


@pytest.mark.parametrize("others", [0, 1, 15, 16, 40])
def test_tasks_in_contexts_of_many_variables_keep_their_own_bytes(loop_kind, others):
    """After each context switch the hooks read the running task's tag from its context's
    mapping: from its nodes where they are of the kind CPython makes while a level has up
    to 16 slots in use (always so with 16 keys or fewer), through ContextVar.get where not.
    Either way each of three tasks that take turns keeps its own bytes."""
    from memscope_async.attribution import _core

    KEEP.clear()
    variables = [contextvars.ContextVar(f"ctx_{others}_{i}") for i in range(others)]
    read = []

    async def child(mib):
        ctx = contextvars.copy_context()  # (the same mapping as the task's own)
        how, value = _core.tag_in_context(ctx)
        read.append((how, how < 0 or value is ctx[TAG]))
        for _ in range(4):
            KEEP.append(bytearray(mib * MiB // 4))
            await asyncio.sleep(0)

    async def main():
        for i, v in enumerate(variables):
            v.set(i)
        await asyncio.gather(*(asyncio.create_task(child(mib), name=f"c{mib}") for mib in (1, 2, 3)))

    # (in a fresh context: what earlier tests set in this thread's would count as others)
    _, report = contextvars.Context().run(run_profiled, main, loop_kind)
    for mib in (1, 2, 3):
        (t,) = report.find(name=f"c{mib}")
        assert close_to(t.live_bytes, mib * MiB) and close_to(t.allocated_bytes, mib * MiB), t
    (root,) = [t for t in report.tasks if t.parent_id is None and t.coro.endswith("main")]
    assert root.live_bytes < 64 * 1024, root
    assert all(same for _, same in read), read
    if others < 16:
        assert [how for how, _ in read] == [1, 1, 1], read  # read from the nodes
    KEEP.clear()


def test_the_tag_read_from_a_contexts_nodes_is_what_the_variable_holds():
    """tag_in_context against ContextVar.get, contexts of 0-60 variables set in turn (and
    some set again, so their nodes are copied), before and after the tag goes in."""
    import memscope_async as ms
    from memscope_async.attribution import _core

    variables = [contextvars.ContextVar(f"shape_{i}") for i in range(60)]
    seen = {-1: 0, 0: 0, 1: 0}

    async def probe(n):
        ctx = contextvars.copy_context()
        for i in range(n):
            variables[i].set(i)
        for v in variables[: n // 2]:
            v.set("again")
        for c in (ctx, contextvars.copy_context()):
            how, value = _core.tag_in_context(c)
            seen[how] += 1
            assert how < 0 or (how == 1) == (TAG in c), (n, how)
            assert how < 1 or value is c[TAG], (n, value)

    async def main():
        for n in range(61):
            await asyncio.create_task(probe(n))
        how, _ = _core.tag_in_context(contextvars.Context())  # an empty one: not there
        seen[how] += 1

    with ms.Profiler():
        contextvars.Context().run(asyncio.run, main())  # (nothing earlier tests set)
    assert seen[1] >= 30 and seen[0] == 1, seen


def test_legacy_factory_tasks_have_one_record_with_their_bytes():
    """A (loop, coro) factory runs inside our tagged context and makes its task in a copy
    of it: still one record per task, holding the task's bytes, and it finishes."""
    KEEP.clear()

    async def main():
        loop = asyncio.get_running_loop()
        loop.set_task_factory(lambda loop, coro: asyncio.Task(coro, loop=loop))
        await asyncio.gather(*(loop.create_task(holder(2)) for _ in range(3)))

    _, report = run_profiled(main)
    holders = report.find(coro="holder")
    assert len(holders) == 3, holders
    for t in holders:
        assert t.state == "done"
        assert close_to(t.live_bytes, 2 * MiB), t
    KEEP.clear()



def test_factory_returning_another_task_than_it_made_keeps_one_record():
    """A factory that makes the Task for the coroutine and returns a second one awaiting it
    (both in the context it was given): one record, for both objects, with the bytes, and
    the inner task is not taken for one made without the factory when it steps again."""
    KEEP.clear()

    async def waiter(inner):
        return await inner

    def factory(loop, coro, **kw):
        inner = asyncio.Task(coro, loop=loop, **kw)
        return asyncio.Task(waiter(inner), loop=loop, **kw)

    async def main():
        asyncio.get_running_loop().set_task_factory(factory)
        return await asyncio.create_task(holder(3), name="wrapped")

    result, report = run_profiled(main)
    assert result == 3
    (t,) = report.find(name="wrapped")
    assert close_to(t.live_bytes, 3 * MiB), t
    assert t.state == "done"
    assert [x.id for x in report.tasks if not x.via_factory] == [], report.tasks
    assert [x.id for x in report.tasks if x.coro in ("holder", "waiter") or x.name == "wrapped"] == [t.id], report.tasks
    KEEP.clear()

def test_instrument_from_a_running_task_charges_that_task():
    """ms.instrument() inside a task made before any profiler: what the task allocates
    afterwards is its own (tagging the running context must not be missed by the hook's
    context cache)."""
    KEEP.clear()

    async def main():
        prof = ms.instrument()
        KEEP.append(bytearray(3 * MiB))
        await asyncio.sleep(0)
        return prof, asyncio.current_task()

    prof, task = asyncio.run(main())
    try:
        report = prof.snapshot()
        assert close_to(report.task(task).live_bytes, 3 * MiB), report.task(task)
    finally:
        prof.close()
        KEEP.clear()


def test_block_resized_by_code_that_runs_unrecorded_stays_its_owners():
    # Code can run while our own bookkeeping has the hooks' guard up (a finalizer during a
    # snapshot).  A block the program owns that it resizes there stays its owner's.
    from memscope_async.attribution import _core

    held = []

    async def owner():
        buf = bytearray(2 * MiB)
        held.append(buf)
        await asyncio.sleep(0)
        _core.unrecorded(buf.extend, bytes(MiB))  # a realloc of the task's block, guard up

    async def main():
        await asyncio.create_task(owner())

    _, report = run_profiled(main)
    (t,) = report.find(coro="owner")
    assert close_to(t.live_bytes, 3 * MiB), t
    held.clear()


async def two_steps(mib: int) -> None:
    """Keep ``mib`` MiB, half before and half after a pause others run in."""
    await asyncio.sleep(0)
    KEEP.append(bytearray(mib * MiB // 2))
    await asyncio.sleep(0.01)
    KEEP.append(bytearray(mib * MiB // 2))


def test_tasks_sharing_one_context_keep_their_own_bytes(loop_kind):
    """One Context given to three create_task calls: the three run in it at once, and
    each is charged what it allocated (the context's tag names only the last of them)."""
    KEEP.clear()

    async def main():
        ctx = contextvars.copy_context()
        await asyncio.gather(*[asyncio.create_task(two_steps(mib), context=ctx) for mib in (2, 4, 6)])

    _, report = run_profiled(main, loop_kind)
    tasks = report.find(coro="two_steps")
    assert len(tasks) == 3
    (root,) = report.find(coro="test_tasks_sharing_one_context_keep_their_own_bytes.<locals>.main")
    for t, mib in zip(sorted(tasks, key=lambda t: t.id), (2, 4, 6)):
        assert close_to(t.allocated_bytes, mib * MiB) and close_to(t.live_bytes, mib * MiB), (mib, t)
        assert t.parent_id == root.id
    KEEP.clear()


@pytest.mark.skipif(sys.version_info < (3, 12), reason="Task.get_context() is 3.12+")
def test_a_task_given_its_creators_running_context_keeps_its_own_bytes(loop_kind):
    """create_task(coro, context=<the creator's own running context>): creator and child
    share one context, and each keeps its own bytes."""
    KEEP.clear()

    async def creator():
        child = asyncio.get_running_loop().create_task(two_steps(4), context=asyncio.current_task().get_context())
        await asyncio.sleep(0.005)
        KEEP.append(bytearray(2 * MiB))
        await child

    async def main():
        await asyncio.create_task(creator())

    _, report = run_profiled(main, loop_kind)
    (c,) = report.find(coro="test_a_task_given_its_creators_running_context_keeps_its_own_bytes.<locals>.creator")
    (child,) = report.find(coro="two_steps")
    assert child.parent_id == c.id
    assert close_to(child.allocated_bytes, 4 * MiB) and close_to(child.live_bytes, 4 * MiB), child
    assert close_to(c.allocated_bytes, 2 * MiB) and close_to(c.live_bytes, 2 * MiB), c
    assert close_to(c.subtree.live_bytes, 6 * MiB)
    KEEP.clear()


def test_a_task_given_a_shared_context_after_a_sibling_ended_keeps_its_own_bytes(loop_kind):
    """Task 1 and a quick task 2 are given one Context; task 2 ends; task 3 is given it
    while task 1 still runs: each keeps its own bytes (task 3's tag replaced a finished
    sibling's, but the context is still task 1's too)."""
    KEEP.clear()

    async def quick():
        return None

    async def main():
        ctx = contextvars.copy_context()
        first = asyncio.create_task(two_steps(4), context=ctx)
        await asyncio.create_task(quick(), context=ctx)
        third = asyncio.create_task(two_steps(2), context=ctx)
        await asyncio.gather(first, third)

    _, report = run_profiled(main, loop_kind)
    first, third = sorted(report.find(coro="two_steps"), key=lambda t: t.id)
    assert close_to(first.allocated_bytes, 4 * MiB) and close_to(first.live_bytes, 4 * MiB), first
    assert close_to(third.allocated_bytes, 2 * MiB) and close_to(third.live_bytes, 2 * MiB), third
    KEEP.clear()


@pytest.mark.parametrize("how", ["plain", "ctx-run", "eager"])
def test_what_a_user_factory_allocates_is_the_new_tasks_and_the_caller_keeps_its_own(loop_kind, how):
    """A legacy (loop, coro) factory runs in its caller's context with the new task's Tag
    in it for the call: what it allocates for the task is the task's; what the caller
    allocates after create_task is the caller's, even when the factory switched context
    (ctx.run, an eager first step) and the hooks' cached answers went with it."""
    if how == "eager" and sys.version_info < (3, 12):
        pytest.skip("eager tasks are 3.12+")
    KEEP.clear()
    state = {}

    def factory(loop, coro, context=None, **kw):  # (uvloop passes context=None and, on 3.13, eager_start)
        if how == "eager":
            kw["eager_start"] = True
        task = asyncio.Task(coro, loop=loop, context=context, **kw)
        if how == "ctx-run":
            contextvars.copy_context().run(lambda: None)
        task.add_done_callback(lambda _t: None)
        state[id(task)] = bytearray(2 * MiB)  # the factory's, for the new task
        return task

    async def child():
        await asyncio.sleep(0)

    async def parent():
        asyncio.get_running_loop().set_task_factory(factory)
        t = asyncio.create_task(child(), name="child")
        KEEP.append(bytearray(3 * MiB))  # the parent's own
        await t
        asyncio.get_running_loop().set_task_factory(None)

    async def main():
        await asyncio.create_task(parent(), name="parent")

    _, report = run_profiled(main, loop_kind)
    (p,) = report.find(name="parent")
    (c,) = report.find(name="child")
    assert close_to(p.live_bytes, 3 * MiB) and close_to(c.live_bytes, 2 * MiB), (p, c)
    KEEP.clear()
