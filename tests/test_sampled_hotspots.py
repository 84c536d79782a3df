"""Sampled mode accuracy, hotspots, groups, leak suspects and bounded memory."""

from __future__ import annotations

import asyncio
import itertools
import linecache
import random
import statistics
import sys
import threading

import pytest

import memscope_async as ms

from conftest import KiB, MiB, close_to, run_profiled

KEEP: list = []


def size_plan(total: int, keep_every: int, seed: int) -> tuple[list[tuple[int, bool]], int, int]:
    """Pieces of 100 B .. 64 KiB adding up to about ``total`` bytes, every n-th one kept,
    and the true (allocated, live) bytes they cost.  Built outside the profiled task so
    the task allocates nothing but the pieces themselves."""
    import sys

    rng = random.Random(seed)
    header = sys.getsizeof(b"")
    plan = [(rng.randint(100, 64 * KiB), i % keep_every == 0) for i in range(total // (32 * KiB))]
    allocated = sum(n + header for n, _ in plan)
    live = sum(n + header for n, keep in plan if keep)
    return plan, allocated, live


async def sized_allocs(plan: list[tuple[int, bool]]) -> None:
    """Allocate the planned pieces (no other allocation per piece: no new ints)."""
    for chunk in range(0, len(plan), 256):
        for n, keep in plan[chunk:chunk + 256]:
            b = bytes(n)
            if keep:
                KEEP.append(b)
            del b
        await asyncio.sleep(0)


def test_sampled_estimates_are_unbiased():
    """The issue's accuracy check: at 64 KiB, tasks that allocate >= 64 MiB in pieces of
    100 B .. 64 KiB are estimated within 10% in each of 5 runs, 4% on average.  Sizes:
    measured over 2,000 runs at 128 MiB (half kept), the live estimate's error has a
    standard deviation of 2.6%, as theory says, so 10% is 3.8 sigma: one of the test's
    ten live estimates missed it in 1 of ~180 runs (-10.5%).  At 256 and 320 MiB the
    deviations are 1.9% and 1.7% (live) and the bound is over 5 sigma."""
    errs_alloc, errs_live = [], []
    for run in range(5):
        KEEP.clear()
        plans = {"a": size_plan(256 * MiB, 2, run), "b": size_plan(320 * MiB, 2, run + 100)}
        truth = {name: (alloc, live) for name, (_plan, alloc, live) in plans.items()}

        async def main():
            await asyncio.gather(
                asyncio.create_task(sized_allocs(plans["a"][0]), name="a"),
                asyncio.create_task(sized_allocs(plans["b"][0]), name="b"),
            )

        _, report = run_profiled(main, mode="sampled", sample_interval=64 * KiB, seed=1234 + run)
        assert report.run.estimated and report.run.mode == "sampled"
        for name in ("a", "b"):
            (t,) = report.find(name=name)
            true_alloc, true_live = truth[name]
            ea = t.allocated_bytes / true_alloc - 1
            el = t.live_bytes / true_live - 1
            assert abs(ea) <= 0.10, (run, name, ea)
            assert abs(el) <= 0.10, (run, name, el)
            errs_alloc.append(abs(ea))
            errs_live.append(abs(el))
    assert statistics.mean(errs_alloc) <= 0.04
    assert statistics.mean(errs_live) <= 0.04
    KEEP.clear()


async def grown_lists(n: int) -> int:
    """n lists grown by append to 2,000 items (each a chain of reallocs of its item
    array), every other one kept; returns what they hold at the end."""
    held = 0
    for i in range(n):
        lst = []
        for _ in itertools.repeat(None, 2000):
            lst.append(None)
        held += sys.getsizeof(lst)
        if i % 2:
            KEEP.append(lst)
        if i % 64 == 0:
            await asyncio.sleep(0)
    return held


async def grown_buffers(n: int) -> int:
    """n buffers grown by `+=` from nothing to ~2 MB in 1,000-byte steps, every other one
    kept; returns what they hold at the end."""
    held = 0
    chunk = b"x" * 1000
    for i in range(n):
        b = bytearray()
        for _ in itertools.repeat(None, 2048):
            b += chunk  # GROW-SITE
        held += sys.getsizeof(b)
        if i % 2:
            KEEP.append(b)
        await asyncio.sleep(0)
    return held


def test_sampled_mode_charges_a_realloc_its_growth():
    """A block grown by realloc is charged what it grew by, as in exact mode, not every
    step's full size: a list's item array grown to 2,000 items is realloc'd ~30 times and
    a buffer grown by `+=` ~100 times, which counted in full came to 2.6x and 9x what they
    hold.  Sizes: 4,000 lists of ~16 KB (64 MB) at 64 KiB, whose estimates spread ~3%
    (measured: 100 seeds, sd 3.1%, worst 7.6%; live, half as many bytes: sd 4.3%, worst
    11.4%); the 2 MB buffers are sampled nearly surely.
    The buffers' hotspot is the line that grows them, with what it grew them by."""
    errs = []
    for run in range(5):
        KEEP.clear()

        async def main():
            lists = asyncio.create_task(grown_lists(4000), name="lists")
            bufs = asyncio.create_task(grown_buffers(40), name="bufs")
            return await lists, await bufs

        (lists_made, bufs_made), report = run_profiled(main, mode="sampled", sample_interval=64 * KiB, seed=77 + run)
        (lists,) = report.find(name="lists")
        (bufs,) = report.find(name="bufs")
        # (a task's own frames and coroutine add ~1% in exact mode too)
        errs.append(lists.allocated_bytes / lists_made - 1)
        assert abs(errs[-1]) <= 0.12, (run, lists.allocated_bytes, lists_made)
        assert abs(lists.live_bytes / (lists_made / 2) - 1) <= 0.20, (run, lists.live_bytes, lists_made / 2)
        assert close_to(bufs.allocated_bytes, bufs_made, rel=0.02), (run, bufs.allocated_bytes, bufs_made)
        assert close_to(bufs.live_bytes, bufs_made / 2, rel=0.02), (run, bufs.live_bytes, bufs_made / 2)
        top = bufs.hotspots[0]
        assert "GROW-SITE" in linecache.getline(top.file, top.line), top
        assert close_to(top.bytes, bufs_made, rel=0.05), (run, top, bufs_made)
    assert abs(statistics.mean(errs)) <= 0.06, errs
    KEEP.clear()


def test_exact_hotspots_see_blocks_grow(loop_kind):
    """Exact mode samples a block's growth for its stack as it does a new block: buffers
    grown from their first 1,000 bytes to 2 MB were seen only when that first step was
    sampled (1.5% at 64 KiB), so the task's 80 MB went to its other sites by their samples
    (here the ints `len()` makes, ~2 MB of them)."""
    KEEP.clear()

    async def grow():
        held = 0
        chunk = b"x" * 1000
        for _ in range(40):
            b = bytearray()
            while len(b) < 2048 * 1000:
                b += chunk  # GROW-SITE
            held += sys.getsizeof(b)
            KEEP.append(b)
            await asyncio.sleep(0)
        return held

    async def main():
        return await asyncio.create_task(grow(), name="grow")

    held, report = run_profiled(main, loop_kind, mode="exact", stack_interval=64 * KiB)
    (t,) = report.find(name="grow")
    assert close_to(t.allocated_bytes, held, rel=0.05) and close_to(t.live_bytes, held, rel=0.01), t
    for spots in (t.hotspots, t.live_hotspots):
        top = spots[0]
        assert "GROW-SITE" in linecache.getline(top.file, top.line), spots
        assert close_to(top.live_bytes, held, rel=0.05), (top, held)
    KEEP.clear()


def _made_line(n: int) -> bytearray:
    return bytearray(n)  # MADE-SITE


def _grown_line(b: bytearray, chunk: bytes, steps: int) -> None:
    for _ in itertools.repeat(None, steps):
        b += chunk  # GROWN-SITE


def _trimmed_line(b: bytearray, keep: int) -> None:
    del b[keep:]  # TRIM-SITE


async def made_then_grown(held: list) -> tuple[int, int]:
    """20 buffers made at one line (500 kB) and grown at another (by 2 MB), 20 made at the
    first (4 MB) and shrunk at a third (to 300 kB); all kept.  Returns what the made line
    and the grown line hold."""
    chunk = b"x" * 1000
    made = grown = 0
    for _ in range(20):
        b = _made_line(500_000)
        made += b.__alloc__()
        _grown_line(b, chunk, 2000)
        grown += b.__alloc__() - 500_001
        held.append(b)
        c = _made_line(4_000_000)
        _trimmed_line(c, 300_000)
        made += c.__alloc__()
        held.append(c)
        await asyncio.sleep(0)
    return made, grown


@pytest.mark.parametrize("mode", ["exact", "sampled"])
def test_hotspots_split_a_block_by_the_lines_that_made_it(mode, loop_kind):
    """A buffer made at one line and grown at another is held by both, each for its
    stretch; one shrunk at a third line stays with the line that made it.  Both went
    wrong: exact mode gave the made line the growth too (a sample followed its block);
    sampled mode gave the resizing line all of a block it shrank or grew, with more live
    than it allocated."""
    held: list = []

    async def main():
        return await asyncio.create_task(made_then_grown(held), name="buffers")

    options = {"sample_interval": 64 * KiB, "seed": 5} if mode == "sampled" else {"stack_interval": 64 * KiB}
    (made, grown), report = run_profiled(main, loop_kind, mode=mode, **options)
    (t,) = report.find(name="buffers")
    lines = {}
    for h in t.live_hotspots:
        text = linecache.getline(h.file, h.line)
        tag = next((m for m in ("MADE-SITE", "GROWN-SITE", "TRIM-SITE") if m in text), h.line)
        lines[tag] = h
    assert "TRIM-SITE" not in lines, t.live_hotspots
    # blocks of 300 kB and more are sampled nearly surely at 64 KiB in both modes; over 40
    # seeds the made line's estimate spread 1.2% (worst 4.6%), the grown line's 0.5%
    assert close_to(lines["MADE-SITE"].live_bytes, made, rel=0.08), (lines, made)
    assert close_to(lines["GROWN-SITE"].live_bytes, grown, rel=0.05), (lines, grown)
    # (sampled mode: past 16 stretches of a block the oldest two merge into the line of
    # either, drawn by their bytes, so a line's live estimate may pass its allocated one
    # by a merged stretch; in one full 3.13 run, 42.97 MB live against 42.47 MB)
    for h in t.hotspots:
        assert h.live_bytes <= h.bytes * (1.01 if mode == "exact" else 1.05), h
    del held


def _leaky_line():
    return bytearray(256 * KiB)  # LEAK-SITE


async def leaker():
    KEEP.append(_leaky_line())
    await asyncio.sleep(0)


async def clean():
    x = [bytearray(64 * KiB) for _ in range(4)]
    await asyncio.sleep(0)
    del x


@pytest.mark.parametrize("mode", ["exact", "sampled"])
def test_hotspots_and_leak_suspects(mode, loop_kind):
    KEEP.clear()

    async def main():
        for _ in range(20):
            await asyncio.gather(asyncio.create_task(leaker()), asyncio.create_task(clean()))

    _, report = run_profiled(main, loop_kind, mode=mode, sample_interval=16 * KiB, stack_interval=16 * KiB)
    assert report.run.stacks_sampled == (mode == "exact")
    top = report.leak_suspects[0]
    assert top.coro == "leaker" and top.tasks == 20
    assert close_to(top.retained_bytes, 20 * 256 * KiB, rel=0.25 if mode == "sampled" else 0.01)
    hs = top.hotspots[0]
    src = open(__file__).read().splitlines()
    assert "LEAK-SITE" in src[hs.line - 1] and hs.function == "_leaky_line"
    assert hs.stack[0].function == "_leaky_line" and hs.stack[1].function == "leaker"
    assert hs.live_bytes > 0
    groups = {g.coro: g for g in report.groups}
    assert groups["leaker"].tasks == 20 and groups["clean"].tasks == 20
    assert groups["clean"].retained_after_done_bytes < 64 * KiB
    (glive,) = [h for h in groups["leaker"].live_hotspots if h.function == "_leaky_line"]
    assert "LEAK-SITE" in src[glive.line - 1] and glive.live_bytes > 0
    if mode == "exact":  # sites split the task's exact counts: they never add up to more
        for t in report.tasks:
            assert sum(h.bytes for h in t.hotspots) <= t.allocated_bytes, t
            assert sum(h.live_bytes for h in t.live_hotspots) <= t.live_bytes, t
    for lists in ([t.hotspots, t.live_hotspots] for t in report.tasks):
        for hs_list in lists:  # one row per source line: instructions of a line are one site
            sites = [(h.file, h.line, h.function) for h in hs_list]
            assert len(sites) == len(set(sites)), sites
    d = groups["leaker"].allocated_bytes
    assert d.p50 <= d.p95 <= d.max <= d.sum
    KEEP.clear()


def _ten_made_one_kept():
    for i in range(10):
        buf = bytearray(MiB)  # CHURN-AND-KEEP
        if i == 3:
            KEEP.append(buf)


async def keeps_one_of_ten():
    _ten_made_one_kept()
    await asyncio.sleep(0)


@pytest.mark.parametrize("mode", ["exact", "sampled"])
def test_a_leak_suspects_hotspot_says_what_its_line_still_holds(mode, loop_kind):
    """A line that made ten 1 MiB buffers and kept one holds 1 MiB: a leak suspect's
    hotspot, 'what is still held', says 1 MiB, not the 10 MiB the line made."""
    KEEP.clear()

    async def main():
        for _ in range(3):
            await asyncio.create_task(keeps_one_of_ten())

    _, report = run_profiled(main, loop_kind, mode=mode, sample_interval=16 * KiB, stack_interval=16 * KiB)
    top = report.leak_suspects[0]
    assert top.coro == "keeps_one_of_ten"
    hs = top.hotspots[0]
    src = open(__file__).read().splitlines()
    assert "CHURN-AND-KEEP" in src[hs.line - 1]
    rel = 0.01 if mode == "exact" else 0.05
    assert close_to(hs.bytes, 3 * MiB, rel=rel) and hs.bytes == hs.live_bytes, hs
    (t,) = report.find(coro="keeps_one_of_ten")[:1]
    # a task's hotspots by allocated bytes still say what the line made
    assert close_to(t.hotspots[0].bytes, 10 * MiB, rel=rel), t.hotspots[0]
    KEEP.clear()


async def one_site(plan):
    await sized_allocs(plan)


def test_sampled_hotspots_are_scaled_like_the_task_estimates(loop_kind):
    """Each sample stands for 1/(1-exp(-size/R)) blocks in the hotspots too: the one site
    of a task that allocates ~64 MiB (keeping a quarter) is reported at about the task's
    bytes, not at the sum of the sampled sizes (~1/20 of it at R = 64 KiB).  Expected
    relative error ~1/sqrt(bytes/R): 3% allocated, 6% live; the bounds are 4 sigma."""
    KEEP.clear()
    plan, allocated, live = size_plan(64 * MiB, 4, seed=7)

    async def main():
        await asyncio.create_task(one_site(plan), name="one-site")

    _, report = run_profiled(main, loop_kind, mode="sampled", sample_interval=64 * KiB)
    (t,) = report.find(name="one-site")
    sites = [h for h in t.hotspots if h.function == "sized_allocs"]
    assert sites, t.hotspots
    assert close_to(sum(h.bytes for h in sites), allocated, rel=0.13), (sum(h.bytes for h in sites), allocated)
    live_sites = [h for h in t.live_hotspots if h.function == "sized_allocs"]
    assert close_to(sum(h.live_bytes for h in live_sites), live, rel=0.25), (live_sites, live)
    KEEP.clear()


async def maybe_leaks(k: int) -> None:
    # tuples, floats and a list made and dropped: CPython keeps their memory in free lists
    scratch = [(k, float(k) * 1.5, (k, k + 1.0)) for _ in range(200)]
    del scratch
    buf = bytearray(100_000)
    if k % 2:
        KEEP.append(buf)


def test_leak_suspects_count_only_the_tasks_that_hold_memory(loop_kind):
    """10 of 20 tasks keep a 100 KB buffer; the other 10 make and drop small objects whose
    memory CPython keeps in free lists.  The suspect counts the 10, and its retained bytes
    are theirs (the collection at stop empties the free lists)."""
    KEEP.clear()

    async def main():
        await asyncio.gather(*(asyncio.create_task(maybe_leaks(k)) for k in range(20)))

    _, report = run_profiled(main, loop_kind)
    (suspect,) = [s for s in report.leak_suspects if s.coro == "maybe_leaks"]
    held = sorted(t.retained_after_done_bytes for t in report.find(coro="maybe_leaks"))
    assert all(close_to(b, 100_000, abs_=512) for b in held[-10:]), held
    # without the collection at stop, 1-9 of the others held free-list bytes (48-160 B
    # each).  In a fresh process none does; after a long test session one may still hold
    # a block no stack sample names (a global table grown while it ran): the bound is 1.
    small = [b for b in held[:10] if b > 0]
    assert len(small) <= 1 and sum(small) < 1024, held
    assert suspect.tasks == 10 + len(small)
    assert close_to(suspect.retained_bytes, 10 * 100_000, rel=0.01, abs_=4 * KiB), suspect.retained_bytes
    KEEP.clear()


def test_many_tasks_fold_with_bounded_records():
    KEEP.clear()

    async def tiny(i):
        return [i] * 10

    async def big():
        KEEP.append(bytearray(MiB))

    async def main():
        await asyncio.create_task(big())
        for _ in range(20):
            await asyncio.gather(*(asyncio.create_task(tiny(i)) for i in range(1000)))

    _, report = run_profiled(main, max_finished_tasks=500)
    assert report.totals.folded_tasks > 15_000
    # bounded regardless of the 20,001 tasks run (a few hold freelist-cached blocks and stay)
    assert len(report.tasks) < 2500
    assert report.totals.tasks == len(report.tasks) + report.totals.folded_tasks
    assert report.find(coro="test_many_tasks_fold_with_bounded_records.<locals>.big")  # kept: it holds memory
    (g,) = [g for g in report.groups if g.coro and g.coro.endswith("tiny")]
    assert g.tasks == 20_000 and g.folded_tasks > 15_000
    KEEP.clear()


def _churn_site():
    return bytearray(64 * KiB)  # CHURN-SITE


async def churner():
    for _ in range(4):
        _churn_site()
        await asyncio.sleep(0)


@pytest.mark.parametrize("mode", ["exact", "sampled"])
def test_folded_tasks_keep_their_sites_in_their_group(mode):
    """600 tasks each churn 256 KiB at one line; all but 20 fold.  The group's hotspots
    still count the folded ones' bytes, and the site table does not hold a site per task
    (it grows with stacks, not with tasks: a service runs millions)."""
    from memscope_async.attribution import _core

    async def main():
        for _ in range(6):
            await asyncio.gather(*(asyncio.create_task(churner()) for _ in range(100)))

    prof = ms.Profiler(mode=mode, max_finished_tasks=20, stack_interval=16 * KiB, sample_interval=16 * KiB)
    prof.start()
    try:
        with asyncio.Runner(loop_factory=prof.loop_factory()) as runner:
            runner.run(main())
    finally:
        prof.stop()
    try:
        report = prof.snapshot()
        n_sites = len(_core.stack_samples()[0])
    finally:
        prof.close()
    (g,) = [g for g in report.groups if g.coro == "churner"]
    assert g.folded_tasks >= 500
    sites = [h for h in g.hotspots if h.function == "_churn_site"]
    assert sites, g.hotspots
    # 600 x 256 KiB; ~9,600 samples at 16 KiB: a few % expected error
    assert close_to(sum(h.bytes for h in sites), 600 * 256 * KiB, rel=0.15), sum(h.bytes for h in sites)
    assert 0 < n_sites < 200, n_sites  # 600+ before folded tasks handed their sites over


def _shrunk_buffer():
    b = bytearray(256 * KiB)  # SHRINK-SITE
    del b[100:]  # a major downsize: the buffer is realloc'd to 101 bytes
    return b


def _anchor_buffer():
    return bytes(256 * KiB)  # ANCHOR-SITE


async def shrinker(held: list) -> None:
    for i in range(200):
        held[i] = _shrunk_buffer()
        if i % 5 == 0:
            held[200 + i // 5] = _anchor_buffer()
        await asyncio.sleep(0)


def test_exact_stack_samples_follow_realloc(loop_kind):
    """A sampled block that its task shrinks keeps its sample's weight.  Exact mode splits
    the task's exact live bytes over its sites by their sampled live bytes, so what is
    checked is that split: 200 buffers shrunk from 256 KiB to 101 bytes (~31 KB held with
    their bytearray objects) beside 40 kept 256 KiB buffers (10.5 MB).  Re-weighted as
    fresh 101-byte samples (x ~650 at 64 KiB: ~13 MB), the shrunk ones would take more than
    half of the task's 10.5 MB; followed, they get about the 20 KB of their buffers (the
    57-byte objects, sampled ~one time in 6 as 64 KB, add 0 or 2x).  The kept buffers give
    the split something to go by, and at 256 KiB each is sampled nearly surely, so their
    estimate is within a few % (64 KiB ones, sampled with p = 0.63, were off by 24% in ~2%
    of runs, which with no object sampled put the shrunk site under half its truth).  Up
    to four object samples at the shrink site (~1 run in 1,000) keep it under 10x."""
    held: list = [None] * 240  # no list growth in the task: nothing live but the buffers

    async def main():
        await asyncio.create_task(shrinker(held), name="shrinker")

    _, report = run_profiled(main, loop_kind, mode="exact", stack_interval=64 * KiB)
    (t,) = report.find(name="shrinker")
    header = sys.getsizeof(bytearray(0))
    shrunk_live, anchor_live = 200 * (101 + header), 40 * (256 * KiB + sys.getsizeof(b""))
    assert close_to(t.live_bytes, shrunk_live + anchor_live, rel=0.01, abs_=4 * KiB), t.live_bytes
    shrunk = [h for h in t.hotspots if h.function == "_shrunk_buffer"]
    assert shrunk, t.hotspots
    live = sum(h.live_bytes for h in shrunk)
    assert shrunk_live * 0.5 <= live <= shrunk_live * 10, live
    anchor = sum(h.live_bytes for h in t.live_hotspots if h.function == "_anchor_buffer")
    assert close_to(anchor, anchor_live, rel=0.1), anchor
    allocated = sum(h.bytes for h in shrunk)
    assert close_to(allocated, 200 * 256 * KiB, rel=0.25), allocated
    del held


def test_sampled_restart_samples_threads_that_outlive_a_session():
    """A thread that outlives a session samples at the next session's interval from its
    first allocation there: a countdown left from a 1 GiB session would hide its 20 MB."""
    go, done, stop = threading.Event(), threading.Event(), threading.Event()

    def worker():
        while True:
            go.wait()
            go.clear()
            if stop.is_set():
                return
            keep = [None] * 20_000  # no list growth: sampled mode counts a realloc in full
            for i in range(20_000):
                keep[i] = bytes(1000)
            del keep
            done.set()

    t = threading.Thread(target=worker, name="outliving-worker")
    t.start()

    def session(interval: int):
        p = ms.Profiler(mode="sampled", sample_interval=interval)
        p.start()
        try:
            done.clear()
            go.set()
            assert done.wait(60)
        finally:
            p.stop()
        return sum(th.attributed_bytes + th.unattributed_bytes for th in p.snapshot().threads if th.id == t.ident)

    try:
        session(1 << 30)
        truth = 20_000 * (1000 + sys.getsizeof(b""))
        got = session(4 * KiB)
        assert close_to(got, truth, rel=0.10), (got, truth)
    finally:
        stop.set()
        go.set()
        t.join()


async def churn_then_keep() -> None:
    # itertools.repeat: no int objects made by the loops (blocks no stack sample may name,
    # whose counts the ratio estimators would spread over the sites that are sampled)
    await asyncio.sleep(0)
    for _ in itertools.repeat(None, 400):
        x = bytearray(50_000)  # CHURN-SITE
    del x
    KEEP.append([bytearray(40_000) for _ in itertools.repeat(None, 200)])  # KEPT-SITE
    await asyncio.sleep(0)


def test_exact_hotspots_split_freed_and_live_bytes_apart():
    """Exact mode counts a task's bytes exactly and takes stacks from samples; the sites
    split the exact counts.  What is live goes by the live samples and what was freed by
    the freed ones, so a site never shows more live bytes than it allocated (one ratio for
    allocated bytes put 5.5-8.7 MB at the kept site, which holds 8.0 MB live, and 282-1,116
    allocations where there are 401).

    The split is an estimate.  A sample of a ~60-byte block stands for ~4,400 blocks
    (mean interval 256 KiB), so in about 1 run in 100 one such sample at another site of
    the task (it frees ~20 small blocks besides the 800 here) takes most of the freed
    count, or of the live bytes, from the sites below.  Which runs do depends on every
    byte the process allocated before (paths, hash seeds), not only on the sampler's
    seed.  So each run must keep the bounds that always hold, and 17 of 20 runs (and the
    medians) the estimates' tolerances: a split that is wrong most of the time fails, one
    unlucky sample does not (4 misses in 20 at 1 in 100: ~5e-5)."""
    src = open(__file__).read().splitlines()
    header = sys.getsizeof(bytearray(0))
    kept_bytes, churn_bytes = 200 * (40_000 + header), 400 * (50_000 + header)
    runs = []
    for seed in range(1, 21):
        KEEP.clear()

        async def main():
            await asyncio.create_task(churn_then_keep(), name="churn")

        _, report = run_profiled(main, seed=seed)
        (t,) = report.find(name="churn")
        site = {}
        for h in t.hotspots:
            assert h.bytes >= h.live_bytes, (seed, h)
            for tag in ("CHURN-SITE", "KEPT-SITE"):
                if h.file == __file__ and tag in src[h.line - 1]:
                    site[tag] = h
        kept, churn = site["KEPT-SITE"], site["CHURN-SITE"]
        # always: nothing made at the churn site is live, and the sites add up to the task
        assert churn.live_bytes == 0, (seed, churn)
        assert sum(h.allocations for h in t.hotspots) <= t.allocations + len(t.hotspots), (seed, t)
        assert sum(h.bytes for h in t.hotspots) <= t.allocated_bytes + len(t.hotspots), (seed, t)
        runs.append((kept.live_bytes, kept.bytes, churn.bytes, kept.allocations, churn.allocations))
    KEEP.clear()
    # counts split the same way: the blocks still live (200 objects, their 200 buffers and
    # the list) by the live samples, the freed ones (400 objects and buffers) by the rest
    checks = [
        lambda r: close_to(r[0], kept_bytes, rel=0.02),
        lambda r: close_to(r[1], kept_bytes, rel=0.05),
        lambda r: close_to(r[2], churn_bytes, rel=0.05),
        lambda r: abs(r[3] - 401) <= 8,
        lambda r: abs(r[4] - 800) <= 40,
    ]
    for i, ok in enumerate(checks):
        assert sum(map(ok, runs)) >= 17, (i, runs)
        median = tuple(statistics.median(r[j] for r in runs) for j in range(5))
        assert ok(median), (i, median, runs)


async def returns_a_result(k: int) -> tuple:
    buf = bytearray(50_000)
    del buf
    return (k, float(k))  # kept by gather's result list after the task ends: a few bytes


async def keeps_a_buffer() -> None:
    KEEP.append(bytearray(200_000))


async def keeps_a_little() -> None:
    KEEP.append(bytearray(1_000))


@pytest.mark.parametrize("mode", ["exact", "sampled"])
def test_leak_suspects_leave_out_groups_that_hold_next_to_nothing(mode, loop_kind):
    """A group whose finished tasks hold only a few bytes each (results their awaiter
    keeps, a small share of what they allocated) is not a leak suspect; its retained
    bytes stay in its group.  A small leak that is most of what its tasks allocated is.  In sampled mode,
    which tasks hold memory is not known (most hold no sample): a suspect counts all its
    finished tasks there.  (And there one sample that lands on those few bytes stands for
    ~64 KiB: such a group may show, below the real leak, ~20% of runs here.)"""
    KEEP.clear()
    results = []

    async def main():
        results.extend(await asyncio.gather(*(returns_a_result(k) for k in range(200))))
        await asyncio.gather(*(keeps_a_buffer() for _ in range(30)))
        await asyncio.gather(*(keeps_a_little() for _ in range(10)))

    _, report = run_profiled(main, loop_kind, mode=mode, sample_interval=64 * KiB)
    suspects = {s.coro: s for s in report.leak_suspects}
    assert suspects["keeps_a_buffer"].tasks == 30
    assert report.leak_suspects[0].coro == "keeps_a_buffer"
    if mode == "exact":
        assert "returns_a_result" not in suspects, suspects
        # a small leak is still one when it is most of what its tasks allocated
        assert suspects["keeps_a_little"].tasks == 10
        assert close_to(suspects["keeps_a_little"].retained_bytes, 10 * 1_000, rel=0.15, abs_=0)
        (g,) = [g for g in report.groups if g.coro == "returns_a_result"]
        assert 0 < g.retained_after_done_bytes < 64 * KiB
    KEEP.clear()


def test_group_percentiles_interpolate():
    sizes = [100_000, 200_000, 300_000, 400_000]

    async def alloc(n: int) -> None:
        b = bytearray(n)
        del b

    async def main():
        for n in sizes:
            await asyncio.create_task(alloc(n))

    _, report = run_profiled(main)
    (g,) = [g for g in report.groups if g.coro and g.coro.endswith("alloc")]
    per_task = sorted(t.allocated_bytes for t in report.tasks if t.coro and t.coro.endswith("alloc"))
    assert g.allocated_bytes.p50 == round(statistics.median(per_task))
    assert 300_000 < g.allocated_bytes.p95 < g.allocated_bytes.max == per_task[-1]
    assert g.allocated_bytes.p95 == round(per_task[2] + (per_task[3] - per_task[2]) * 0.85)


async def two_hundred_k() -> None:
    x = [bytes(2_000) for _ in itertools.repeat(None, 100)]  # GROUP-SITE
    await asyncio.sleep(0)
    del x


@pytest.mark.parametrize("max_finished", [100_000, 10])
def test_exact_group_hotspots_split_the_groups_exact_bytes(max_finished):
    """Exact mode: a group's sites split the group's exact bytes over all its tasks'
    samples together.  1,000 tasks of ~200 KB at one site, stacks every 256 KiB: most
    tasks hold no sample of their own, and split task by task their bytes went nowhere
    (the site showed 55% of them); with the tasks folded, their raw estimates beside the
    kept tasks' exact splits came to more than the group (640 MB of 615 MB)."""

    async def main():
        for start in range(0, 1_000, 250):
            await asyncio.gather(*(asyncio.create_task(two_hundred_k()) for _ in range(250)))

    _, report = run_profiled(main, max_finished_tasks=max_finished)
    (g,) = [g for g in report.groups if g.coro == "two_hundred_k"]
    assert g.tasks == 1_000 and (g.folded_tasks > 900) == (max_finished == 10), g.folded_tasks
    src = open(__file__).read().splitlines()
    site = [h for h in g.hotspots if h.file == __file__ and "GROUP-SITE" in src[h.line - 1]]
    assert site, g.hotspots
    truth = 1_000 * 100 * (2_000 + sys.getsizeof(b""))
    assert close_to(sum(h.bytes for h in site), truth, rel=0.03), (sum(h.bytes for h in site), truth)
    assert sum(h.bytes for h in g.hotspots) <= g.allocated_bytes.sum, (g.hotspots, g.allocated_bytes)


def _three_sites(keep: list) -> None:
    for _ in range(600):
        keep.append(bytes(5_000))
    for _ in range(2_000):
        x = bytes(1_000)
        del x
    for _ in range(50):
        keep.append(bytes(20_000))


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_exact_hotspots_never_add_up_to_more_than_their_task(loop_kind):
    """Each site's share of a task's exact counts was rounded on its own, so three sites
    of x.5 bytes could add up to one byte (or one allocation) more than the task (about
    one task in ten).  Shares are now apportioned: they add up to the task's total."""
    keep: list = []

    async def work():
        _three_sites(keep)
        await asyncio.sleep(0)
        _three_sites(keep)

    async def main():
        await asyncio.gather(*(asyncio.create_task(work()) for _ in range(30)))

    _, report = run_profiled(main, loop_kind, stack_interval=4 * KiB)
    tasks = [t for t in report.tasks if t.coro and t.coro.endswith(".work")]
    assert len(tasks) == 30
    for t in tasks:
        assert t.hotspots and t.live_hotspots
        assert sum(h.bytes for h in t.hotspots) <= t.allocated_bytes, (t.allocated_bytes, t.hotspots)
        assert sum(h.allocations for h in t.hotspots) <= t.allocations, (t.allocations, t.hotspots)
        assert sum(h.live_bytes for h in t.live_hotspots) <= t.live_bytes, (t.live_bytes, t.live_hotspots)
        # the three sites hold nearly all of it: the shares are not just rounded down
        assert sum(h.bytes for h in t.hotspots) >= t.allocated_bytes * 0.95


_MAP_FULL = r'''
import ctypes, gc, resource, sys
import memscope_async as ms
from memscope_async.attribution import _core

api = ctypes.pythonapi
alloc, resize, free = api.PyMem_Malloc, api.PyMem_Realloc, api.PyMem_Free
alloc.restype = resize.restype = ctypes.c_void_p
alloc.argtypes = [ctypes.c_size_t]
resize.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
free.argtypes = [ctypes.c_void_p]
mode = sys.argv[1]
options = dict(mode=mode, stack_interval=512, seed=1)
if mode == "sampled":
    options["sample_interval"] = 512
gc.disable()
prof = ms.Profiler(**options).start()
block = resize(alloc(100_000), 200_000)  # two stretches
for x in [resize(alloc(600), 1300) for _ in range(6000)]:
    free(x)  # the sample tables grow; glibc keeps the freed chunks for later
ints = [10**30 + i for i in range(64_000)]
del ints[::2]  # pymalloc keeps its arenas half free for the list below
held = [0] * 16_000

def mapped() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))

soft, hard = resource.getrlimit(resource.RLIMIT_AS)
resource.setrlimit(resource.RLIMIT_AS, (mapped(), hard))  # no new mapping from here on
for i in range(len(held)):
    held[i] = alloc(600)  # samples until the index of live samples is half full
block = resize(block, 50_000)  # a shrink re-points the block's key in that index
resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
free(block)
for x in held:
    free(x)
print([s for s in _core.stack_samples()[0] if s[4] < -1])
prof.stop()
prof.close()
'''


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc/self/status")
@pytest.mark.parametrize("mode", ["exact", "sampled"])
def test_a_shrink_with_no_memory_left_keeps_the_sample_tables_whole(mode, tmp_path):
    """Re-pointing a key of the index of live samples needs no memory: a shrink that
    drops a block's newest stretch, with the index half full and no memory to grow it,
    left the index naming the released stretch, and the block's free released it again (a
    site's live bytes went negative, its count of live samples wrapped).  Run in a child
    whose address space is capped (helper-40's review)."""
    import os
    import subprocess

    script = tmp_path / "map_full.py"
    script.write_text(_MAP_FULL)
    env = dict(os.environ, MALLOC_TRIM_THRESHOLD_="4000000000")
    out = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_exact_hotspots_count_a_growing_tasks_allocations():
    """Exact mode splits a task's exact allocation count over its sites by their sampled
    counts; a task whose stack samples are all of a block growing (which counts no
    allocation) had hotspots with 0 allocations beside its ~1,800 (helper-41's review).
    At 1 MiB the 8 MB buffer's growth is sampled ~8 times (none: e^-8) and the loop's ints
    (~57 kB) one run in ~18."""
    chunk = bytes(4096)

    async def grow():
        b = bytearray()
        for _ in range(2048):  # ints above 256 are allocated here
            b += chunk
        KEEP.append(b)

    async def main():
        await asyncio.create_task(grow(), name="grow")

    for seed in range(5):
        KEEP.clear()
        _, report = run_profiled(main, mode="exact", stack_interval=MiB, seed=seed)
        (t,) = report.find(name="grow")
        assert t.hotspots, t
        assert sum(h.allocations for h in t.hotspots) == t.allocations, (seed, t.allocations, t.hotspots)
        assert sum(h.bytes for h in t.hotspots) == t.allocated_bytes, (seed, t.allocated_bytes, t.hotspots)
    KEEP.clear()


def _build_text(steps: int) -> int:
    s = ""
    chunk = "x" * 1000
    for _ in itertools.repeat(None, steps):
        s += chunk  # resized in place at every step: one realloc a step
    KEEP.append(s)
    return len(s)


def test_sampled_mode_keeps_few_stretches_of_a_block_resized_at_every_step():
    """A str grown by `+=` is resized at every step, and a big one is sampled again each
    time: sampled mode kept one more stretch of it per step, and walked them all at each
    resize (40,000 steps: 40,000 stretches, quadratic time).  A stretch grown at the line
    of the one below it now extends that one, and a block keeps at most 16: the tracker's
    own memory is the same for 2,000 steps as for 40,000."""
    memory = {}
    for steps in (2_000, 40_000):
        KEEP.clear()

        async def main():
            return _build_text(steps)

        held, report = run_profiled(main, mode="sampled", sample_interval=64 * KiB, seed=2)
        assert close_to(report.totals.live_bytes, held, rel=0.05), (steps, report.totals.live_bytes, held)
        memory[steps] = report.run.tracker_bytes
    assert memory[40_000] <= memory[2_000] + 256 * KiB, memory  # 40,000 slots of 40 bytes: 1.6 MB
    KEEP.clear()


def _build_at_two_lines(steps: int) -> str:
    s = ""
    chunk = "x" * 1000
    for i in range(steps):
        if i % 2:
            s += chunk  # LINE-A
        else:
            s += chunk  # LINE-B
    return s


def test_sampled_stretches_merge_without_favouring_a_line():
    """A str grown at two lines in turn keeps 16 stretches; older ones are merged two at a
    time into one of the two lines, drawn by their bytes.  Merged always into the bigger
    one's line, the first merge's line took every later one, and line A (or B, in every
    run alike) held all the live bytes (helper-42's review).  Drawn, each run gives most
    to one line or the other, and line A's share averages a half (20 runs: sd ~0.11)."""
    shares = []
    for seed in range(20):
        KEEP.clear()

        async def main():
            KEEP.append(_build_at_two_lines(2000))

        _, report = run_profiled(main, mode="sampled", sample_interval=512, seed=seed)
        t = max(report.tasks, key=lambda t: t.live_bytes)
        live = {}
        for h in t.live_hotspots:
            text = linecache.getline(h.file, h.line)
            for tag in ("LINE-A", "LINE-B"):
                if tag in text:
                    live[tag] = live.get(tag, 0) + h.live_bytes
        assert close_to(sum(live.values()), sys.getsizeof(KEEP[0]), rel=0.02), (live, t.live_bytes)
        shares.append(live.get("LINE-A", 0) / sum(live.values()))
    assert 0.17 <= statistics.mean(shares) <= 0.83, shares
    KEEP.clear()
