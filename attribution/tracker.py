"""The tracker: the C core's lifecycle, bounded bookkeeping, and raw data for reports.

Only one tracker can be started per process (the allocator is process-wide).  Decisions
(mode, intervals, how many finished tasks to keep) are made here in Python; the C core
only counts.
"""

from __future__ import annotations

import datetime as _dt
import os
import sys
import random
import threading
import weakref
import warnings
from array import array
from typing import Any, Callable, Iterable, Mapping

from . import _core
from . import threads as core_threads
from .aggregate import FoldedGroup, RawData, build_report, group_key, run_constants
from .registry import live_task_names, read_records
from .report import Report

__all__ = ["Tracker", "TrackerError", "MODES", "DEFAULT_SAMPLE_INTERVAL", "DEFAULT_STACK_INTERVAL"]

MODES = ("exact", "sampled")
DEFAULT_SAMPLE_INTERVAL = 512 * 1024
DEFAULT_STACK_INTERVAL = 64 * 1024
DEFAULT_STACK_DEPTH = 32
DEFAULT_MAX_FINISHED_TASKS = 10_000
DEFAULT_HALF_LIFE = 1.0
_RESERVOIR = 1000
# Folded groups with labels, per coroutine: past this many, a task whose labels would
# start another group folds into one where the labels with many values (more than
# MANY_LABEL_VALUES among the coroutine's groups: a request id) have the value "*", or
# if none has, every label (a request id as a label would otherwise keep one group per
# task, for good).
MAX_LABEL_GROUPS = 1000
MANY_LABEL_VALUES = 100
OTHER_LABEL_VALUE = "*"
_UINT32 = array("I").itemsize  # the core's task ids: native uint32

_lock = threading.Lock()
_running: "Tracker | None" = None
_generation = 0  # bumped at every start: the C core holds one run's data at a time
_holder: "weakref.ref[Tracker] | None" = None  # the tracker whose run the C core holds


# asyncio's C Future keeps up to 255 freed iterators (the object ``await fut`` makes, 40
# bytes) in a free list of its own, which no collection empties: the first 255 tasks that
# awaited a future kept one each, charged to them as live after they finished, so they
# could not fold and their group showed bytes "retained".  This many iterators made and
# dropped in the right order leave that list full of blocks the program never owned.
_FUTURE_ITERS = 256  # the list's length + 1 (255 on every supported Python)


class _NoLoop:
    """All a C Future asks of its loop when it is made."""

    def get_debug(self) -> bool:
        return False


def _refill_future_iter_free_list() -> None:
    """Swap the program's freed Future iterators in asyncio's free list for fresh ones.

    Taking ``_FUTURE_ITERS`` iterators empties the list (the program's blocks among
    them); ``_FUTURE_ITERS`` more are new blocks; dropping the new ones first fills the
    list with them, so the program's, dropped last, are really freed and the hooks see
    those frees.  Run with recording off: the new blocks are ours, and the list stays full
    of them, so a task later takes its iterator from the list and gives it back unseen,
    as the program's first ones were until now.  A no-op without the C accelerator."""
    try:
        from _asyncio import Future
    except ImportError:
        return
    fut = Future(loop=_NoLoop())
    taken = [iter(fut) for _ in range(_FUTURE_ITERS)]
    fresh = [iter(fut) for _ in range(_FUTURE_ITERS)]
    del fresh
    del taken


def _stop_in_forked_child() -> None:
    """In a child made by fork (os.fork, multiprocessing's fork workers) the running tracker
    stops: what it holds is the parent's profile up to the fork, and the child's bytes
    would be charged to the parent's tasks (a report written from it, over the parent's).
    The hooks come out, so the child runs unprofiled and may start a profiler of its own.
    No lock is taken: one a parent thread held at the fork stays held in the copy."""
    global _running, _lock
    tracker = _running
    _lock = threading.Lock()
    if tracker is None:
        return
    _running = None
    tracker.forked = True
    tracker._active = False
    try:
        _core.set_fold_hook(None, 0)
        _core.stop()
        tracker._stop_ns = _core.now_ns()
    except Exception:  # (the child goes on, whatever)
        pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_stop_in_forked_child)


def _keep_report_of_previous(new: "Tracker") -> None:
    """The C core holds one run at a time: before a new run takes it, the run it holds gets
    its report made, kept by its tracker (if that is still alive), so a profiler stopped
    earlier still answers snapshot() and export() (two runs compared in one process)."""
    prev = _holder() if _holder is not None else None
    if prev is None or prev is new or not prev._has_data or prev._generation != _generation:
        return
    try:
        prev._kept = prev.report()
    except Exception:  # (never in the way of the new run; the old one then says it was discarded)
        prev._kept = None


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning issued by our caller name the first frame
    outside memscope-async (the program's line that stopped the profiler)."""
    ours = {
        os.path.dirname(m.__file__)
        for name, m in list(sys.modules.items())
        if name.partition(".")[0] == "memscope_async" and getattr(m, "__file__", None)
    }
    frame, level = sys._getframe(2), 2
    while frame is not None and os.path.dirname(frame.f_code.co_filename) in ours:
        frame, level = frame.f_back, level + 1
    return level


class TrackerError(RuntimeError):
    """The tracker cannot do what was asked (already running, bad settings)."""


# The largest sampling interval: gaps are drawn up to ~37 times the mean and counted in
# 64 bits (and a report's integers are 64-bit).
MAX_INTERVAL = 1 << 50
# The core keeps the half-life in whole nanoseconds (0 would mean never), in 64 bits.
MIN_HALF_LIFE, MAX_HALF_LIFE = 1e-6, 1e9
# Task ids are 31-bit: no more records than that can exist.
MAX_FINISHED_TASKS = (1 << 31) - 1


def _whole(value: Any) -> bool:
    """An int that is not a bool (True is not a size)."""
    return isinstance(value, int) and not isinstance(value, bool)


class Tracker:
    """Counts every allocation per task while started; builds reports on demand.

    mode: "exact" (every allocation counted; stacks sampled every ``stack_interval``
    bytes on average) or "sampled" (a Poisson sample every ``sample_interval`` bytes on
    average, scaled to unbiased estimates; every sample carries a stack).
    """

    def __init__(
        self,
        tag_var: Any,
        *,
        mode: str = "exact",
        sample_interval: int = DEFAULT_SAMPLE_INTERVAL,
        stack_interval: int | None = DEFAULT_STACK_INTERVAL,
        stack_depth: int = DEFAULT_STACK_DEPTH,
        max_finished_tasks: int = DEFAULT_MAX_FINISHED_TASKS,
        inferred_half_life: float = DEFAULT_HALF_LIFE,
        seed: int = 0,
    ) -> None:
        if mode not in MODES:
            raise TrackerError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        if not _whole(sample_interval) or not 1 <= sample_interval <= MAX_INTERVAL:
            raise TrackerError(
                f"sample_interval must be a whole number of bytes from 1 to {MAX_INTERVAL} (1 PiB), not {sample_interval!r}"
            )
        if stack_interval is not None and (not _whole(stack_interval) or not 0 <= stack_interval <= MAX_INTERVAL):
            raise TrackerError(
                f"stack_interval must be a whole number of bytes from 0 to {MAX_INTERVAL} (1 PiB), or None, "
                f"not {stack_interval!r}"
            )
        if not _whole(stack_depth) or not 0 <= stack_depth <= 256:
            raise TrackerError(f"stack_depth must be an integer in 0..256, not {stack_depth!r}")
        if not _whole(max_finished_tasks) or not 0 <= max_finished_tasks <= MAX_FINISHED_TASKS:
            raise TrackerError(
                f"max_finished_tasks must be an integer from 0 to {MAX_FINISHED_TASKS}, not {max_finished_tasks!r}"
            )
        if (not isinstance(inferred_half_life, (int, float)) or isinstance(inferred_half_life, bool)
                or not MIN_HALF_LIFE <= inferred_half_life <= MAX_HALF_LIFE):
            raise TrackerError(
                f"inferred_half_life must be a number of seconds from {MIN_HALF_LIFE} to {MAX_HALF_LIFE:.0e}, "
                f"not {inferred_half_life!r}"
            )
        if not _whole(seed):
            raise TrackerError(f"seed must be an integer, not {seed!r}")
        self.tag_var = tag_var
        self.mode = mode
        self.sample_interval = sample_interval
        self.stack_interval = stack_interval or 0
        self.stack_depth = stack_depth
        self.max_finished_tasks = max_finished_tasks
        self.inferred_half_life = inferred_half_life
        self.seed = seed
        self.loop_impl = "none"  # the kinds of loop instrumented ("asyncio", "uvloop", joined by "+")
        self.loops: Callable[[], Iterable[Any]] = tuple  # the instrumented loops, for live task names
        self._folded: dict[str, FoldedGroup] = {}
        # coro -> [(function, the name its groups go by)]: see _group_coro
        self._coro_functions: dict[str | None, list[tuple[tuple[str, int] | None, str | None]]] = {}
        self._folded_tasks = 0
        self._label_groups: dict[str | None, int] = {}  # coro -> folded groups with labels
        self._label_values: dict[str | None, dict[str, set[str]]] = {}  # coro -> label -> values in them
        self._at_stop: dict[int, tuple[int, str | None, str]] = {}  # live tasks' names when stopped
        self._group_site_ids: dict[str, int] = {}  # group key -> the id its sites carry
        self._rng = random.Random(seed or None)
        # folds (from any loop's thread) and a report's naming of groups, one at a time:
        # a report may rename groups (_group_coro) that a fold is adding to
        self._groups_lock = threading.RLock()
        self._start_ns = 0
        self._stop_ns: int | None = None
        self._started_at = ""
        self._active = False
        self._has_data = False
        self._generation = -1
        self._kept: Report | None = None  # its report, made when a later run took the C core
        self.forked = False  # stopped in a forked child: its data is the parent's, to the fork

    # -- lifecycle ----------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self._active

    def start(self) -> None:
        """Install the hooks.  Raises TrackerError if any tracker is already running."""
        global _running
        with _lock:
            if _running is not None:
                raise TrackerError("a memscope-async profiler is already running in this process; stop it first")
            _keep_report_of_previous(self)
            self._at_stop = {}
            self._kept = None
            if self.stack_depth == 0:
                stack_interval = 0.0
            elif self.mode == "sampled":
                stack_interval = float(self.sample_interval)
            else:
                stack_interval = float(self.stack_interval)
            try:
                _refill_future_iter_free_list()  # full of blocks from before the start
            except Exception:
                pass
            run_constants()  # before the hooks: a report must not make them (see there)
            try:
                _core.start(
                    self.tag_var,
                    _core.MODE_SAMPLED if self.mode == "sampled" else _core.MODE_EXACT,
                    float(self.sample_interval),
                    stack_interval,
                    max(1, self.stack_depth),
                    float(self.inferred_half_life),
                    int(self.seed),
                )
            except RuntimeError as e:  # hooks of an earlier session still under tracemalloc's
                raise TrackerError(str(e)) from None
            _running = self
            global _generation, _holder
            _generation += 1
            self._generation = _generation
            _holder = weakref.ref(self)
        self._start_ns = _core.now_ns()
        self._stop_ns = None
        self._started_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")
        self._active = True
        self._has_data = True
        core_threads.reset()
        _core.set_fold_hook(self._fold_hook, self._fold_threshold(0))

    def note_live_tasks(self) -> None:
        """Keep the names and states of the tasks still running on the instrumented loops,
        for reports made once they are no longer watched (call it before they are
        uninstrumented)."""
        if self._active:
            self._at_stop = live_task_names(self.loops())

    def settle_stacks(self) -> int:
        """Let go of the code objects only our stack samples still hold (see
        ``_core.settle_stacks``); returns how many frames were settled (0 when stopped)."""
        if not self._active:
            return 0
        try:
            return _core.settle_stacks()
        except Exception:  # (out of memory: the code objects stay held, as before)
            return 0

    def settle_free_lists(self) -> None:
        """Free the program's blocks that asyncio's free list of Future iterators holds
        (see ``_refill_future_iter_free_list``), so that finished tasks do not keep them;
        ``gc.collect()`` empties the interpreter's own free lists, not this one."""
        if not self._active:
            return
        try:
            _core.unrecorded(_refill_future_iter_free_list)
        except Exception:  # (out of memory: the iterators stay where they were)
            pass

    def stop(self) -> None:
        """Remove the hooks (idempotent).  Data stays readable until :meth:`close`."""
        global _running
        with _lock:
            if not self._active:
                return
            cut = _core.stop()
            _core.set_fold_hook(None, 0)
            self._active = False
            self._stop_ns = _core.now_ns()
            if _running is self:
                _running = None
        if cut:
            warnings.warn(
                "memscope-async: the allocator hooks were taken out while profiling (tracemalloc, started "
                "before the profiler, was stopped during it?); allocations made after that are not in the report",
                RuntimeWarning,
                stacklevel=_caller_stacklevel(),
            )

    def close(self) -> None:
        """Stop and free everything the core holds."""
        self.stop()
        if self._has_data and _running is None and self._generation == _generation:
            _core.clear()
        self._has_data = False
        self._kept = None

    # -- bounded memory -----------------------------------------------------------------
    def _fold_threshold(self, waiting: int) -> int:
        # Passes are batched: the next one waits for another batch of finished tasks, so
        # tasks that cannot fold yet (still holding memory) cost O(1) per finish.  A pass
        # looks at every waiting task (the kept ones compete with the new ones), so a
        # batch as large as the kept set costs 3 looks per folded task, half of it 4
        # (a tree of 168,000 eager tasks: 31 passes, ~13% of its time, at half).
        return max(waiting, self.max_finished_tasks) + max(100, self.max_finished_tasks)

    def _fold_hook(self, scan: bool = True) -> None:
        """Called by the core (from our task factory, before it makes a task) when enough
        finished tasks wait for a pass (scan), or enough tasks folded as they finished
        wait to be added to their groups."""
        waiting = self._fold(self.max_finished_tasks, scan)
        if scan and self._active:
            _core.set_fold_hook(self._fold_hook, self._fold_threshold(waiting))

    def _fold(self, keep: int, scan: bool = True) -> int:
        """Fold finished tasks with no live allocation left into their group's aggregate,
        smallest first, until at most ``keep`` of them remain (those still holding memory
        all stay).
        Returns how many finished tasks remain.  The core picks and forgets the tasks
        (once a pass has had to, those that allocated no more than any it kept go as they
        finish); only the per-group sums come back here, with every call."""
        with self._groups_lock:
            return self._fold_locked(keep, scan)

    def _fold_locked(self, keep: int, scan: bool) -> int:
        remaining, groups = _core.fold(keep, scan)
        site_tids, site_gids = [], []
        for coro, labels, values, allocs, tids, total, largest, code in groups:
            per_task = array("q")
            per_task.frombytes(values)
            labels = labels if labels is not None else {}
            name = self._group_coro(coro, code)
            key = group_key(name, labels)
            fg = self._folded.get(key)
            if fg is None:
                fg, key = self._new_group(coro, labels, name)
            fg.add(per_task, allocs, self._rng, _RESERVOIR, total, largest)
            self._folded_tasks += len(per_task)
            # their allocation sites become the group's (the group's hotspots keep them,
            # and the site table stays bounded by stacks, not by tasks ever sampled): tids
            # holds the folded tasks that own sites, and the group id goes once for each
            # as bytes, not as an int each
            gid = self._group_site_ids.get(key)
            if gid is None:
                gid = self._group_site_ids[key] = _core.GROUP_SITE_BIT | (len(self._group_site_ids) + 1)
            site_tids.append(tids)
            site_gids.append(array("I", [gid]).tobytes() * (len(tids) // _UINT32))
        if site_tids:
            _core.fold_sites(b"".join(site_tids), b"".join(site_gids))  # one pass over the sites for all groups
        return remaining

    def _group_coro(self, coro: str | None, code: Any) -> str | None:
        """The name a coroutine's groups go by: its qualified name, or, while functions of
        another file or line share it (a ``worker`` in two modules), that name with where
        each is (``worker (jobs.py:12)``), so that they are not one group.  A function is
        its code's file and first line; when a second one comes, the groups of the first
        are renamed so."""
        where = (code.co_filename, code.co_firstlineno) if code is not None else None
        seen = self._coro_functions.setdefault(coro, [])
        for function, name in seen:
            if function == where:
                return name
        if not seen:
            seen.append((where, coro))
            return coro
        if len(seen) == 1:  # the first function loses the plain name
            first = seen[0][0]
            seen[0] = (first, self._placed(coro, first, seen))
            self._rename_groups(coro, seen[0][1])
        name = self._placed(coro, where, seen)
        seen.append((where, name))
        return name

    @staticmethod
    def _placed(coro: str | None, where: tuple[str, int] | None, seen: list) -> str:
        if where is None:
            return f"{coro} (?)"
        short = f"{coro} ({os.path.basename(where[0])}:{where[1]})"
        return short if all(n != short for _, n in seen) else f"{coro} ({where[0]}:{where[1]})"

    def _rename_groups(self, coro: str | None, name: str) -> None:
        """The folded groups of coro, so far named by it alone, go by ``name`` from now on."""
        for key, fg in list(self._folded.items()):
            if fg.coro != coro or key != group_key(coro, fg.labels) or key == group_key(name, fg.labels):
                continue
            new = group_key(name, fg.labels)
            self._folded[new] = self._folded.pop(key)
            if key in self._group_site_ids:
                self._group_site_ids[new] = self._group_site_ids.pop(key)
        if coro in self._label_groups:
            self._label_groups[name] = self._label_groups.pop(coro)
        if coro in self._label_values:
            self._label_values[name] = self._label_values.pop(coro)

    def _new_group(self, coro: str | None, labels: Mapping[str, str], name: str | None) -> tuple[FoldedGroup, str]:
        """The folded group for tasks of coro (going by ``name``, see _group_coro) with
        labels that no group has yet: a new one, or, past MAX_LABEL_GROUPS for that
        coroutine, the one where the labels with many values have the value "*" (past
        twice that, for tasks whose very label names vary, {"*": "*"})."""
        n = self._label_groups.get(name, 0) if labels else 0
        seen = self._label_values.setdefault(name, {}) if labels else {}
        if n >= MAX_LABEL_GROUPS:
            many = {k for k in labels if len(seen.get(k, ())) > MANY_LABEL_VALUES}
            labels = {k: OTHER_LABEL_VALUE if not many or k in many else v for k, v in labels.items()}
            if n >= 2 * MAX_LABEL_GROUPS and group_key(name, labels) not in self._folded:
                labels = {OTHER_LABEL_VALUE: OTHER_LABEL_VALUE}
            key = group_key(name, labels)
            fg = self._folded.get(key)
            if fg is not None:
                return fg, key
        else:
            for k, v in labels.items():
                seen.setdefault(k, set()).add(v)
        key = group_key(name, labels)
        fg = self._folded[key] = FoldedGroup(coro=coro, labels=dict(labels))
        if labels:
            self._label_groups[name] = n + 1
        return fg, key

    # -- reading ------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """The tracker's own footprint (bytes) and counts."""
        s = dict(_core.stats()) if self._has_data and self._generation == _generation else {}
        n = s.get("tracked_allocations", 0)
        s["bytes_per_tracked_allocation"] = (s["table_bytes"] / n) if n else 0.0
        s["live_tasks"] = s.get("pending_task_records", 0)
        s["records"] = s.get("task_records", 0)
        s["folded_tasks"] = self._folded_tasks
        return s

    def report(self) -> Report:
        """Build a report from what has been recorded so far."""
        if not self._has_data:
            raise TrackerError("this profiler holds no data (it was never started, or it was closed)")
        if self._generation != _generation:
            if self._kept is not None:  # its run, as it was when a later one started
                return self._kept
            raise TrackerError(
                "this profiler's data was discarded when a later profiler started; "
                "take snapshot() before starting another one"
            )
        with self._groups_lock:
            self._fold(self.max_finished_tasks)
            sites, stacks, frames = _core.stack_samples()
            records = read_records(self.loops(), self._at_stop)
            for rec in records.values():  # (every name settled before any is used: see _group_coro)
                self._group_coro(rec.coro, rec.code)
        # id(task) -> record id, for Report.task(task): the newest record made at an
        # address wins (a task object still alive cannot share it with a later task).
        live_objects = {rec.obj_id: rec.id for rec in sorted(records.values(), key=lambda r: r.id) if rec.obj_id}
        s = _core.stats()
        raw = RawData(
            records=records,
            cells=_core.cells(),
            task_peaks=_core.tasks(),
            threads=_core.threads(),
            thread_names=core_threads.known_threads(),
            sites=sites,
            stacks=stacks,
            frames=frames,
            start_ns=self._start_ns,
            now_ns=self._stop_ns if self._stop_ns is not None else _core.now_ns(),
            started_at=self._started_at,
            mode=self.mode,
            sample_interval=self.sample_interval if self.mode == "sampled" else None,
            stack_depth=self.stack_depth,
            # exact mode with stacks on: hotspots come from stack samples (their split
            # over sites is estimated; their totals are the task's exact counts)
            stacks_sampled=self.mode == "exact" and self.stack_depth > 0 and self.stack_interval > 0,
            loop_impl=self.loop_impl,
            tracker_bytes=int(s["tracker_bytes"]),
            folded=self._folded,
            folded_tasks=self._folded_tasks,
            group_site_ids={gid: key for key, gid in self._group_site_ids.items()},
            live_objects=live_objects,
            group_coro=self._group_coro,
        )
        return build_report(raw)


def running() -> "Tracker | None":
    """The tracker running in this process, if any."""
    return _running

