"""The garbage collector sees what it would see without the profiler.

A task's tag lives in its context's variable mapping, so every tagged task's context holds a
mapping of its own (two collector-tracked objects), where a plain task's context shares its
parent's.  They leave the collector's lists only when they cannot be part of a reference
cycle; these tests hold that cycles through a context are still collected, and that the
collector still runs on its own when tasks leave garbage.
"""

from __future__ import annotations

import asyncio
import contextvars
import decimal
import gc
import os
import sys
import weakref

import pytest


from conftest import run_profiled
from memscope_async.loop_hooks.tagging import TAG

HOLDER = contextvars.ContextVar("test_collector.holder")
TEXT = contextvars.ContextVar("test_collector.text")


def own_mapping_tracked() -> bool:
    """Whether the running context's variable mapping is tracked by the collector (a copy
    of a context shares its mapping; the mapping is the copy's one referent)."""
    (mapping,) = gc.get_referents(contextvars.copy_context())
    return gc.is_tracked(mapping)


class Marker:
    """Something to hold a weak reference to."""


class Impostor:
    """Any attribute can refer back to a task: only _decimal's own Context is trusted."""


Impostor.__name__ = Impostor.__qualname__ = "decimal.Context"


def test_a_tasks_mapping_is_untracked_only_when_it_cannot_be_in_a_cycle(loop_kind):
    seen = {}

    async def probe(key):
        seen[key] = own_mapping_tracked()

    def legacy_factory(loop, coro, context=None, **kw):  # (uvloop passes context=None; 3.13 eager_start)
        return asyncio.Task(coro, loop=loop, context=context, **kw)

    async def main():
        await asyncio.create_task(probe("tag only"))
        loop = asyncio.get_running_loop()
        loop.set_task_factory(legacy_factory)  # its task copies the mapping made for it
        await asyncio.create_task(probe("a user's task factory"))
        loop.set_task_factory(None)
        TEXT.set("a string")
        await asyncio.create_task(probe("tag and a string"))
        decimal.setcontext(decimal.Context(prec=50))  # as Decimal arithmetic does in a fresh context
        await asyncio.create_task(probe("a decimal context"))
        HOLDER.set([])
        await asyncio.create_task(probe("a list"))

    async def main_default():
        contextvars.ContextVar("with_default", default=[]).set("x")  # a key whose default is a list
        await asyncio.create_task(probe("a key with a container default"))
        HOLDER.set(Impostor())
        await asyncio.create_task(probe("a class named like decimal's context"))

    # in an empty context: what the test process has set elsewhere is not in question here
    contextvars.Context().run(run_profiled, main, loop_kind)
    contextvars.Context().run(run_profiled, main_default, loop_kind)
    assert seen == {
        "tag only": False,
        "a user's task factory": False,
        "tag and a string": False,
        "a decimal context": False,
        "a list": True,
        "a key with a container default": True,
        "a class named like decimal's context": True,
    }


def _slot(var: contextvars.ContextVar) -> int:
    """Where var goes in the first level of a context's mapping (hamt.c folds the hash to
    32 bits and takes its low 5 bits)."""
    h = hash(var) & (2**64 - 1)
    return (h ^ (h >> 32)) & 31


def test_nodes_made_under_a_tasks_mapping_are_untracked_too(loop_kind):
    """Where another variable holds our variable's slot in the first level of the mapping
    (a ContextVar's hash comes from its address: with decimal's context, about one process
    in 25), the two share a node one level down, and tagging a task makes that node anew
    too.  It leaves the collector's lists and its count with the mapping: left there, every
    task held one more tracked object, and a task tree ran ~10% more collections in those
    processes (tests/test_collector.py's count check failed there)."""
    seen = {}

    def ours_tracked(tag):
        """Tracked state of every object of the running context's mapping that leads to tag."""
        (mapping,) = gc.get_referents(contextvars.copy_context())

        def walk(o):
            below = [walk(r) for r in gc.get_referents(o) if type(r).__name__.startswith("hamt")]
            leads = tag in gc.get_referents(o) or any(b is not None for b in below)
            return [gc.is_tracked(o)] + [x for b in below if b for x in b] if leads else None

        return walk(mapping)

    async def probe(key, tag):
        seen[key] = ours_tracked(tag)

    async def count_per_task():
        """The collector's count moved by making 200 pending tasks (the collector off)."""
        gc.disable()
        try:
            before = gc.get_count()[0]
            tasks = [asyncio.create_task(asyncio.sleep(0)) for _ in range(200)]
            after = gc.get_count()[0]
        finally:
            gc.enable()
        await asyncio.gather(*tasks)
        return after - before

    async def main():
        # a variable of another slot, then one of the same slot as ours
        others = [contextvars.ContextVar(f"other{i}") for i in range(2_000)]
        apart = next(v for v in others if _slot(v) != _slot(TAG))
        same = next(v for v in others if _slot(v) == _slot(TAG))
        apart.set("x")
        counts = [await count_per_task() for _ in range(3)]
        await asyncio.create_task(probe("apart", TAG))
        same.set("y")
        counts += [await count_per_task() for _ in range(3)]
        await asyncio.create_task(probe("same slot", TAG))
        return counts

    counts = contextvars.Context().run(run_profiled, main, loop_kind)[0]
    assert seen["apart"] == [False, False]  # the mapping and its root
    # and the node one level down (or more: about one process in 32 the two variables'
    # hashes share the next level's slot too, and the mapping gets a node per level)
    assert len(seen["same slot"]) >= 3 and not any(seen["same slot"]), seen["same slot"]
    # the node is off the count too: 200 tasks move it as much as with the slots apart
    # (within a few: kept mappings let go), not 200 more
    assert abs(counts[5] - counts[2]) < 50, counts


def test_cycles_through_a_tasks_context_are_collected(loop_kind):
    """task -> its context -> mapping -> value (or key's default) -> task: garbage the
    collector must still find."""
    refs = []

    async def joins(box):
        box.append(asyncio.current_task())  # a value in our context refers back to us
        box.append(Marker())
        refs.append(weakref.ref(box[-1]))

    async def main():
        box = []
        HOLDER.set(box)
        await asyncio.create_task(joins(box))

    async def main_default():
        box = []
        var = contextvars.ContextVar("with_default", default=box)
        var.set("x")  # in the mapping as a key, with a string; its default refers back
        await asyncio.create_task(joins(box))

    gc.collect()
    run_profiled(main, loop_kind)
    run_profiled(main_default, loop_kind)
    gc.collect()
    assert len(refs) == 2
    assert [r() for r in refs] == [None, None]


def test_tasks_that_leave_cycles_are_collected_automatically():
    """Each task leaves one small reference cycle.  The collector's trigger must see the
    same allocations as without us (taking our mappings off its count twice, when made and
    when freed, once stopped automatic collections here altogether)."""

    class Node:
        pass

    async def leaves_a_cycle():
        n = Node()
        n.me = n

    def run(runner):
        async def main():
            for _ in range(5_000):
                await asyncio.create_task(leaves_a_cycle())
            return sum(1 for o in gc.get_objects() if type(o) is Node)

        gc.collect()
        return runner(main)

    plain = run(lambda m: asyncio.run(m()))
    profiled = run(lambda m: run_profiled(m)[0])
    assert plain < 2_000, plain  # the collector ran during the loop
    assert profiled < 2_000, (plain, profiled)


_COLLECTIONS_SCRIPT = """
import asyncio, gc, json, sys
sys.path.insert(0, sys.argv[1])
from conftest import run_profiled

async def node(depth):
    if depth:
        await asyncio.gather(*(node(depth - 1) for _ in range(6)))

def collections(run):
    async def main():
        await node(1)  # warm: the first tasks make caches, interned names, ...
        before = sum(g["collections"] for g in gc.get_stats())
        await node(5)
        return sum(g["collections"] for g in gc.get_stats()) - before
    return run(main)

gc.collect()
plain = collections(lambda m: asyncio.run(m()))
profiled = collections(lambda m: run_profiled(m)[0])
print(json.dumps([plain, profiled]))
"""


@pytest.mark.skipif(
    sys.version_info < (3, 12),
    reason="3.11 sees a task end through a done callback, which costs the awaiting task a list and a tuple",
)
def test_the_collector_runs_as_often_as_without_the_profiler():
    """Collections over a 9,331-task tree (the collector's trigger counts allocations of
    tracked objects): the two mappings per task we make must not add to it.  In a fresh
    interpreter: which collections come as full ones depends on how many objects earlier
    tests left alive, and a full one empties the young generations' counts."""
    import json
    import subprocess
    from pathlib import Path

    runs = []
    for _ in range(5):
        out = subprocess.run(
            [sys.executable, "-c", _COLLECTIONS_SCRIPT, str(Path(__file__).parent)],
            capture_output=True, text=True, timeout=300,
        )
        assert out.returncode == 0, out.stderr
        runs.append(tuple(json.loads(out.stdout.strip().splitlines()[-1])))
    plain, profiled = sorted(runs, key=lambda r: r[1] / r[0])[2]  # the median run
    assert plain > 20  # the tree does exercise the collector
    # (~8% more on 3.12, e.g. 141 against 130; 19% before the mappings were given their
    # count back).  The median of five fresh interpreters: where the collections fall
    # depends on everything allocated before (hash seeds, paths), and ~3% of interpreters
    # see ~10 more, e.g. 152 (found by PYTHONHASHSEED; until session 23 also every
    # process whose mapping had a node below its root, now untracked too: the test above).
    assert profiled <= plain * 1.10 + 2, runs


@pytest.mark.parametrize("eager", [False, True], ids=["tasks", "eager-tasks"])
@pytest.mark.parametrize("mode", ["exact", "sampled"])
def test_allocated_blocks_count_stays_balanced(mode, eager):
    # Our own objects of a context's size (the mapping that holds a task's Tag) may come
    # from the raw allocator instead of pymalloc's pools; pymalloc counts such a block
    # out of sys.getallocatedblocks() when the program frees it, so it must have been
    # counted in.  10,000 tasks come and go: the count does not sink.  With eager tasks
    # (3.12+), most end inside create_task and the mappings made meanwhile come from
    # pymalloc, while the mapping of the task running them came from the raw allocator.
    if eager and sys.version_info < (3, 12):
        pytest.skip("eager tasks are 3.12+")
    import memscope_async as ms
    from memscope_async.attribution import _core

    async def leaf():
        return 1

    async def burst():
        return sum(await asyncio.gather(*(leaf() for _ in range(2_000))))

    async def main():
        if eager:
            asyncio.get_running_loop().set_task_factory(asyncio.eager_task_factory)
        await burst()  # warm-up: caches, the tracker's first tables
        gc.collect()
        before = sys.getallocatedblocks()
        for _ in range(5):
            assert await burst() == 2_000
        gc.collect()
        return before, sys.getallocatedblocks()

    prof = ms.Profiler(mode=mode, max_finished_tasks=100).start()
    try:
        with asyncio.Runner(loop_factory=prof.loop_factory()) as runner:
            before, after = runner.run(main())
        raw = _core.stats()["own_objects_raw"]
    finally:
        prof.stop()
        prof.close()
    # 1-2 such objects per task: 7,000-10,000 blocks fewer if they were not counted in
    # (the tracker's own tables and the tasks it keeps may add a few thousand)
    assert after - before > -3_000, (before, after, raw)
    # (only where pymalloc itself is the object allocator: not under PYTHONMALLOC=debug,
    # malloc, or -X dev, whose hooks the raw blocks must not reach)
    pymalloc = os.environ.get("PYTHONMALLOC", "pymalloc") == "pymalloc" and not sys.flags.dev_mode
    if sys.version_info >= (3, 12) and pymalloc:
        assert raw == 1
