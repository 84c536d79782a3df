"""Aggregation: flat records and C counters in, a :class:`Report` out.

Everything here runs when a report is asked for, never on the hot path.  Inputs:

* the registry's task records (who, parent, labels, times, state);
* ``_core.cells()``: counters per (task, thread, route, phase);
* ``_core.tasks()``: peak live bytes per task;
* ``_core.threads()`` and the thread names noted while profiling;
* ``_core.stack_samples()``: sampled stacks per (task, stack);
* the aggregates of tasks folded away to bound memory.
"""

from __future__ import annotations

import functools
import math
import os
import platform
import random
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from . import routes
from .report import (
    AttributionShare,
    Distribution,
    Frame,
    Group,
    Hotspot,
    LeakSuspect,
    Migration,
    Report,
    RunInfo,
    SubtreeCounters,
    TaskReport,
    ThreadReport,
    Totals,
    Unattributed,
    UnattributedThread,
)

__all__ = ["RawData", "FoldedGroup", "build_report", "group_key"]

TOP_HOTSPOTS = 10
# A group is a leak suspect when its finished tasks still hold at least LEAK_MIN_BYTES, or
# at least LEAK_MIN_SMALL_BYTES that are LEAK_MIN_SHARE or more of all they allocated.
# Below that, what they hold is the noise of any program (a result object kept by its
# awaiter, a cache entry: a few dozen bytes a task, a small share of what it allocated);
# the share lets a small program's small leak show (10 tasks keeping 1 KB each hold ~88%
# of what they allocated).  64 KiB is also the absolute tolerance for a task's
# own counts.  Every group keeps its retained_after_done_bytes either way.
LEAK_MIN_BYTES = 64 * 1024
LEAK_MIN_SMALL_BYTES = 4 * 1024
LEAK_MIN_SHARE = 0.25


def _leaks(retained: int, allocated: int) -> bool:
    return retained >= LEAK_MIN_BYTES or (
        retained >= LEAK_MIN_SMALL_BYTES and retained >= LEAK_MIN_SHARE * allocated
    )


@dataclass
class FoldedGroup:
    """Counters of finished tasks folded out of the registry (no live bytes left)."""

    coro: str | None
    labels: Mapping[str, str]
    tasks: int = 0
    allocated: list[int] = field(default_factory=list)  # bounded reservoir of per-task values
    allocated_sum: int = 0
    allocated_max: int = 0
    allocations: int = 0
    # Algorithm L state (Li 1994): the reservoir is updated only at the tasks it keeps,
    # found by geometric skips, so folding a batch costs O(kept), not O(batch).
    skip_w: float = 1.0
    next_pick: int = 0

    def add(
        self, values: Sequence[int], allocations: float, rng: random.Random, size: int, total: int, largest: int
    ) -> None:
        """Fold a batch of tasks, given each one's allocated bytes, into the aggregate.
        ``total`` and ``largest`` are sum(values) and max(values), as the core gives them
        (here a fold pass of 10,000 tasks spent ~300 instructions a task making an int of
        each value, twice, to sum them and find the largest)."""
        if not values:
            return
        self.allocated_sum += total
        self.allocated_max = max(self.allocated_max, largest)
        self.allocations += int(round(allocations))
        first = self.tasks  # values[i] is task number first + i + 1
        self.tasks += len(values)
        i = 0
        while len(self.allocated) < size and i < len(values):
            self.allocated.append(values[i])
            i += 1
            if len(self.allocated) == size:
                self._skip(rng, size, first + i)
        if len(self.allocated) < size:
            return
        while self.next_pick <= self.tasks:
            self.allocated[rng.randrange(size)] = values[self.next_pick - first - 1]
            self._skip(rng, size, self.next_pick)

    def _skip(self, rng: random.Random, size: int, seen: int) -> None:
        self.skip_w *= math.exp(math.log(rng.random() or 1e-300) / size)
        gap = math.log(rng.random() or 1e-300) / math.log1p(-self.skip_w) if self.skip_w < 1.0 else 0.0
        self.next_pick = seen + int(gap) + 1


@dataclass
class RawData:
    """Everything read from the core and the registry at one instant."""

    records: Mapping[int, Any]
    cells: list[tuple]
    task_peaks: Mapping[int, tuple[int, int, int]]
    threads: list[tuple]
    thread_names: tuple[Mapping[int, tuple[str, str]], Mapping[int, str]]  # see threads.known_threads
    sites: list[tuple]
    stacks: list[tuple]
    frames: list[tuple]
    start_ns: int
    now_ns: int
    started_at: str
    mode: str
    sample_interval: int | None
    stack_depth: int
    stacks_sampled: bool
    loop_impl: str
    tracker_bytes: int
    folded: Mapping[str, FoldedGroup]
    folded_tasks: int
    group_site_ids: Mapping[int, str]  # the tid that folded tasks' sites carry -> group key
    live_objects: Mapping[int, Any]
    # (coro, code) -> the name the coroutine's groups go by (Tracker._group_coro)
    group_coro: Callable[[str | None, Any], str | None] = lambda coro, code: coro


def group_key(coro: str | None, labels: Mapping[str, str]) -> str:
    key = coro or "<unknown>"
    if labels:
        key += "[" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "]"
    return key


def _sec(ns: int | None, start_ns: int) -> float | None:
    if ns is None:
        return None
    return round(max(0, ns - start_ns) / 1e9, 6)


def _wpct(pairs: list[tuple[int, int]], q: float, unit: int = 1) -> int:
    """The q-quantile of a group's per-task values, given as (value, weight) sorted by
    value, each weight the number of tasks the value stands for, in 1/unit of a task: a
    task kept in the report stands for itself (weight unit), a value in a folded group's
    reservoir for its share of the tasks folded.  The tasks are laid out in order, each
    value over as many places as it stands for, and the quantile is interpolated between
    the two nearest places (numpy's default; with every weight 1, exactly numpy's, and for
    q = 0.5 the median as ``statistics.median`` gives it), rounded to a byte.  Weights are
    integers, so a place falls on the same value however many are added up."""
    if not pairs:
        return 0
    total = sum(w for _, w in pairs)  # in 1/unit tasks
    pos = q * max(0.0, total / unit - 1)
    lo = math.floor(pos)

    def at(place: int) -> int:
        upto = 0
        for v, w in pairs:
            upto += w
            if place * unit < upto:
                return v
        return pairs[-1][0]

    a, b = at(lo), at(lo + 1)
    return int(round(a + (b - a) * (pos - lo)))


class _Acc:
    __slots__ = ("ab", "na", "fb", "nf", "live", "cfb", "cf", "shares", "migr", "weighted", "live_weighted",
                 "live_inferred")

    def __init__(self) -> None:
        self.ab = self.fb = self.live = self.cfb = 0
        self.na = self.nf = self.cf = 0.0
        self.weighted = 0.0
        self.live_weighted = 0.0  # live bytes times their route's confidence
        self.live_inferred = 0  # live bytes charged by inference
        self.shares: dict[tuple[str, int | None], list] = {}
        self.migr: dict[tuple[str, int | None], list] = {}


NO_FRAME = Frame("<unknown>", 0, "<no Python frame>")


def _calibrated(rows: Sequence[tuple], ab: float, na: float, live: float, nf: float) -> list[tuple]:
    """Exact mode: a task's sites, rescaled so they add up to its exact totals.

    Stacks there come from samples (Poisson, mean ``stack_interval`` bytes), each weighted
    to stand for the bytes around it, so the sites' sums only estimate the task's bytes
    (one 100 KB task sampled once reads 256 KB).  The task's own allocated bytes,
    allocations, frees and live bytes are counted exactly; the samples tell how they split
    over sites (ratio estimators).  Live bytes are split in proportion to the sites'
    sampled live bytes; the rest of what the task allocated (what it freed) in proportion
    to the sites' sampled freed bytes.  A site's allocated bytes are its live bytes plus its
    share of the freed ones, so no site shows more live than it allocated (scaling both by
    one ratio each did, where a task freed much at one site and kept all at another), the
    parts add up to the task, and a task with nothing live has no live hotspots.  Counts
    go the same way: the task's blocks still live (allocations - frees) by each site's
    sampled count in the proportion its sampled bytes are live, the freed ones by the
    rest.  A task whose samples are all of blocks growing (which count no allocation:
    a realloc is not one) has its allocations split as its allocated bytes are."""
    slive = sum(max(0.0, r[4]) for r in rows)
    kept = max(0.0, min(float(live), float(ab))) if slive > 0 else 0.0
    freed = max(0.0, float(ab) - kept)
    flive = kept / slive if slive > 0 else 0.0
    sfreed = sum(max(0.0, r[2] - max(0.0, r[4])) for r in rows)
    sab = sum(r[2] for r in rows)
    sna = sum(r[3] for r in rows)
    if sna <= 0 < sab:
        rows = [(tid, stack, rab, max(0.0, rab), rlive) for tid, stack, rab, _rna, rlive in rows]
        sna = sum(r[3] for r in rows)

    def live_share(rab: float, rlive: float) -> float:
        return min(1.0, max(0.0, rlive) / rab) if rab > 0 else 0.0

    slw = sum(r[3] * live_share(r[2], r[4]) for r in rows)
    sfw = sna - slw
    kept_n = max(0.0, float(na) - float(nf)) if slw > 0 else 0.0
    freed_n = max(0.0, float(na) - kept_n)
    out = []
    for tid, stack, rab, rna, rlive in rows:
        site_live = max(0.0, rlive) * flive
        if sfreed > 0:
            site_freed = max(0.0, rab - max(0.0, rlive)) * (freed / sfreed)
        else:  # no sampled block was freed: the freed bytes split as the allocations do
            site_freed = rab * (freed / sab) if sab > 0 else 0.0
        lw = rna * live_share(rab, rlive)
        n = lw * (kept_n / slw) if slw > 0 else 0.0
        if sfw > 1e-12:
            n += (rna - lw) * (freed_n / sfw)
        elif sna > 0:
            n += rna * (freed_n / sna)
        out.append((tid, stack, site_live + site_freed, n, site_live))
    return out


def _apportion(values: Sequence[float]) -> list[int]:
    """Whole numbers for shares of a total, each its value rounded down or up, summing to
    the rounded sum (largest remainders round up): rounding each share on its own could
    make a task's hotspots add up to more than the task."""
    vals = [max(0.0, v) for v in values]
    whole = [math.floor(v) for v in vals]
    extra = int(round(math.fsum(vals))) - sum(whole)
    if extra > 0:
        by_rest = sorted(range(len(vals)), key=lambda i: whole[i] - vals[i])
        for i in by_rest[:extra]:
            whole[i] += 1
    return whole


def _hotspots(site_rows: Iterable[tuple], stacks: list[tuple], frames: list[Frame], by_live: bool,
              held: bool = False) -> tuple[Hotspot, ...]:
    """Top sites, keyed by the innermost frame's file, line and function (several
    instructions of one line are one site); each keeps its heaviest stack.  ``held`` (a
    leak suspect's sites: what is still held): ``bytes`` is the site's live bytes, not
    all it allocated (a line that made ten buffers and kept one holds one)."""
    agg: dict[Frame | None, list] = {}
    for _tid, stack_idx, ab, na, live in site_rows:
        st = stacks[stack_idx]
        top = frames[st[0]] if st else None
        weight = live if by_live else ab
        entry = agg.get(top)
        if entry is None:
            agg[top] = [ab, na, live, stack_idx, weight]
        else:
            entry[0] += ab
            entry[1] += na
            entry[2] += live
            if weight > entry[4]:
                entry[3], entry[4] = stack_idx, weight
    def rank(kv):
        fr = kv[0] or NO_FRAME
        return (-(kv[1][2] if by_live else kv[1][0]), fr.file, fr.line, fr.function)

    ranked = sorted(agg.items(), key=rank)
    entries = [e for _top, e in ranked]
    whole_ab = _apportion([e[0] for e in entries])
    whole_na = _apportion([e[1] for e in entries])
    whole_live = _apportion([e[2] for e in entries])
    out = []
    for i, (top, entry) in enumerate(ranked):
        if (whole_live if by_live else whole_ab)[i] == 0:
            continue
        fr = top if top is not None else NO_FRAME
        out.append(
            Hotspot(
                file=fr.file,
                line=fr.line,
                function=fr.function,
                bytes=(whole_live if held else whole_ab)[i],
                allocations=whole_na[i],
                live_bytes=whole_live[i],
                stack=tuple(frames[f] for f in stacks[entry[3]]),
            )
        )
        if len(out) >= TOP_HOTSPOTS:
            break
    return tuple(out)


def build_report(raw: RawData) -> Report:
    start = raw.start_ns
    slot_ident = {row[0]: row[1] for row in raw.threads}
    slot_native = {row[0]: row[2] for row in raw.threads}
    records = raw.records

    accs: dict[int, _Acc] = defaultdict(_Acc)
    unattributed: dict[int | None, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    thread_attr: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0])  # attributed, unattributed, allocations
    thread_inferred: dict[int, list[float]] = defaultdict(lambda: [0, 0.0])  # inferred bytes, times confidence
    # what folded tasks had charged to each thread (their cells are gone with them)
    for row in raw.threads:
        slot, folded_bytes, folded_allocs = row[0], row[6], row[7]
        if folded_bytes or folded_allocs:
            ta = thread_attr[slot]
            ta[0] += folded_bytes
            ta[2] += int(round(folded_allocs))
        for phase, b in enumerate(row[11]):
            if b:
                ti = thread_inferred[slot]
                ti[0] += b
                ti[1] += b * routes.inferred_confidence(phase)
    orphan_bytes = orphan_allocs = orphan_freed = orphan_live = 0
    handed_slots: set[int] = set()  # threads that ran work handed over by a task

    for (tid, slot, croute, phase, ab, na, fb, nf, live, _entries, cfb, cf, first, last, origin) in raw.cells:
        last = max(first, last)  # last_ns comes from a coarse clock
        ident = slot_ident.get(slot)
        if tid == 0:
            u = unattributed[ident]
            u[0] += ab
            u[1] += int(round(na))
            u[2] += fb
            u[3] += live
            ta = thread_attr[slot]
            ta[1] += ab
            ta[2] += int(round(na))
            continue
        ta = thread_attr[slot]
        ta[0] += ab
        ta[2] += int(round(na))
        rec = records.get(tid)
        if rec is None:  # a folded task whose tag was still in use somewhere
            orphan_bytes += ab
            orphan_allocs += int(round(na))
            orphan_freed += fb
            orphan_live += live
            continue
        route, conf = routes.route_of(croute, phase, slot, rec.home_slot)
        if route == routes.PROPAGATED:
            handed_slots.add(slot)
        elif route == routes.INFERRED and ab:
            ti = thread_inferred[slot]
            ti[0] += ab
            ti[1] += ab * conf
        a = accs[tid]
        a.ab += ab
        a.na += na
        a.fb += fb
        a.nf += nf
        a.live += live
        a.cfb += cfb
        a.cf += cf
        a.weighted += ab * conf
        a.live_weighted += live * conf
        if route == routes.INFERRED:
            a.live_inferred += live
        sh = a.shares.get((route, ident))
        if sh is None:
            a.shares[(route, ident)] = [ab, na, ab * conf]
        else:
            sh[0] += ab
            sh[1] += na
            sh[2] += ab * conf
        if route != routes.OBSERVED:
            # from: the thread that handed the work over where the core saw it (a callback
            # a worker sent back to the loop), None if several did, else the task's own
            mkey = (route, ident, origin)
            m = a.migr.get(mkey)
            if m is None:
                a.migr[mkey] = [first, last, ab, na, ab * conf]
            else:
                m[0] = min(m[0], first)
                m[1] = max(m[1], last)
                m[2] += ab
                m[3] += na
                m[4] += ab * conf

    # stacks
    frames = [Frame(file=f, line=ln, function=fn) for (f, fn, ln) in raw.frames]
    sites_by_task: dict[int, list[tuple]] = defaultdict(list)
    folded_sites: dict[str, list[tuple]] = defaultdict(list)  # group key -> its folded tasks' sites
    for row in raw.sites:
        key = raw.group_site_ids.get(row[0])
        if key is not None:
            folded_sites[key].append(row)
        else:
            sites_by_task[row[0]].append(row)

    # tasks
    base: dict[int, dict[str, Any]] = {}
    for tid, rec in records.items():
        a = accs.get(tid) or _Acc()
        state = rec.state
        done = state != "pending"
        peak = raw.task_peaks.get(tid, (0, 0, 0))[2]
        shares = tuple(
            AttributionShare(
                route=route,
                thread_id=ident,
                bytes=int(v[0]),
                allocations=int(round(v[1])),
                confidence=round(v[2] / v[0], 4) if v[0] else routes.CONFIDENCE.get(route, 1.0),
            )
            for (route, ident), v in sorted(a.shares.items(), key=lambda kv: (-kv[1][0], kv[0][0]))
        )
        migrations = tuple(
            Migration(
                route=route,
                from_thread=rec.thread_id if origin == 0 else slot_ident.get(origin) if origin > 0 else None,
                to_thread=ident,
                first_at=_sec(m[0], start) or 0.0,
                last_at=_sec(m[1], start) or 0.0,
                allocated_bytes=int(m[2]),
                allocations=int(round(m[3])),
                confidence=round(m[4] / m[2], 4) if m[2] else routes.CONFIDENCE.get(route, 1.0),
            )
            for (route, ident, origin), m in sorted(a.migr.items(), key=lambda kv: kv[1][0])
        )
        task_sites = sites_by_task.get(tid, ())
        if raw.stacks_sampled and task_sites:
            task_sites = _calibrated(task_sites, a.ab, a.na, a.live, a.nf)
        base[tid] = dict(
            id=tid,
            name=rec.name,
            coro=rec.coro,
            parent_id=rec.parent_id,
            labels=dict(rec.labels),
            thread_id=rec.thread_id,
            loop_id=rec.loop_id,
            created_at=_sec(rec.created_ns, start) or 0.0,
            finished_at=_sec(rec.finished_ns, start) if done else None,
            state=state,
            allocated_bytes=int(a.ab),
            allocations=int(round(a.na)),
            freed_bytes=int(a.fb),
            live_bytes=int(a.live),
            peak_live_bytes=int(max(peak, a.live)),
            retained_after_done_bytes=int(max(0, a.live)) if done else 0,
            attribution=shares,
            confidence=round(a.weighted / a.ab, 4) if a.ab > 0 else 1.0,
            migrations=migrations,
            cross_task_frees=int(round(a.cf)),
            cross_task_freed_bytes=int(a.cfb),
            hotspots=_hotspots(task_sites, raw.stacks, frames, by_live=False),
            live_hotspots=_hotspots(task_sites, raw.stacks, frames, by_live=True),
            via_factory=rec.via_factory,
            cross_thread_parent=rec.cross_thread_parent,
        )

    # lineage and subtree (iterative: trees can be deep).  They go by each record's up:
    # its parent's record, or where the parent's record went when it was folded away
    # (its nearest ancestor still kept).  A parent folded away stays in the lineage, just
    # before the task (so lineage[-2] is always parent_id); folded ancestors further up
    # are not known any more and are left out.  What folded tasks allocated stays in the
    # subtree of the task they were folded into (folded_*).
    def _up(rec: Any) -> int | None:
        up = rec.up_id
        return up if up is not None and up in records and up != rec.id else None

    lineage: dict[int, tuple[int, ...]] = {}
    for tid in records:
        pending_ids = []
        cur: int | None = tid
        while cur is not None and cur not in lineage:
            pending_ids.append(cur)
            cur = _up(records[cur])
            if len(pending_ids) > len(records):  # (cannot happen: ups form a forest)
                cur = None
        chain = lineage[cur] if cur is not None else ()
        for t in reversed(pending_ids):
            r = records[t]
            up = _up(r)
            gap = (r.parent_id,) if r.parent_id is not None and r.parent_id != up and r.parent_id != t else ()
            chain = chain + gap + (t,)
            lineage[t] = chain
    subtree: dict[int, list[int]] = {}
    order = sorted(records, key=lambda t: len(lineage[t]), reverse=True)
    for tid in order:
        b = base[tid]
        rec = records[tid]
        s = subtree.setdefault(tid, [0, 0, 0, 0, 0])
        s[0] += b["allocated_bytes"] + rec.folded_alloc_bytes
        s[1] += b["allocations"] + int(round(rec.folded_allocs))
        s[2] += b["freed_bytes"] + rec.folded_alloc_bytes
        s[3] += b["live_bytes"]
        s[4] += 1 + rec.folded_tasks
        up = _up(rec)
        if up is not None:
            p = subtree.setdefault(up, [0, 0, 0, 0, 0])
            for i in range(5):
                p[i] += s[i]

    tasks = []
    for tid in sorted(records):
        s = subtree[tid]
        tasks.append(
            TaskReport(
                lineage=lineage[tid],
                subtree=SubtreeCounters(
                    allocated_bytes=s[0], allocations=s[1], freed_bytes=s[2], live_bytes=s[3], tasks=s[4]
                ),
                **base[tid],
            )
        )

    # groups and leak suspects
    groups_acc: dict[str, dict[str, Any]] = {}

    def _group(key: str, coro: str | None, labels: Mapping[str, str]) -> dict[str, Any]:
        return groups_acc.setdefault(
            key,
            {"coro": coro, "labels": dict(labels), "alloc": [], "sum": 0, "max": 0, "n": 0, "allocs": 0,
             "live": 0, "ret": 0, "tids": [], "held_tids": [], "folded": 0, "finished": 0},
        )

    for t in tasks:
        g = _group(group_key(raw.group_coro(t.coro, getattr(records.get(t.id), "code", None)), t.labels), t.coro, t.labels)
        g["alloc"].append(t.allocated_bytes)
        g["sum"] += t.allocated_bytes
        g["max"] = max(g["max"], t.allocated_bytes)
        g["n"] += 1
        g["allocs"] += t.allocations
        g["live"] += t.live_bytes
        g["ret"] += t.retained_after_done_bytes
        g["tids"].append(t.id)
        if t.state != "pending":
            g["finished"] += 1
        if t.retained_after_done_bytes > 0:
            g["held_tids"].append(t.id)
    for key, fg in raw.folded.items():
        g = _group(key, fg.coro, fg.labels)
        g["folded"] += fg.tasks
        g["finished"] += fg.tasks
        g["n"] += fg.tasks
        g["allocs"] += fg.allocations
        g["sum"] += fg.allocated_sum
        g["max"] = max(g["max"], fg.allocated_max)
        if fg.allocated:  # a bounded sample of the folded tasks, each for its share of them
            g["folded_sample"] = (fg.allocated, fg.tasks)

    groups = []
    leak_suspects = []
    def _sites_of(tids: list[int], folded_rows: list[tuple], folded_bytes: float, folded_allocs: float) -> list[tuple]:
        """The sites of several tasks together (and of tasks folded into their group),
        for a group's or a leak suspect's hotspots.  In exact mode the samples are split
        over the tasks' summed exact counts, not task by task: a task that no sample
        named has no sites of its own to split its bytes over (3,000 tasks of ~200 KB at
        a 256 KiB interval put 55% of the group's bytes at its one site), while folded
        tasks' sites are raw estimates (together they came to more than the group)."""
        rows = [row for tid in tids for row in sites_by_task.get(tid, ())] + folded_rows
        if not raw.stacks_sampled or not rows:
            return rows
        ab = na = live = nf = 0.0
        for tid in tids:
            a = accs.get(tid)
            if a is not None:
                ab, na, live, nf = ab + a.ab, na + a.na, live + a.live, nf + a.nf
        # folded tasks hold nothing live: all they allocated was freed
        return _calibrated(rows, ab + folded_bytes, na + folded_allocs, live, nf + folded_allocs)

    for key, g in groups_acc.items():
        # weights in 1/len(sample) of a task: a kept task is len(sample), each sampled
        # value of the folded ones stands for (folded tasks) of them, all integers
        sample, folded_n = g.get("folded_sample", ((), 0))
        unit = max(1, len(sample))
        vals = sorted([(v, unit) for v in g["alloc"]] + [(v, folded_n) for v in sample])
        fg = raw.folded.get(key)
        group_sites = _sites_of(g["tids"], folded_sites.get(key, []), fg.allocated_sum if fg is not None else 0,
                                fg.allocations if fg is not None else 0)
        groups.append(
            Group(
                key=key,
                coro=g["coro"],
                labels=g["labels"],
                tasks=g["n"],
                folded_tasks=g["folded"],
                allocated_bytes=Distribution(sum=g["sum"], p50=_wpct(vals, 0.5, unit), p95=_wpct(vals, 0.95, unit),
                                             max=g["max"]),
                allocations=g["allocs"],
                live_bytes=g["live"],
                retained_after_done_bytes=g["ret"],
                hotspots=_hotspots(group_sites, raw.stacks, frames, by_live=False),
                live_hotspots=_hotspots(group_sites, raw.stacks, frames, by_live=True),
            )
        )
        if _leaks(g["ret"], g["sum"]):
            held_sites = _sites_of(g["held_tids"], [], 0, 0)
            held = [accs[tid] for tid in g["held_tids"] if tid in accs]
            held_live = sum(max(0, a.live) for a in held)
            held_weighted = sum(a.live_weighted for a in held if a.live > 0)
            leak_suspects.append(
                LeakSuspect(
                    key=key,
                    coro=g["coro"],
                    labels=g["labels"],
                    # exact mode: the tasks that hold memory; sampled mode cannot tell
                    # which do (most hold no sample), so all its finished tasks
                    tasks=len(g["held_tids"]) if raw.mode != "sampled" else g["finished"],
                    retained_bytes=g["ret"],
                    hotspots=_hotspots(held_sites, raw.stacks, frames, by_live=True, held=True),
                    confidence=round(min(1.0, held_weighted / held_live), 4) if held_live > 0 else 1.0,
                    inferred_bytes=int(min(g["ret"], sum(max(0, a.live_inferred) for a in held))),
                )
            )
    groups.sort(key=lambda g: (-g.allocated_bytes.sum, g.key))
    leak_suspects.sort(key=lambda s: (-s.retained_bytes, s.key))

    # unattributed and threads
    by_thread = tuple(
        UnattributedThread(thread_id=ident, allocated_bytes=u[0], allocations=u[1], freed_bytes=u[2], live_bytes=u[3])
        for ident, u in sorted(unattributed.items(), key=lambda kv: -kv[1][0])
    )
    un = Unattributed(
        allocated_bytes=sum(u.allocated_bytes for u in by_thread),
        allocations=sum(u.allocations for u in by_thread),
        freed_bytes=sum(u.freed_bytes for u in by_thread),
        live_bytes=sum(u.live_bytes for u in by_thread),
        by_thread=by_thread,
    )
    # Threads by the core's slots (an ident is reused once its thread ends; a slot is one
    # thread's whole life): a loop's thread is the home of its tasks' records, an executor's
    # ran propagated work; names are those noted as threads started, or for the threads
    # alive now (the newest slot of their ident) their current ones.
    by_slot, alive = raw.thread_names
    newest = {ident: slot for slot, ident in sorted(slot_ident.items())}
    loop_slots = {r.home_slot for r in records.values() if r.home_slot} | {
        row[0] for row in raw.threads if row[8] or row[10]
    }
    handed_slots |= {row[0] for row in raw.threads if row[9]}
    threads = []
    for slot, ident in sorted(slot_ident.items()):
        name, role = by_slot.get(slot, (None, "other"))
        if name is None and newest.get(ident) == slot:
            name = alive.get(ident)
        if slot in loop_slots:
            role = "loop"
        elif slot in handed_slots and role == "other":
            role = "executor"
        ta = thread_attr.get(slot, [0, 0, 0])
        inf = thread_inferred.get(slot)
        threads.append(
            ThreadReport(
                id=ident,
                native_id=slot_native.get(slot),
                name=name,
                role=role,
                attributed_bytes=ta[0],
                unattributed_bytes=ta[1],
                allocations=ta[2],
                inferred_bytes=int(inf[0]) if inf else 0,
                inferred_confidence=round(inf[1] / inf[0], 4) if inf else None,
            )
        )

    attributed = sum(t.allocated_bytes for t in tasks) + orphan_bytes + sum(
        fg.allocated_sum for fg in raw.folded.values()
    )
    totals = Totals(
        allocated_bytes=attributed + un.allocated_bytes,
        allocations=sum(t.allocations for t in tasks) + orphan_allocs + un.allocations
        + sum(fg.allocations for fg in raw.folded.values()),
        freed_bytes=sum(t.freed_bytes for t in tasks) + orphan_freed + un.freed_bytes
        + sum(fg.allocated_sum for fg in raw.folded.values()),
        live_bytes=sum(t.live_bytes for t in tasks) + orphan_live + un.live_bytes,
        attributed_bytes=attributed,
        unattributed_bytes=un.allocated_bytes,
        tasks=len(tasks) + raw.folded_tasks,
        folded_tasks=raw.folded_tasks,
    )
    version, python, platform_name = run_constants()
    run = RunInfo(
        python=python,
        platform=platform_name,
        loop=raw.loop_impl,
        mode=raw.mode,
        sample_interval=raw.sample_interval,
        stack_depth=raw.stack_depth,
        started_at=raw.started_at,
        duration_s=round((raw.now_ns - start) / 1e9, 6),
        pid=os.getpid(),
        estimated=raw.mode == "sampled",
        stacks_sampled=raw.stacks_sampled,
        tracker_bytes=raw.tracker_bytes,
    )
    return Report(
        run=run,
        totals=totals,
        tasks=tuple(tasks),
        unattributed=un,
        groups=tuple(groups),
        leak_suspects=tuple(leak_suspects),
        threads=tuple(threads),
        tool={"name": "memscope-async", "version": version},
        _objects=raw.live_objects,
    )


@functools.cache
def run_constants() -> tuple[str, str, str]:
    """This tool's version, the Python version and the platform, as every report gives them.

    Worked out once, by the tracker before its hooks go in (``Tracker.start``), never
    inside a report: the first call imports (``importlib.metadata``, ``email``) and fills
    ``platform``'s caches, objects that stay for good, and a report running while a loop
    thread runs tasks would take their small blocks (tuples above all) from CPython's free
    lists, where the tasks' freed ones wait, still charged to them.  No allocator call
    takes a block out of a free list, so ``unrecorded`` cannot make it ours: each such
    task would hold that block "live" for good (never folded; ~400 of them, 48-72 B)."""
    return _version(), platform.python_version(), f"{sys.platform}-{platform.machine()}"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("memscope-async")
    except Exception:
        return "0+unknown"
