"""The Profiler: one object tying the tracker (attribution) to the loop hooks."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import os
import sys
from pathlib import Path
from typing import Any, Callable

from .attribution import _core
from .attribution.report import Report
from .attribution.tracker import (
    DEFAULT_MAX_FINISHED_TASKS,
    DEFAULT_SAMPLE_INTERVAL,
    DEFAULT_STACK_DEPTH,
    DEFAULT_STACK_INTERVAL,
    Tracker,
    TrackerError,
)
from .exporters import ExportError, export_json_async, write_json
from .loop_hooks import threads as thread_hooks
from .loop_hooks.instrument import Tagger, instrument_loop, is_instrumented, making_loop, uninstrument_loop
from .loop_hooks.tagging import TAG, merged_labels, set_label_listener
from .sizes import parse_size

__all__ = ["Profiler", "ProfilerError", "current_profiler"]

_last: "Profiler | None" = None
_unseen_loop_types: set[type] = set()


def instrument_or_warn(profiler: "Profiler", loop: Any) -> bool:
    """``profiler.instrument_loop(loop)`` for a loop made to run the program's code (by its
    policy or a loop factory): a loop that cannot be instrumented (uvloop's bare Cython
    ``uvloop.loop.Loop``, a Mock) runs as it would without us, unseen, and stderr says so
    once per loop type.  Raising would break the program; a warning could be made an error
    by its filters.  Whether it was instrumented."""
    try:
        profiler.instrument_loop(loop)
        return True
    except Exception:  # noqa: BLE001 - never raised into the program
        kind = type(loop)
        if kind not in _unseen_loop_types:
            _unseen_loop_types.add(kind)
            with contextlib.suppress(Exception):
                sys.stderr.write(f"memscope-async: warning: cannot instrument event loop of type "
                                 f"{kind.__module__}.{kind.__qualname__}; its tasks are not profiled\n")
        return False


def _update_labels(tag: Any, labels: Any) -> None:
    """Label listener: the running task's record gets the labels set inside it (a mapping
    only the record keeps: our bookkeeping, so its allocation is not the task's)."""
    _core.set_task_labels(tag.id, _core.unrecorded(merged_labels, _core.task_labels(tag.id), labels))


class ProfilerError(TrackerError):
    """The profiler cannot do what was asked: a second profiler, bad options, no data."""


class Profiler:
    """Attributes every allocation to the asyncio task that made it.

    Options (all keyword-only, accepted by every entry point):

    mode
        ``"exact"`` counts every allocation; ``"sampled"`` samples on average every
        ``sample_interval`` bytes and reports unbiased estimates.  Not given: sampled
        if ``sample_interval`` is, else exact (as the command line's ``--sample-interval``).
    sample_interval
        Mean bytes between samples in sampled mode (default 512 KiB): an int, or a size
        string such as ``"64 KiB"`` (binary units, as on the command line).  Giving it implies
        sampled mode unless ``mode="exact"`` is given too, where it has no use.
    stack_interval
        Exact mode: mean bytes between stack samples for hotspots (default 64 KiB;
        0 disables stacks).
    stack_depth
        Frames kept per stack, innermost first (default 32; 0 disables stacks).
    max_finished_tasks
        Finished tasks with no live bytes kept individually (default 10,000); beyond it
        they are folded into their group, those that allocated least first (the ones
        that allocated most stay).  Finished tasks still holding memory are always kept.
    threads
        Carry task attribution into thread pools, thread-safe callbacks and threads
        started by tasks (default True).
    """

    def __init__(
        self,
        *,
        mode: str | None = None,
        sample_interval: int | str | None = None,
        stack_interval: int | str | None = DEFAULT_STACK_INTERVAL,
        stack_depth: int = DEFAULT_STACK_DEPTH,
        max_finished_tasks: int = DEFAULT_MAX_FINISHED_TASKS,
        threads: bool = True,
        inferred_half_life: float = 1.0,
        seed: int = 0,
    ) -> None:
        try:  # sizes may be written as people write them ("64 KiB"), as on the command line
            if isinstance(sample_interval, str):
                sample_interval = parse_size(sample_interval)
            if isinstance(stack_interval, str):
                stack_interval = parse_size(stack_interval, allow_zero=True)
        except ValueError as exc:
            name = "sample_interval" if isinstance(sample_interval, str) else "stack_interval"
            raise ProfilerError(f"{name}: {exc}") from None
        if mode is None:
            mode = "exact" if sample_interval is None else "sampled"
        if not isinstance(threads, bool):
            raise ProfilerError(f"threads must be True or False, not {threads!r}")
        try:
            self._tracker = Tracker(
                TAG,
                mode=mode,
                sample_interval=DEFAULT_SAMPLE_INTERVAL if sample_interval is None else sample_interval,
                stack_interval=stack_interval,
                stack_depth=stack_depth,
                max_finished_tasks=max_finished_tasks,
                inferred_half_life=inferred_half_life,
                seed=seed,
            )
        except TrackerError as exc:
            raise ProfilerError(str(exc)) from None
        self._tagger = Tagger(propagate_threads=threads)
        self._tracker.loops = lambda: list(self._tagger.loops)
        self.threads = threads
        self._loop_kinds: set[str] = set()
        # the profiler of ``memscope-async run``: the program's own memscope_async.run()
        # and install_policy() join it instead of refusing to start (api)
        self.ambient = False
        self._undo_loops: Callable[[], None] | None = None  # start(): what instrumenting new loops did

    def _settings(self) -> dict[str, Any]:
        """The options this profiler runs with, by name, as it took them (e.g.
        ``stack_interval=None`` is 0)."""
        t = self._tracker
        return {"mode": t.mode, "sample_interval": t.sample_interval, "stack_interval": t.stack_interval,
                "stack_depth": t.stack_depth, "max_finished_tasks": t.max_finished_tasks, "threads": self.threads,
                "inferred_half_life": t.inferred_half_life, "seed": t.seed}

    # -- lifecycle ----------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return self._tracker.mode

    @property
    def active(self) -> bool:
        return self._tracker.active

    def start(self) -> "Profiler":
        """Start counting, and instrument every event loop made from now on until
        :meth:`stop` (those the current event-loop policy makes or is given, those of a
        policy set later, those an ``asyncio.Runner`` makes with its own ``loop_factory``:
        ``with Profiler(): asyncio.run(main())`` attributes main's tasks).  A loop
        already running is instrumented from inside it with :func:`memscope_async.instrument`.
        Raises :class:`ProfilerError` if a profiler is already running in this process
        (the allocator hooks are process-wide)."""
        self._start()
        from .api import instrument_loops_made_any_way, instrument_or_skip  # (the facade's; it imports us)

        try:
            self._undo_loops = instrument_loops_made_any_way(instrument_or_skip(self), current_policy=True)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> "Profiler":
        """Start counting; loops are instrumented by the caller (the entry points)."""
        global _last
        try:
            self._tracker.start()
        except TrackerError as exc:
            raise ProfilerError(str(exc)) from None
        set_label_listener(_update_labels)
        if self.threads:
            thread_hooks.install()
        _last = self
        return self

    @property
    def forked(self) -> bool:
        """Whether this process is a fork of the one the profiler ran in, and the profiler
        stopped at the fork (its data is the parent's up to then; the parent reports it)."""
        return self._tracker.forked

    def stop(self) -> "Profiler":
        """Stop counting and take the hooks out of every loop (idempotent).  What was
        recorded stays available to :meth:`snapshot` and :meth:`export`.

        Before the hooks come out, a full garbage collection runs (unless the program has
        turned the collector off), as one would before reading tracemalloc: unreachable
        cycles a task left behind are not memory it retains, and CPython's free lists
        (which keep recently freed tuples, floats, lists, ... allocated for reuse) would
        otherwise leave a few dozen bytes "retained" by tasks that hold nothing, and make
        groups that do not leak look like leak suspects."""
        if not self._tracker.active:
            return self
        undo, self._undo_loops = self._undo_loops, None
        if undo is not None:
            try:
                undo()
            except Exception:
                pass
        try:
            if gc.isenabled():
                gc.collect()  # a finalizer's exception is reported as unraisable, never raised here
                # Code objects that only our stack samples still held (code the program
                # compiled at run time and dropped) go now, while their frees are seen; what
                # of them waits in the free lists goes with one more full collection.
                if self._tracker.settle_stacks():
                    gc.collect()
            self._tracker.settle_free_lists()
            try:
                self._tracker.note_live_tasks()  # their names, while the loops still say which are ours
            except Exception:
                pass
        finally:
            # (a Ctrl-C during the collections, which take a while in a big heap, still ends
            # with the hooks out: the program goes on, or ends, unprofiled)
            for loop in list(self._tagger.loops):
                try:
                    uninstrument_loop(loop)
                except Exception:
                    pass
            if self.threads:
                thread_hooks.uninstall()
            set_label_listener(None)
            self._tracker.stop()
        return self

    def close(self) -> None:
        """Stop and free the recorded data."""
        self.stop()
        self._tracker.close()

    def __enter__(self) -> "Profiler":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- loops --------------------------------------------------------------------------
    def instrument_loop(self, loop: asyncio.AbstractEventLoop) -> asyncio.AbstractEventLoop:
        """Instrument an event loop (stdlib or uvloop) so its tasks are attributed."""
        instrument_loop(loop, self._tagger)
        # (a user's subclass of uvloop.Loop is uvloop too)
        kind = "uvloop" if any(k.__module__.split(".")[0] == "uvloop" for k in type(loop).__mro__) else "asyncio"
        self._loop_kinds.add(kind)
        self._tracker.loop_impl = "+".join(sorted(self._loop_kinds))
        return loop

    def tag_current_task(self) -> None:
        """Attribute the running task (created before instrumentation) from now on."""
        task = asyncio.current_task()
        if task is None:
            return
        # (a context tagged in this session is left as it is; one tagged by an earlier
        # profiler, for the same task profiled again, is tagged anew: the core tells them apart)
        state = getattr(task.get_loop(), "_ms_state", None)
        _core.tag_running_task(task, getattr(state, "serial", 0))

    def loop_factory(self, base: Callable[[], asyncio.AbstractEventLoop] | None = None) -> Callable[[], Any]:
        """A loop factory whose loops report to this profiler."""

        def factory() -> asyncio.AbstractEventLoop:
            loop = making_loop(base or asyncio.new_event_loop)
            if not is_instrumented(loop) or loop._ms_state.tagger is not self._tagger:
                instrument_or_warn(self, loop)
            return loop

        return factory

    # -- results ------------------------------------------------------------------------
    def snapshot(self) -> Report:
        """A :class:`Report` of everything recorded so far (the profiler may be running).

        Taken while the profiler runs, it first runs a full garbage collection (unless the
        program has turned the collector off), as :meth:`stop` does and for the same
        reasons: cycles nobody can reach are not retained memory, and the collection empties
        CPython's free lists, which would otherwise keep finished tasks' freed tuples (the
        arguments of the callbacks that ran their steps, 48 bytes each on 3.12+) charged to
        them, so that they looked like leak suspects and could not be folded; and an object
        of the report made from such a tuple would have stayed charged to the program."""
        if self._tracker.active and gc.isenabled():
            gc.collect()  # a finalizer's exception is reported as unraisable, never raised here
        self._tracker.settle_free_lists()  # asyncio's own, which the collection leaves
        try:
            # Building it is our bookkeeping, not the program's memory: its allocations are
            # not recorded (in a fresh process its first imports alone are ~1 MiB, which the
            # next snapshot's totals counted as the program's).
            return _core.unrecorded(self._tracker.report)
        except TrackerError as exc:
            raise ProfilerError(str(exc)) from None

    def export(self, path: str | Path, *, indent: bool = False) -> Path:
        """Write the JSON report atomically to ``path`` and return the path.

        Raises :class:`memscope_async.ExportError` (one line naming the file and the
        reason) if it cannot be written; a file already at ``path`` is then left as it was."""
        try:
            report = self.snapshot()
        except MemoryError as exc:
            raise ExportError(f"cannot write report to {path}: out of memory") from exc
        return self._write(report, path, indent=indent)

    def _write(self, report: Report, path: str | Path, *, indent: bool = False) -> Path:
        """Write a report already taken (as :meth:`export` writes its own)."""
        return _core.unrecorded(functools.partial(write_json, report, path, indent=indent))

    async def export_async(self, path: str | Path, *, indent: bool = False) -> Path:
        """Like :meth:`export`, writing with aiofiles so the loop is not blocked (and
        raising :class:`memscope_async.ExportError` the same way)."""
        return await export_json_async(self.snapshot(), path, indent=indent)

    def stats(self) -> dict[str, Any]:
        """The tracker's own memory and counts: ``tracker_bytes``, ``tracked_allocations``,
        ``bytes_per_tracked_allocation``, ``live_tasks``, ``folded_tasks``..."""
        return self._tracker.stats()

    def __repr__(self) -> str:
        state = "running" if self.active else "stopped"
        return f"<memscope_async.Profiler mode={self.mode} {state}>"


def _undo_in_forked_child() -> None:
    """In a child made by fork the tracker has stopped (its own at-fork handler, which runs
    first): what the running profiler put in place for the loops made any way (a Runner's
    factory, policies, uvloop's maker and the finder waiting for its import) and the thread
    hooks come out too, as :meth:`Profiler.stop` would have taken them out, so the child
    runs as if never profiled and may start a profiler of its own."""
    prof = _last
    if prof is None:
        return
    undo, prof._undo_loops = prof._undo_loops, None
    try:
        if undo is not None:
            undo()
        if prof.threads:
            thread_hooks.uninstall()
    except Exception:  # (the child goes on, whatever)
        pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_undo_in_forked_child)


def current_profiler() -> Profiler | None:
    """The most recently started profiler (running or not), or None."""
    return _last
